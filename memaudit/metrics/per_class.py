"""Memorization per class of a class-conditional model: the NN ratio of class c's samples within class c's training
images and within the whole training set.

    within_n = d1(x_n, X_c) / d2(x_n, X_c),   overall_n = d1(x_n, X) / d2(x_n, X),   memorized if < threshold

for the samples x_n drawn with label c, X_c the training images labelled c and X all of them (d2 to the nearest
image of another near-duplicate cluster, as in nn_ratio). Also the fraction of class c's samples whose nearest
training image is labelled c. Rare or uninformative labels are where a conditional model copies (Somepalli et al.
2023). An unconditional scan's section says so ({"computed": false, "reason": ...}; its gates fail); a class with
fewer than 2 distinct training images has no within-class ratio (null: its gates fail too).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch

from memaudit.duplicates import distinct_second
from memaudit.features import embed
from memaudit.intervals import fraction_fields
from memaudit.metrics.base import SCAN, Metric, ScanContext
from memaudit.metrics.nn_ratio import _ratio, memorized_count, neighbours_needed
from memaudit.neighbors import NeighborIndex
from memaudit.numbers import finite_or_none, fmt

KEY = "class_memorized_fraction"
MAX_LINES = 10  # classes listed in the terminal and HTML


def class_ratios(samples_emb: torch.Tensor, index: NeighborIndex, clusters: np.ndarray, k: int) -> torch.Tensor:
    """d1/d2 of each embedded sample against `index` (d2 to the nearest other cluster of `clusters`)."""
    dist, idx = index.search(samples_emb, min(k, index.num_points))
    d2, _ = distinct_second(dist, idx, clusters)
    return _ratio(dist[:, 0], d2)


def class_index(ctx: ScanContext, c: int) -> tuple[Optional[NeighborIndex], np.ndarray, np.ndarray]:
    """(index of class c's embedded training images or None when it has < 2 distinct ones, their cluster labels,
    their rows in the training set); built once per scan."""
    key = f"per_class_index_{c}"
    if key not in ctx.cache:
        rows = np.flatnonzero(ctx.labels.cpu().numpy() == c)
        clusters = ctx.duplicates.labels[rows] if ctx.duplicates is not None else rows
        index = NeighborIndex(embed(ctx.train[torch.from_numpy(rows).to(ctx.train.device)], ctx.features)) \
            if len(np.unique(clusters)) >= 2 else None
        ctx.cache[key] = (index, clusters, rows)
    return ctx.cache[key]


def class_entry(ctx: ScanContext, run, c: int, overall: torch.Tensor, nearest: torch.Tensor) -> dict:
    """One class of one run: its sample count, within-class and overall fractions (Wilson intervals)."""
    threshold = float(ctx.config.threshold)
    rows = torch.nonzero(run.labels == c).reshape(-1)
    index, clusters, train_rows = class_index(ctx, c)
    n = int(rows.numel())
    within = None
    if index is not None and n:
        within = class_ratios(embed(run.samples[rows], ctx.features), index, clusters,
                              neighbours_needed(ctx.duplicates)).numpy().astype(np.float64)
    over = overall[rows].numpy().astype(np.float64)
    same = int(np.isin(nearest[rows].numpy(), train_rows).sum())
    entry = {"class": int(c), "num_samples": n, "num_train": int(len(train_rows))}
    if within is not None:
        entry.update(fraction_fields("memorized_fraction", memorized_count(within, threshold), n))
    else:
        entry.update({"memorized_fraction": None, "memorized_fraction_lower": None,
                      "memorized_fraction_upper": None, "memorized_fraction_count": 0,
                      "reason": "fewer than 2 distinct training images in this class" if n else "no samples"})
    entry.update(fraction_fields("overall_memorized_fraction", memorized_count(over, threshold), n))
    entry["nearest_same_class_fraction"] = same / n if n else None
    entry["samples"] = [{"index": int(i), "ratio": finite_or_none(within[j]) if within is not None else None,
                         "overall_ratio": finite_or_none(over[j])} for j, i in enumerate(rows.tolist())]
    return entry


class PerClass(Metric):
    name = "per_class"
    scope = SCAN
    title = "Memorization per class"
    summary_keys = {
        KEY + "_max": "max over runs and classes of `per_class.runs.<sampler>[c].memorized_fraction` (NN ratio within "
                      "the class's training images; null, so gates fail, for an unconditional scan)",
        KEY + "_upper_max": "max over runs and classes of the within-class `memorized_fraction_upper` (95 % Wilson)",
    }

    def compute(self, ctx: ScanContext, run=None) -> dict:
        if ctx.labels is None or any(r.labels is None for r in ctx.runs.values()):
            return {"computed": False, "reason": "the model is not class-conditional"}
        classes = sorted({int(c) for r in ctx.runs.values() for c in r.labels.unique().tolist()})
        names = ctx.class_names or []
        runs = {}
        for sampler, r in ctx.runs.items():
            dist, idx = r.neighbours(ctx, neighbours_needed(ctx.duplicates))
            d2, _ = distinct_second(dist, idx, ctx.duplicates.labels) if ctx.duplicates is not None \
                else (dist[:, 1], None)
            overall = _ratio(dist[:, 0], d2)
            runs[sampler] = [class_entry(ctx, r, c, overall, idx[:, 0]) for c in classes]
        return {"computed": True, "threshold": float(ctx.config.threshold),
                "classes": [{"class": c, "name": names[c] if c < len(names) else str(c)} for c in classes],
                "runs": runs}

    def summarize(self, section: Mapping) -> dict:
        entries = [e for run in (section.get("runs") or {}).values() for e in run]
        out = {}
        for key, field in ((KEY + "_max", "memorized_fraction"), (KEY + "_upper_max", "memorized_fraction_upper")):
            values = [finite_or_none(e.get(field)) for e in entries]
            out[key] = None if not values or None in values else max(values)  # a class not measured: fail closed
        return out

    def validate(self, section: Any, c, where: str) -> None:
        c.dict(section, where, ("computed",))
        if not c.bool(section["computed"], f"{where}.computed"):
            return
        c.dict(section, where, ("threshold", "classes", "runs"))
        c.num(section["threshold"], f"{where}.threshold")
        for i, cls in enumerate(c.list(section["classes"], f"{where}.classes")):
            c.dict(cls, f"{where}.classes[{i}]", ("class", "name"))
            c.int(cls["class"], f"{where}.classes[{i}].class", minimum=0)
            c.str(cls["name"], f"{where}.classes[{i}].name")
        for sampler, entries in c.dict(section["runs"], f"{where}.runs").items():
            for i, e in enumerate(c.list(entries, f"{where}.runs.{sampler}")):
                ew = f"{where}.runs.{sampler}[{i}]"
                c.dict(e, ew, ("class", "num_samples", "num_train", "memorized_fraction",
                               "overall_memorized_fraction", "samples"))
                c.int(e["class"], f"{ew}.class", minimum=0)
                c.int(e["num_samples"], f"{ew}.num_samples", minimum=0)
                for key in ("memorized_fraction", "memorized_fraction_lower", "memorized_fraction_upper",
                            "overall_memorized_fraction", "overall_memorized_fraction_lower",
                            "overall_memorized_fraction_upper", "nearest_same_class_fraction"):
                    if e.get(key) is not None:
                        c.fraction(e[key], f"{ew}.{key}")
                c.list(e["samples"], f"{ew}.samples")

    def lines(self, report: Mapping) -> list[str]:
        """A header and one line per class (most memorized first, at most MAX_LINES), each run's fractions."""
        section = report.get(self.name)
        if not section or not section.get("computed"):
            return []
        names = {cls["class"]: cls["name"] for cls in section.get("classes") or []}
        by_class: dict[int, list[str]] = {}
        worst: dict[int, float] = {}
        for sampler, entries in sorted((section.get("runs") or {}).items()):
            for e in entries:
                by_class.setdefault(e["class"], []).append(
                    f"{sampler} {percent(e.get('memorized_fraction'))} [{percent(e.get('memorized_fraction_lower'))}"
                    f", {percent(e.get('memorized_fraction_upper'))}] of {e.get('num_samples')} (overall "
                    f"{percent(e.get('overall_memorized_fraction'))})")
                value = finite_or_none(e.get("memorized_fraction"))
                worst[e["class"]] = max(worst.get(e["class"], -1.0), 2.0 if value is None else value)
        order = sorted(by_class, key=lambda c: (-worst[c], c))
        out = [f"memorized per class (NN ratio < {fmt(section.get('threshold'))} to the class's own training images, "
               "95 % interval; overall: to all of them):"]
        out += [f"  class {names.get(c, c)}: " + "; ".join(by_class[c]) for c in order[:MAX_LINES]]
        if len(order) > MAX_LINES:
            out.append(f"  ... {len(order) - MAX_LINES} more classes in the JSON report (per_class)")
        return out


def percent(value: Any) -> str:
    v = finite_or_none(value)
    return "n/a" if v is None else f"{100 * v:.1f}%"


METRIC = PerClass()
