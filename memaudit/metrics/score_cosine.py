"""Score-cosine deviation 1 - cos(D(x,s) - x, D*(x,s) - x) between a model and the empirical denoiser.

D - x = sigma^2 * score, so this is the angle between the two scores.  Near 0 at small sigma means the model
reproduces the empirical (memorizing) score.  A (near-)zero vector has no direction: cos = 1 if both are zero,
else 0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from typing import Callable, Mapping, Optional

from memaudit.denoiser import Denoiser
from memaudit.metrics.base import SCAN, Metric, Plot, RunData, ScanContext, Series
from memaudit.metrics.helpers import run_denoiser, summary
from memaudit.numbers import finite_or_none, fmt
from memaudit.sampling import Trajectory

ZERO_TOL = 1e-6  # a vector is "zero" if its norm is <= ZERO_TOL * max(||x||, 1)
FLOAT64_BYTES = 32 * 1024**2  # the float64 working copies of cosine_deviation, per block of rows


def cosine_deviation(a: Tensor, b: Tensor, x: Tensor, tol: float = ZERO_TOL) -> Tensor:
    """1 - <a, b> / (||a|| ||b||) per sample in float64, with the zero-vector convention above; (B,). Computed
    a few rows at a time, so the float64 copies stay within FLOAT64_BYTES whatever the image size."""
    a, b, x = a.flatten(1), b.flatten(1), x.flatten(1)
    step = max(1, FLOAT64_BYTES // (8 * 3 * max(1, a.shape[1])))
    return torch.cat([_cosine_rows(a[i:i + step], b[i:i + step], x[i:i + step], tol)
                      for i in range(0, a.shape[0], step)]) if a.shape[0] else a.new_zeros(0, dtype=torch.float64)


def _cosine_rows(a: Tensor, b: Tensor, x: Tensor, tol: float) -> Tensor:
    a, b = a.double(), b.double()
    scale = tol * x.double().norm(dim=1).clamp_min(1.0).to(a.device)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    za, zb = na <= scale, nb <= scale
    cos = (a * b).sum(1) / (na * nb).clamp_min(torch.finfo(torch.float64).tiny)
    cos = torch.where(za | zb, (za & zb).double(), cos.clamp(-1.0, 1.0))
    return 1.0 - cos


def recorded_cosine_deviation(empirical: Denoiser, x: Tensor, denoised: Tensor, sigma: float) -> Tensor:
    """1 - cos(D(x) - x, D*(x) - x) per row, D(x) the model's output recorded along a trajectory; (B,)."""
    x = x.to(empirical.points_device)
    return cosine_deviation(denoised.to(x.device) - x, run_denoiser(empirical, x, sigma) - x, x)


def score_cosine_deviation(model: Denoiser, empirical: Denoiser, x: Tensor, sigma: Tensor | float) -> Tensor:
    """1 - cos(D(x,s) - x, D*(x,s) - x) per sample, flattened; (B,) float64."""
    return cosine_deviation(run_denoiser(model, x, sigma) - x, run_denoiser(empirical, x, sigma) - x, x)


def cosine_on_training_points(model: Denoiser, empirical: Denoiser, train: Tensor, sigmas: list[float], n: int,
                              generator: torch.Generator, batch_size: int = 256) -> dict:
    """Mean/std deviation over n random training images x0 at x = x0 + sigma * noise, for each sigma."""
    pick = torch.randperm(train.shape[0], generator=generator)[:max(1, min(n, train.shape[0]))]
    x0 = train[pick]
    out = {"sigmas": [], "mean": [], "std": []}
    for sigma in sigmas:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        x = x0 + float(sigma) * noise
        dev = [score_cosine_deviation(model, empirical, x[s:s + batch_size], float(sigma)).cpu()
               for s in range(0, x.shape[0], batch_size)]
        _append(out, sigma, dev)
    return out


def cosine_on_trajectories(empirical: Denoiser, trajectories: list[Trajectory],
                           deviation_of: Optional[Callable[[Tensor, Tensor, float], Tensor]] = None) -> dict:
    """Mean/std deviation per recorded step, between the model's recorded D(x) and the empirical D*(x).
    `deviation_of(x, d_model, sigma)`: each row's deviation (default here; the scan shares the rows among
    torchrun ranks, memaudit.shared_rows)."""
    out = {"sigmas": [], "mean": [], "std": []}
    if not trajectories:
        return out
    deviation_of = deviation_of or (lambda x, d, sigma: recorded_cosine_deviation(empirical, x, d, sigma))
    for step, sigma in enumerate(trajectories[0].sigmas):
        x = torch.cat([t.xs[step] for t in trajectories])
        d_model = torch.cat([t.denoised[step].to(x.device) for t in trajectories])
        _append(out, sigma, [deviation_of(x, d_model, sigma).cpu()])
    return out


def _append(out: dict, sigma: float, values: list[Tensor]) -> None:
    mean, std = summary(values)
    out["sigmas"].append(float(sigma))
    out["mean"].append(mean)
    out["std"].append(std)


def validate_curve(section, c, where: str) -> None:
    c.curves(section, where, ("mean", "std"))


class ScoreCosine(Metric):
    name = "score_cosine"
    scope = SCAN
    title = "Score-cosine deviation on noisy training points"
    summary_keys = {
        "score_cosine_deviation_small_sigma": "`score_cosine.mean` at the smallest sigma",
        "score_cosine_deviation_mean": "mean of `score_cosine.mean` over sigmas",
    }

    def compute(self, ctx: ScanContext, run: Optional[RunData] = None) -> dict:
        return cosine_on_training_points(ctx.model, ctx.empirical, ctx.train, ctx.sigmas, ctx.config.cosine_points,
                                         ctx.generator)

    def cost(self, w, sampler=None):
        """The model and D* at cosine_points noisy training images per metric sigma."""
        rows = min(w.cosine_points, w.num_train) * w.metric_sigmas
        return w.model_rows(rows) + w.empirical_rows(rows)

    def summarize(self, sc: Optional[Mapping]) -> dict:
        out = {key: None for key in self.summary_keys}
        pairs = [(s, m) for s, m in zip((sc or {}).get("sigmas") or [], (sc or {}).get("mean") or [])
                 if finite_or_none(s) is not None and finite_or_none(m) is not None]
        if pairs:
            out["score_cosine_deviation_small_sigma"] = float(min(pairs, key=lambda p: p[0])[1])
            out["score_cosine_deviation_mean"] = float(np.mean([m for _, m in pairs]))
        return out

    def validate(self, section, c, where: str) -> None:
        validate_curve(section, c, where)

    def lines(self, report: Mapping) -> list[str]:
        if self.sections(report) is None:
            return []
        summary = report.get("summary") or {}
        return [f"score-cosine deviation on noisy training points: "
                f"{fmt(summary.get('score_cosine_deviation_small_sigma'))} at the smallest sigma, "
                f"{fmt(summary.get('score_cosine_deviation_mean'))} mean over sigmas (0 = empirical score)"]

    def plots(self, report: Mapping) -> list[Plot]:
        sc = self.sections(report)
        if not sc:
            return []
        return [Plot(COSINE_PLOT, COSINE_YLABEL, [Series("training points", sc["sigmas"], sc["mean"], dash=True,
                                                         color="#000000")], include_y=(0.0,))]


COSINE_PLOT = "Score-cosine deviation 1 - cos(model, empirical)"
COSINE_YLABEL = "deviation (0 = empirical score)"
METRIC = ScoreCosine()
