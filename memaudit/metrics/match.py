"""The NN ratio up to flips and shifts (`--match-flips`, `--match-shifts N`): a mirrored or shifted copy is a copy.

    d(x, x_i) = min_t ||T_t(x) - x_i||  over the transforms T_t of memaudit.transforms (identity, mirror, shifts),
    ratio = d(x, NN_1) / d(x, NN_2),  memorized if < threshold  (the rule of Yoon et al. 2023 / Gu et al. 2023)

in the scan's feature space (each transformed sample is embedded), duplicate-aware like nn_ratio (NN_2 is the
nearest image of another near-duplicate cluster). Without --match-flips / --match-shifts the section says it was
not asked for and its gates fail (nothing measured). Searching the augmentation group is suggested by the
x-flip training of EDM-style models (Karras et al. 2022); no existing tool does it (notes/anchors-mission.md §4.3).
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch

from memaudit.duplicates import distinct_second
from memaudit.features import embed
from memaudit.intervals import fraction_fields
from memaudit.metrics.base import RUN, Column, Metric, Note, PairGrid, RunData, ScanContext
from memaudit.metrics.nn_ratio import WORST_PAIRS, _ratio, memorized_count, neighbours_needed
from memaudit.numbers import finite, finite_or_none, fmt
from memaudit.transforms import transforms

KEY = "match_memorized_fraction"


def matched_neighbours(samples, ctx: ScanContext, names_fns, k: int):
    """Neighbour lists under the min-over-transforms distance: (dist, idx, transform) sorted by distance, with
    each training image's distance the smallest over the transforms (its first entry) and `transform[n, j]` the
    transform that gave entry j. k neighbours per transform are enough for the duplicate-aware d2."""
    dists, idxs, which = [], [], []
    for t, (_, fn) in enumerate(names_fns):
        d, i = ctx.index.search(embed(fn(samples), ctx.features), k)
        dists.append(d)
        idxs.append(i)
        which.append(torch.full_like(i, t))
    dist, idx, tr = torch.cat(dists, 1), torch.cat(idxs, 1), torch.cat(which, 1)
    order = torch.argsort(dist, dim=1, stable=True)
    return dist.gather(1, order), idx.gather(1, order), tr.gather(1, order)


class Match(Metric):
    name = "match"
    scope = RUN
    title = "NN ratio up to flips and shifts"
    summary_keys = {
        KEY: "max over runs of `match.memorized_fraction`: NN ratio with d = min over the transforms of "
             "--match-flips / --match-shifts (null, so gates fail, when neither was given)",
        f"{KEY}_lower": "max over runs of `match.memorized_fraction_lower` (95 % Wilson interval)",
        f"{KEY}_upper": "max over runs of `match.memorized_fraction_upper` (95 % Wilson interval)",
    }
    columns = (Column("memorized up to flips/shifts", lambda s: s.get("memorized_fraction"), percent=True),)

    def compute(self, ctx: ScanContext, run: Optional[RunData] = None) -> dict:
        flips, shifts = bool(getattr(ctx.config, "match_flips", False)), int(getattr(ctx.config, "match_shifts", 0))
        names_fns = transforms(flips, shifts)
        if len(names_fns) == 1:
            return {"enabled": False, "transforms": ["identity"],
                    "reason": "not asked for: pass --match-flips and/or --match-shifts N"}
        k = min(ctx.index.num_points, neighbours_needed(ctx.duplicates))
        dist, idx, tr = matched_neighbours(run.samples, ctx, names_fns, k)
        labels = ctx.duplicates.labels if ctx.duplicates is not None else np.arange(ctx.index.num_points)
        d2, _ = distinct_second(dist, idx, labels)
        d1 = dist[:, 0]
        ratio = _ratio(d1, d2).numpy().astype(np.float64)
        threshold = float(ctx.config.threshold)
        k_mem, n = memorized_count(ratio, threshold), len(ratio)
        names = [name for name, _ in names_fns]
        order = sorted(range(n), key=lambda i: (ratio[i] if np.isfinite(ratio[i]) else -1.0, i))
        return {"enabled": True, "transforms": names, "threshold": threshold, "num_samples": n,
                **fraction_fields("memorized_fraction", k_mem, n),
                "samples": [{"index": i, "ratio": finite_or_none(ratio[i]), "d1": finite_or_none(d1[i]),
                             "d2": finite_or_none(d2[i]), "nearest": int(idx[i, 0]),
                             "transform": names[int(tr[i, 0])]} for i in range(n)],
                "worst": order[:WORST_PAIRS]}

    def cost(self, w, sampler=None):
        """One search per transform beyond the identity (flips, shifts)."""
        return w.search_rows(w.num_samples * (w.match_transforms - 1))

    def summarize(self, sections: Mapping[str, Mapping]) -> dict:
        out = {}
        for key, field in ((KEY, "memorized_fraction"), (f"{KEY}_lower", "memorized_fraction_lower"),
                           (f"{KEY}_upper", "memorized_fraction_upper")):
            values = finite(s.get(field) for s in sections.values() if s and s.get("enabled"))
            out[key] = max(values) if values else None
        return out

    def validate(self, section, c, where: str) -> None:
        c.dict(section, where, ("enabled", "transforms"))
        c.bool(section["enabled"], f"{where}.enabled")
        for i, name in enumerate(c.list(section["transforms"], f"{where}.transforms")):
            c.str(name, f"{where}.transforms[{i}]")
        if not section["enabled"]:
            return
        c.dict(section, where, ("threshold", "num_samples", "memorized_fraction", "memorized_fraction_lower",
                                "memorized_fraction_upper", "samples", "worst"))
        for key in ("memorized_fraction", "memorized_fraction_lower", "memorized_fraction_upper"):
            c.fraction(section[key], f"{where}.{key}")
        for i, s in enumerate(c.list(section["samples"], f"{where}.samples")):
            c.dict(s, f"{where}.samples[{i}]", ("index", "ratio", "d1", "d2", "nearest", "transform"))
            c.num(s["ratio"], f"{where}.samples[{i}].ratio", nullable=True)
            if s["transform"] not in section["transforms"]:
                c.fail(f"{where}.samples[{i}].transform", f"{s['transform']!r} is not one of {where}.transforms")

    def evidence(self, run: str, section: Mapping) -> list:
        if not section.get("enabled"):
            return [Note(f"NN ratio up to flips/shifts: {section.get('reason', 'not computed')}")]
        by_index = {s["index"]: s for s in section.get("samples") or []}
        worst = [by_index[i] for i in section.get("worst") or [] if i in by_index][:8]
        out: list = [Note(f"up to {len(section['transforms'])} transforms ({', '.join(section['transforms'][:4])}"
                          f"{', ...' if len(section['transforms']) > 4 else ''}): memorized fraction "
                          f"{fmt(section.get('memorized_fraction'))} [{fmt(section.get('memorized_fraction_lower'))}, "
                          f"{fmt(section.get('memorized_fraction_upper'))}]")]
        if worst:
            out.append(PairGrid("Closest up to flips/shifts: sample | training image", [w["index"] for w in worst],
                                [w["nearest"] for w in worst], ["sample", "ratio", "training image", "transform"],
                                [(w["index"], fmt(w["ratio"]), w["nearest"], w["transform"]) for w in worst],
                                file="match"))
        return out


METRIC = Match()
