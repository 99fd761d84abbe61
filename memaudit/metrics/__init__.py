"""The memorization metrics, one module per metric, listed once here (see memaudit.metrics.base.Metric).

nn_ratio           d1/d2 nearest/second-nearest distinct training image, fraction memorized (< 1/3)
decoded            latent models: the same for the decoded samples against the pixel training images
attribution        which training images are reproduced (ratio < 1/3 to them), how often, by which samples
diffmemorize       DiffMemorize's number as their script computes it (uint8 pixels, L2/sqrt(CHW), top-2, < 1/3)
adaptive_l2        Carlini et al.'s d1 / (0.5 x mean distance to the 50 nearest training images)
match              the NN ratio with d = min over flips/shifts (--match-flips, --match-shifts N)
tiled_l2           partial copies: min over tiles of the tile NN ratio; Carlini's tiled L2 (max over tiles)
authenticity       Alaa et al.'s authenticity: samples farther from their NN than it is from its own NN
ct_score           Meehan et al.'s data-copying test C_T against held-out real images (--holdout)
entropy            entropy of the top-k empirical weights along sampling trajectories; collapse_sigma
trajectory_cosine  1 - cos(D(x,s) - x, D*(x,s) - x) at the points the sampler visits
score_cosine       the same on noisy training points
jacobian           spectral norm of dD/dx (model vs empirical) and one-step sampler expansion
index_recall       with --index ivf: recall of the approximate index against exact search, on the samples
fid                Frechet distance: clean-fid's Inception when present, plus an offline pixel-PCA proxy
calibration        the NN-ratio rule's false-positive rate on held-out real images and a calibrated threshold
per_class          class-conditional models: the NN ratio per class, within the class's training images and overall

This list drives --skip (names = section names), the report sections, the gate names, the terminal/HTML rendering
and the summary table of docs/report-schema.md. Scan-level metrics share one generator, drawn from in this order.
"""

from __future__ import annotations

from typing import Iterable

from memaudit.metrics import (adaptive_l2, attribution, authenticity, calibration, ct_score, decoded, diffmemorize,
                              entropy, fid, index_recall, jacobian, match, nn_ratio, per_class, score_cosine, tiled_l2,
                              trajectory_cosine)
from memaudit.metrics.base import RUN, SCAN, Metric, sampler_key

METRICS: tuple[Metric, ...] = (
    nn_ratio.METRIC,
    decoded.METRIC,
    attribution.METRIC,
    diffmemorize.METRIC,
    adaptive_l2.METRIC,
    match.METRIC,
    tiled_l2.METRIC,
    authenticity.METRIC,
    ct_score.METRIC,
    entropy.METRIC,
    trajectory_cosine.METRIC,
    score_cosine.METRIC,
    jacobian.METRIC,
    index_recall.METRIC,
    fid.METRIC,
    calibration.METRIC,
    per_class.METRIC,
)

BY_NAME = {m.name: m for m in METRICS}
# --skip names that stand for several sections (kept from before the sections were split)
SKIP_ALIASES = {"cosine": ("trajectory_cosine", "score_cosine")}
SKIP_CHOICES = tuple(BY_NAME) + tuple(SKIP_ALIASES)
RUN_SECTIONS = tuple(m.name for m in METRICS if m.scope == RUN)
SCAN_SECTIONS = tuple(m.name for m in METRICS if m.scope == SCAN)


def skipped(names: Iterable[str]) -> set[str]:
    """The section names that --skip NAMES leaves out (aliases expanded)."""
    out: set[str] = set()
    for name in names:
        out.update(SKIP_ALIASES.get(name, (name,)))
    return out


def summary_keys(samplers: Iterable[str] = ()) -> list[str]:
    """Every gateable summary key of a scan with these sampler runs, in METRICS order."""
    keys: list[str] = []
    for metric in METRICS:
        keys += list(metric.summary_keys)
        keys += [sampler_key(t, s) for t in metric.run_keys for s in samplers]
    return keys


__all__ = ["METRICS", "BY_NAME", "SKIP_ALIASES", "SKIP_CHOICES", "RUN_SECTIONS", "SCAN_SECTIONS", "skipped",
           "summary_keys", "Metric"]
