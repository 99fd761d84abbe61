"""Top-k entropy of the empirical weights: H = -sum_j w_j log w_j over the k largest w_i(x, sigma), renormalised.

exp(H) is the effective number of training points steering x; H -> 0 means one training point dominates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memaudit.empirical import EmpiricalDenoiser
from memaudit.sampling import Trajectory


def topk_entropy(empirical: EmpiricalDenoiser, x: Tensor, sigma: Tensor | float, k: int) -> Tensor:
    """H(x) = -sum_{j<=k} w_j log w_j, w = softmax of the top-k logits -||x - x_i||^2 / (2 sigma^2 T); (B,) nats."""
    device = empirical.points.device
    sigma = sigma.to(device) if isinstance(sigma, Tensor) else sigma
    with torch.no_grad():
        weights = empirical.topk(x.to(device), sigma, k).weights().double()
    return torch.special.entr(weights).sum(1).clamp_min(0.0).to(x.device)


def trajectory_entropy(empirical: EmpiricalDenoiser, trajectories: list[Trajectory], k: int) -> dict:
    """Per recorded sigma: mean, median, min of H and mean exp(H) over all trajectories; final_mean = mean H at
    the last (smallest) sigma."""
    out = {"sigmas": [], "mean": [], "median": [], "min": [], "effective_points_mean": [], "final_mean": None}
    if not trajectories:
        return out
    sigmas = trajectories[0].sigmas
    if any(len(t.sigmas) != len(sigmas) for t in trajectories):
        raise ValueError("all trajectories must share the same sigma steps")
    for step, sigma in enumerate(sigmas):
        h = torch.cat([topk_entropy(empirical, t.xs[step], sigma, k).cpu() for t in trajectories])
        out["sigmas"].append(float(sigma))
        out["mean"].append(float(h.mean()))
        out["median"].append(float(h.quantile(0.5)))
        out["min"].append(float(h.min()))
        out["effective_points_mean"].append(float(h.exp().mean()))
    out["final_mean"] = out["mean"][-1] if out["mean"] else None
    return out
