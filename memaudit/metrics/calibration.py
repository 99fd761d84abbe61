"""Calibration of the NN-ratio rule on held-out real images (`scan --holdout DATA2 [--fpr 0.01]`).

Held-out real images were never trained on, so any of them the rule flags is a false positive:

    FPR(t) = #{h in holdout : ratio(h) < t} / |holdout|,   ratio = d1/d2 against the training set (as nn_ratio)
    t_cal = r_(floor(fpr |holdout|) + 1)   (that order statistic of the held-out ratios: FPR(t_cal) <= fpr)

reported with the FPR of the configured threshold (1/3, Yoon et al. 2023 / Gu et al. 2023), each run's
memorized fraction at t_cal, and a split-half check (t_cal from the first half of the held-out images, its FPR
measured on the second), all with 95 % Wilson intervals. Also on the held-out images: C_T with one half as
"generated" and the other as test (the spread C_T shows for real data, ideally ~0; -1.6 on the 32 bundled digits, Meehan et al. 2020) and Alaa et al.'s authenticity
(2022). Without --holdout the section says the threshold is uncalibrated and its gates fail.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from memaudit.copying import c_t
from memaudit.features import embed
from memaudit.intervals import fraction_fields
from memaudit.metrics.authenticity import authentic, train_neighbour_distance
from memaudit.metrics.base import SCAN, Metric, ScanContext
from memaudit.metrics.nn_ratio import memorized_count, neighbours_needed, ratios
from memaudit.numbers import finite, finite_or_none, fmt

UNCALIBRATED = ("uncalibrated: the threshold was not checked against held-out real images (pass --holdout DATA2 "
                "to measure its false-positive rate and a calibrated threshold)")


def calibrated_threshold(held_ratios: np.ndarray, fpr: float) -> Optional[float]:
    """The order statistic r_(floor(fpr n) + 1) of the held-out ratios: at most fpr of them lie below it."""
    r = np.sort(np.asarray(held_ratios, dtype=np.float64)[np.isfinite(held_ratios)])
    return float(r[min(int(np.floor(fpr * len(r))), len(r) - 1)]) if len(r) else None


def holdout_features(ctx: ScanContext):
    """Held-out features, their NN result against the training set (cached for the other metrics)."""
    if "holdout" not in ctx.cache:
        emb = embed(ctx.holdout, ctx.features)
        k = min(ctx.index.num_points, neighbours_needed(ctx.duplicates))
        dist, idx = ctx.index.search(emb, k)
        ctx.cache["holdout"] = (emb, ratios(dist, idx, ctx.duplicates))
    return ctx.cache["holdout"]


class Calibration(Metric):
    name = "calibration"
    scope = SCAN
    title = "Calibration on held-out real images"
    summary_keys = {
        "holdout_fpr": "`calibration.fpr`: held-out real images the threshold flags (its false-positive rate)",
        "holdout_fpr_upper": "`calibration.fpr_upper` (95 % Wilson interval)",
        "calibrated_threshold": "`calibration.calibrated_threshold`: the --fpr quantile of the held-out NN ratios",
        "calibrated_memorized_fraction": "max over runs of the fraction of samples below the calibrated threshold",
        "calibrated_memorized_fraction_upper": "its 95 % Wilson upper bound (max over runs)",
    }

    def compute(self, ctx: ScanContext, run=None) -> dict:
        threshold, fpr = float(ctx.config.threshold), float(ctx.config.fpr)
        if ctx.holdout is None:
            return {"calibrated": False, "threshold": threshold, "target_fpr": fpr, "note": UNCALIBRATED}
        emb, held = holdout_features(ctx)
        r = held.ratio.numpy().astype(np.float64)
        n = len(r)
        t_cal = calibrated_threshold(r, fpr)
        half = n // 2
        t_half = calibrated_threshold(r[:half], fpr) if half else None
        second = r[half:]
        runs = {}
        for name, data in ctx.runs.items():
            dist, idx = data.neighbours(ctx, neighbours_needed(ctx.duplicates))
            rr = ratios(dist, idx, ctx.duplicates).ratio.numpy().astype(np.float64)
            runs[name] = fraction_fields("memorized_fraction", memorized_count(rr, t_cal) if t_cal is not None
                                         else len(rr), len(rr))
        train_emb = embed(ctx.train, ctx.features).numpy()
        base = c_t(train_emb, emb[half:].numpy(), emb[:half].numpy(), seed=ctx.config.seed) if half else None
        nn_dist = train_neighbour_distance(ctx, held.nearest.numpy())
        auth = authentic(held.d1.numpy(), held.nearest.numpy(), nn_dist)
        return {"calibrated": True, "threshold": threshold, "target_fpr": fpr, "num_holdout": n,
                **{k.replace("memorized", "fpr"): v for k, v in
                   fraction_fields("memorized", memorized_count(r, threshold), n).items()},
                "calibrated_threshold": t_cal,
                "split_half": {"threshold": t_half, **{k.replace("memorized", "fpr"): v for k, v in
                               fraction_fields("memorized", memorized_count(second, t_half) if t_half is not None
                                               else len(second), len(second)).items()}},
                "runs": runs,
                "ct_baseline": finite_or_none(base.ct) if base is not None else None,
                **fraction_fields("authenticity", int(auth.sum()), n)}

    def cost(self, w, sampler=None):
        """A search of the held-out images."""
        return w.search_rows(w.holdout)

    def summarize(self, section: Mapping) -> dict:
        if not section or not section.get("calibrated"):
            return {key: None for key in self.summary_keys}
        runs = (section.get("runs") or {}).values()
        frac = finite(r.get("memorized_fraction") for r in runs)
        upper = finite(r.get("memorized_fraction_upper") for r in runs)
        return {"holdout_fpr": section.get("fpr"), "holdout_fpr_upper": section.get("fpr_upper"),
                "calibrated_threshold": section.get("calibrated_threshold"),
                "calibrated_memorized_fraction": max(frac) if frac else None,
                "calibrated_memorized_fraction_upper": max(upper) if upper else None}

    def validate(self, section, c, where: str) -> None:
        c.dict(section, where, ("calibrated", "threshold", "target_fpr"))
        c.bool(section["calibrated"], f"{where}.calibrated")
        if not section["calibrated"]:
            c.str(section.get("note"), f"{where}.note")
            return
        c.dict(section, where, ("num_holdout", "fpr", "fpr_lower", "fpr_upper", "calibrated_threshold",
                                "split_half", "runs", "authenticity"))
        c.int(section["num_holdout"], f"{where}.num_holdout", minimum=1)
        for key in ("fpr", "fpr_lower", "fpr_upper", "authenticity"):
            c.fraction(section[key], f"{where}.{key}")
        c.num(section["calibrated_threshold"], f"{where}.calibrated_threshold", nullable=True)
        c.num(section.get("ct_baseline"), f"{where}.ct_baseline", nullable=True)
        for name, entry in c.dict(section["runs"], f"{where}.runs").items():
            c.fraction(c.dict(entry, f"{where}.runs.{name}", ("memorized_fraction",))["memorized_fraction"],
                       f"{where}.runs.{name}.memorized_fraction")

    def lines(self, report: Mapping) -> list[str]:
        s = report.get(self.name)
        if not s:
            return []
        if not s.get("calibrated"):
            return [f"threshold {fmt(s.get('threshold'))} is {s.get('note')}"]
        return [f"calibrated on {s['num_holdout']} held-out real images: the threshold {fmt(s['threshold'])} flags "
                f"{fmt(s['fpr'])} [{fmt(s['fpr_lower'])}, {fmt(s['fpr_upper'])}] of them (false positives); the "
                f"threshold for FPR {fmt(s['target_fpr'])} is {fmt(s['calibrated_threshold'])} (split-half check: "
                f"FPR {fmt(s['split_half'].get('fpr'))}); C_T of held-out vs held-out {fmt(s.get('ct_baseline'))}; "
                f"held-out authenticity {fmt(s.get('authenticity'))}"]


METRIC = Calibration()
