"""Carlini et al.'s adaptive L2 distance (2023, "Extracting Training Data from Diffusion Models", Sec. 5.1):

    l(x) = ||x - NN_1(x)|| / (alpha * mean_{j <= n} ||x - NN_j(x)||),  alpha = 0.5, n = 50 (or M when M < 50)

in the scan's feature space. Dividing by the mean distance to the n nearest training images suppresses false
positives in dense regions, as the d2 of the NN ratio does; a copy scores ~0. The fraction below 0.1 follows the
"(l2, 50, 0.1)" setting often quoted for the paper (not confirmed in a primary source: read it as a second opinion
beside the NN ratio, not as the paper's own number).
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from memaudit.metrics.base import RUN, Column, Metric, RunData, ScanContext
from memaudit.numbers import finite, finite_or_none

ALPHA = 0.5
NEIGHBOURS = 50
THRESHOLD = 0.1


def adaptive_l2(dist: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """l = d_1 / (alpha * mean_j d_j) per row of sorted neighbour distances (N, n); 0 where all are 0."""
    dist = np.asarray(dist, dtype=np.float64)
    scale = alpha * dist.mean(1)
    return np.where(scale > 0, dist[:, 0] / np.where(scale > 0, scale, 1.0), 0.0)


class AdaptiveL2(Metric):
    name = "adaptive_l2"
    scope = RUN
    title = "Adaptive L2 distance (Carlini et al. 2023)"
    summary_keys = {
        "adaptive_l2_min": "min over runs of `adaptive_l2.min` (Carlini et al.'s adaptive L2, alpha 0.5, n 50)",
        "adaptive_l2_fraction": f"max over runs of `adaptive_l2.fraction`: samples with adaptive L2 < {THRESHOLD}",
    }
    columns = (Column("adaptive L2 min", lambda s: s.get("min")),)

    def compute(self, ctx: ScanContext, run: Optional[RunData] = None) -> dict:
        dist, _ = run.neighbours(ctx, NEIGHBOURS)
        scores = adaptive_l2(dist.numpy())
        return {"alpha": ALPHA, "neighbours": int(dist.shape[1]), "threshold": THRESHOLD,
                "scores": [finite_or_none(v) for v in scores.tolist()], "min": finite_or_none(scores.min()),
                "mean": finite_or_none(scores.mean()),
                "fraction": float(((scores < THRESHOLD) | ~np.isfinite(scores)).mean())}

    def cost(self, w, sampler=None):
        """One exact search of the samples for their 50 nearest."""
        return w.search_rows(w.num_samples)

    def summarize(self, sections: Mapping[str, Mapping]) -> dict:
        mins = finite(s.get("min") for s in sections.values())
        fractions = finite(s.get("fraction") for s in sections.values())
        return {"adaptive_l2_min": min(mins) if mins else None,
                "adaptive_l2_fraction": max(fractions) if fractions else None}

    def validate(self, section, c, where: str) -> None:
        c.dict(section, where, ("alpha", "neighbours", "threshold", "scores", "min", "mean", "fraction"))
        c.int(section["neighbours"], f"{where}.neighbours", minimum=1)
        c.nums(section["scores"], f"{where}.scores")
        for key in ("alpha", "threshold"):
            c.num(section[key], f"{where}.{key}")
        for key in ("min", "mean"):
            c.num(section[key], f"{where}.{key}", nullable=True)
        c.fraction(section["fraction"], f"{where}.fraction")


METRIC = AdaptiveL2()
