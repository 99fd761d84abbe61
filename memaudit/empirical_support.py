"""The weight support of the empirical denoiser: the few training points that carry all but tol of the softmax.

w_i = softmax_i(l_i) with l_i = -||x - x_i||^2 / (2 v).  Every point outside the top S by logit has l_i <= l_(S),
so the weight the top S leave out is at most (M - S) exp(l_(S) - logsumexp(l_(1..S))), a proven bound.  Where it
is <= tol, sums over the training set (D*, its Jacobian) can run on the S points instead of all M: one streamed
pass finds them, then every power iteration of the Jacobian is O(S d) instead of O(M d) (issue 12, item 5).
Centred on the support, J v = sum_i w_i (x_i - D)((x_i - D).v) / v has no cancellation: a single dominant point
gives exactly 0, where the uncentred E[x x^T v] - D (D.v) leaves float32 rounding of size eps ||x||^2 / v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from memaudit.denoiser import as_sigma

DEFAULT_TOLERANCE = 1e-7  # the largest share of the softmax weight the support may leave out (proven bound)
DEFAULT_BUDGET = 64 * 2**20  # bytes the gathered support points (B, S, d) may take


@dataclass
class Support:
    """Weights (B, S), their points centred on their weighted mean D, x_i - D (B, S, d), and the softmax
    variance v (B, 1) of each row."""

    weights: Tensor
    centred: Tensor
    variance: Tensor

    @property
    def size(self) -> int:
        return self.weights.shape[1]

    def jvp(self, v: Tensor) -> Tensor:
        """J v = sum_i w_i c_i (c_i . v) / var with c_i = x_i - D, the centred covariance times v; v (B, ...)."""
        vf = v.reshape(v.shape[0], -1).to(self.centred.dtype)
        jv = torch.einsum("bs,bsd->bd", self.weights * torch.einsum("bsd,bd->bs", self.centred, vf), self.centred)
        return (jv / self.variance).reshape(v.shape).to(v.dtype)


def smallest_support(logits: Tensor, num_points: int, tol: float) -> Optional[int]:
    """The smallest S for which (M - S) exp(l_(S) - logsumexp(l_(1..S))) <= tol holds in every row of the
    descending top logits (B, S_max); None when even S_max does not bound the rest (S_max = M needs no bound)."""
    size = logits.shape[1]
    if size >= num_points:
        return num_points
    s = torch.arange(1, size + 1, device=logits.device, dtype=torch.float64)
    top = logits.double()
    log_bound = torch.log(num_points - s) + top - torch.logcumsumexp(top, 1)
    holds = log_bound <= math.log(tol)
    if not bool(holds.any(1).all()):
        return None
    return int(holds.double().argmax(1).max()) + 1  # the first S that holds, in the worst row


def find_support(empirical, x: Tensor, sigma: Tensor | float, tol: float = DEFAULT_TOLERANCE,
                 budget_bytes: int = DEFAULT_BUDGET) -> Optional[Support]:
    """The support of the softmax weights of the plain empirical denoiser at (x, sigma), or None when no S that
    fits the memory budget bounds the left-out weight by tol (or the denoiser is a kNN variant, already restricted)."""
    if empirical.k is not None:
        return None
    xf = x.reshape(x.shape[0], -1).to(empirical.dtype)
    sigma = as_sigma(sigma, xf)
    per_point = xf.shape[0] * xf.shape[1] * xf.element_size()
    cap = min(empirical.num_points, max(1, budget_bytes // max(per_point, 1)))
    top = empirical.topk(xf, sigma, cap)
    size = smallest_support(top.logits, empirical.num_points, tol)
    if size is None:
        return None
    idx = top.indices[:, :size]
    logits = empirical.logits_at(xf, sigma, idx)  # exact distances on the support
    weights, points = torch.softmax(logits, 1), empirical.gather(idx)
    points -= torch.einsum("bs,bsd->bd", weights, points)[:, None, :]  # centred once, in place
    return Support(weights, points, empirical.variance(xf, sigma))
