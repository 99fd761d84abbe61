"""Top-k entropy of the empirical weights: H = -sum_j w_j log w_j over the k largest w_i(x, sigma), renormalised.

exp(H) is the effective number of training points steering x; H -> 0 means one training point dominates.
With near-duplicate clusters the weights of one cluster's members are summed first, so an image held twice
counts once (a copy of it has exp(H) -> 1, not 2).  collapse_sigma, the noise level where one training image
takes over the sampling path (mean exp(H) < 2), is located by bisection along each recorded path, between the
sampler steps, not only at them.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from memaudit.empirical import EmpiricalDenoiser
from memaudit.metrics.base import RUN, Column, Metric, Plot, RunData, ScanContext, Series
from memaudit.numbers import finite_or_none
from memaudit.sampling import Trajectory

COLLAPSE_POINTS = 2.0  # effective number of training points exp(H) below which one image has taken over
BISECTION_STEPS = 10
EntropyFn = Callable[[Tensor, float], Tensor]  # H (nats) of each row of x at sigma


def cluster_weights(weights: Tensor, indices: Tensor, labels: Optional[Tensor]) -> Tensor:
    """Weights (B, k) with each cluster's members summed into its first (highest) entry, the others 0."""
    if labels is None:
        return weights
    lab = labels.to(indices.device)[indices]
    same = lab[:, :, None] == lab[:, None, :]  # (B, k, k)
    earlier = torch.tril(torch.ones_like(same[0]), diagonal=-1)  # j' < j
    first = ~(same & earlier).any(2)  # no earlier member of the same cluster
    summed = (same.to(weights.dtype) * weights[:, None, :]).sum(2)
    return torch.where(first, summed, torch.zeros_like(summed))


def topk_entropy(empirical: EmpiricalDenoiser, x: Tensor, sigma: Tensor | float, k: int,
                 labels: Optional[Tensor] = None) -> Tensor:
    """H(x) = -sum_{j<=k} w_j log w_j, w = softmax of the top-k logits -||x - x_i||^2 / (2 sigma^2 T), members
    of one near-duplicate cluster (same `labels`) summed; (B,) nats."""
    device = empirical.points_device
    sigma = sigma.to(device) if isinstance(sigma, Tensor) else sigma
    with torch.no_grad():
        top = empirical.topk(x.to(device), sigma, k)
        weights = cluster_weights(top.weights().double(), top.indices, labels)
    return torch.special.entr(weights).sum(1).clamp_min(0.0).to(x.device)


def _mean_points(entropy_of: EntropyFn, xs: list[Tensor], sigma: float) -> float:
    """Mean exp(H) over all rows of `xs` at `sigma`."""
    return float(entropy_of(torch.cat(xs), sigma).cpu().exp().mean())


def collapse_sigma(entropy_of: EntropyFn, trajectories: list[Trajectory], sigmas: list[float],
                   points: list[float], below: float = COLLAPSE_POINTS, steps: int = BISECTION_STEPS) -> float:
    """The largest sigma where the mean exp(H) along the paths drops below `below` (0 if it never does).

    Between the last step still above `below` and the first below it, x(sigma) follows the chord between the
    two recorded points of each path, and the crossing is bisected in log sigma (`steps` halvings)."""
    first = next((i for i, p in enumerate(points) if math.isfinite(p) and p < below), None)
    if first is None:
        return 0.0
    if first == 0:
        return float(sigmas[0])
    hi, lo = float(sigmas[first - 1]), float(sigmas[first])  # mean exp(H) >= below at hi, < below at lo
    s_hi, s_lo = hi, lo
    for _ in range(steps):
        mid = math.sqrt(s_hi * s_lo)
        t = (mid - hi) / (lo - hi)
        xs = [(1 - t) * tr.xs[first - 1] + t * tr.xs[first] for tr in trajectories]
        if _mean_points(entropy_of, xs, mid) < below:
            s_lo = mid
        else:
            s_hi = mid
    return float(math.sqrt(s_hi * s_lo))


def trajectory_entropy(empirical: EmpiricalDenoiser, trajectories: list[Trajectory], k: int,
                       labels: Optional[np.ndarray | Tensor] = None,
                       entropy_of: Optional[EntropyFn] = None) -> dict:
    """Per recorded sigma: mean, median, min of H and mean exp(H) over all trajectories; final_mean = mean H at
    the last (smallest) sigma; collapse_sigma as located by `collapse_sigma`. `entropy_of(x, sigma)`: H of each
    row (default topk_entropy here; the scan shares the rows among torchrun ranks, memaudit.shared_rows)."""
    out = {"sigmas": [], "mean": [], "median": [], "min": [], "effective_points_mean": [], "final_mean": None,
           "collapse_sigma": None}
    if not trajectories:
        return out
    labels = torch.as_tensor(labels) if labels is not None else None
    entropy_of = entropy_of or (lambda x, sigma: topk_entropy(empirical, x, sigma, k, labels))
    sigmas = trajectories[0].sigmas
    if any(len(t.sigmas) != len(sigmas) for t in trajectories):
        raise ValueError("all trajectories must share the same sigma steps")
    for step, sigma in enumerate(sigmas):
        h = entropy_of(torch.cat([t.xs[step] for t in trajectories]), sigma).cpu()
        out["sigmas"].append(float(sigma))
        out["mean"].append(float(h.mean()))
        out["median"].append(float(h.quantile(0.5)))
        out["min"].append(float(h.min()))
        out["effective_points_mean"].append(float(h.exp().mean()))
    out["final_mean"] = out["mean"][-1] if out["mean"] else None
    out["collapse_sigma"] = collapse_sigma(entropy_of, trajectories, out["sigmas"], out["effective_points_mean"])
    return out


def grid_collapse_sigma(sigmas, effective_points, below: float = COLLAPSE_POINTS) -> float:
    """The first recorded sigma (descending) at which mean exp(H) < `below`; 0 if it never drops (a section
    without a bisected collapse_sigma)."""
    for sigma, points in zip(sigmas, effective_points):
        if finite_or_none(points) is not None and float(points) < below and finite_or_none(sigma) is not None:
            return float(sigma)
    return 0.0


def section_collapse(ent: Mapping) -> float:
    """A section's collapse_sigma: the bisected value, else the first step below two effective points."""
    value = finite_or_none(ent.get("collapse_sigma"))
    return value if value is not None else grid_collapse_sigma(ent.get("sigmas") or [],
                                                               ent.get("effective_points_mean") or [])


class Entropy(Metric):
    name = "entropy"
    scope = RUN
    title = "Top-K entropy of the empirical weights"
    needs_trajectories = True
    summary_keys = {
        "final_entropy": "min over runs of `entropy.final_mean` (nats); at the smallest sigma this is ~0 for every "
                         "model, since any image is close to one training point at that noise level",
        "collapse_sigma": "max over runs of `entropy.collapse_sigma`: the noise level where a single training image "
                          "takes over the trajectory (0 if it never does), located between the sampler's steps. "
                          "Memorizing models collapse early (large sigma)",
    }
    columns = (Column("collapse sigma", lambda s: section_collapse(s) if s.get("sigmas") else None, digits=3),)

    def compute(self, ctx: ScanContext, run: Optional[RunData] = None) -> dict:
        k, labels = ctx.config.topk, ctx.duplicates.labels
        return trajectory_entropy(ctx.empirical, run.trajectories, k, labels,
                                  lambda x, sigma: ctx.map_rows("topk_entropy", (x,), (float(sigma), k, labels)))

    def cost(self, w, sampler=None):
        """Top-k logits (one GEMM, 2 M d) at every recorded step, and BISECTION_STEPS more for collapse_sigma."""
        return w.search_rows(w.record * (w.steps + BISECTION_STEPS))

    def summarize(self, sections: Mapping[str, Mapping]) -> dict:
        finals = [float(e["final_mean"]) for e in sections.values() if finite_or_none(e.get("final_mean")) is not None]
        collapses = [section_collapse(e) for e in sections.values() if e.get("sigmas")]
        return {"final_entropy": min(finals) if finals else None,
                "collapse_sigma": max(collapses) if collapses else None}

    def validate(self, section, c, where: str) -> None:
        c.curves(section, where, ("mean", "median", "min", "effective_points_mean"))
        c.dict(section, where, ("final_mean",))
        c.num(section["final_mean"], f"{where}.final_mean", nullable=True)
        if "collapse_sigma" in section:
            c.num(section["collapse_sigma"], f"{where}.collapse_sigma", nullable=True)

    def lines(self, report: Mapping) -> list[str]:
        if not self.sections(report):
            return []
        return ["collapse sigma = noise level where one training image takes over the sampling path (fewer than 2 "
                "effective points; larger = earlier)"]

    def plots(self, report: Mapping) -> list[Plot]:
        sections = self.sections(report)
        entropy, points = [], []
        for name in sorted(sections):
            ent = sections[name]
            entropy += [Series(f"{name} mean", ent["sigmas"], ent["mean"], run=name),
                        Series(f"{name} min", ent["sigmas"], ent["min"], run=name, dash=True)]
            points.append(Series(name, ent["sigmas"], ent["effective_points_mean"], run=name))
        if not entropy:
            return []
        positive = [finite_or_none(v) for s in points for v in s.y]
        return [Plot("Top-K entropy along the trajectory", "entropy (nats)", entropy, include_y=(0.0,)),
                Plot("Effective number of training points, mean exp(H)", "exp(H)", points,
                     logy=all(v is None or v > 0 for v in positive), include_y=(1.0,))]


METRIC = Entropy()
