"""The weight support of the empirical denoiser: the few training points that carry all but tol of the softmax.

w_i = softmax_i(l_i) with l_i = -||x - x_i||^2 / (2 v).  Every point outside the top S by logit has l_i <= l_(S),
so the weight the top S leave out is at most (M - S) exp(l_(S) - logsumexp(l_(1..S))), a proven bound.  Where it
is <= tol, sums over the training set (D*, its Jacobian) can run on the S points instead of all M: one streamed
pass finds them, then every power iteration of the Jacobian is O(S d) instead of O(M d) (issue 12, item 5).
Centred on the support, J v = sum_i w_i (x_i - D)((x_i - D).v) / v has no cancellation: a single dominant point
gives exactly 0, where the uncentred E[x x^T v] - D (D.v) leaves float32 rounding of size eps ||x||^2 / v.

Where the weight is spread (a large sigma) and all B x M weights fit in memory, they are kept (DenseWeights): each
power iteration is then one pass of two GEMMs, t = X v - D.v and (w * t) X, where the streamed J v recomputes the
logits and D* in every pass (four GEMMs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from memaudit.denoiser import as_sigma
from memaudit.empirical import TopK

DEFAULT_TOLERANCE = 1e-7  # the largest share of the softmax weight the support may leave out (proven bound)
DEFAULT_BUDGET = 64 * 2**20  # bytes the gathered support points (B, S, d) may take
BLOCK_BYTES = 2 * 2**20  # training rows per block of DenseWeights.jvp: read twice, from cache the second time
DENSE_BUDGET = 64 * 2**20  # bytes all B x M softmax weights may take (16 points x 1M images: 64 MiB)


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
                 budget_bytes: int = DEFAULT_BUDGET, dense_bytes: int = DENSE_BUDGET):
    """What the power iteration at (x, sigma) runs on: the Support of the plain empirical denoiser's softmax
    weights where a support that fits `budget_bytes` bounds the left-out weight by tol; else DenseWeights where
    all B x M weights fit `dense_bytes`; else None (stream every pass; also for a kNN variant, already restricted)."""
    if empirical.k is not None:
        return None
    xf = x.reshape(x.shape[0], -1).to(empirical.dtype)
    sigma = as_sigma(sigma, xf)
    per_point = xf.shape[0] * xf.shape[1] * xf.element_size()
    cap = min(empirical.num_points, max(1, budget_bytes // max(per_point, 1)))
    dense = xf.shape[0] * empirical.num_points * xf.element_size() <= dense_bytes
    logits = all_logits(empirical, xf, sigma) if dense else None
    top = empirical.topk(xf, sigma, cap) if logits is None else TopK(*logits.topk(cap, dim=1))
    size = smallest_support(top.logits, empirical.num_points, tol)
    if size is None:
        return DenseWeights.of(empirical, xf, sigma, logits) if dense else None
    idx = top.indices[:, :size]
    logits = empirical.logits_at(xf, sigma, idx)  # exact distances on the support
    weights, points = torch.softmax(logits, 1), empirical.gather(idx)
    points -= torch.einsum("bs,bsd->bd", weights, points)[:, None, :]  # centred once, in place
    return Support(weights, points, empirical.variance(xf, sigma))


def all_logits(empirical, xf: Tensor, sigma: Tensor) -> Tensor:
    """The logits of every training point, (B, M), up to a per-row constant: one streamed pass of GEMMs."""
    inv = empirical.inverse_scale(xf, sigma)
    out = torch.empty((xf.shape[0], empirical.num_points), dtype=xf.dtype, device=xf.device)
    for start, stop in _chunks(empirical):
        out[:, start:stop] = empirical.chunk_logits(xf, start, stop, inv)
    return out


def _chunks(empirical):
    """(start, stop) of each chunk of the empirical denoiser's training rows."""
    for start in range(0, empirical.num_points, empirical.chunk_size):
        yield start, min(start + empirical.chunk_size, empirical.num_points)


def _blocks(empirical, row_bytes: int):
    """(start, rows) of blocks of the training rows, at most BLOCK_BYTES each, within one converted chunk."""
    step = max(1, BLOCK_BYTES // max(1, row_bytes))
    for start, stop in _chunks(empirical):
        pts = empirical.rows(start, stop, reuse=True)
        for at in range(0, stop - start, step):
            yield start + at, pts[at:at + step]


@dataclass
class DenseWeights:
    """All M softmax weights (B, M) of each row, D = sum_i w_i x_i (B, d) and the softmax variance v (B, 1), over
    the empirical denoiser's training rows."""

    empirical: object
    weights: Tensor
    mean: Tensor
    variance: Tensor

    @classmethod
    def of(cls, empirical, xf: Tensor, sigma: Tensor, logits: Tensor) -> "DenseWeights":
        """From the rows' logits (B, M), softmaxed in place; D in one more pass."""
        weights = logits.sub_(logits.amax(1, keepdim=True)).exp_()
        weights.div_(weights.sum(1, keepdim=True))
        mean = torch.zeros_like(xf)
        for start, block in _blocks(empirical, xf.shape[1] * xf.element_size()):
            mean.addmm_(weights[:, start:start + len(block)], block)
        return cls(empirical, weights, mean, empirical.variance(xf, sigma))

    def jvp(self, v: Tensor) -> Tensor:
        """J v = sum_i w_i (x_i - D) t_i / var = (sum_i w_i t_i x_i - D sum_i w_i t_i) / var, t_i = x_i.v - D.v."""
        vf = v.reshape(v.shape[0], -1).to(self.mean.dtype)
        shift = (self.mean * vf).sum(1, keepdim=True)
        second, total = torch.zeros_like(vf), torch.zeros_like(shift)
        for start, block in _blocks(self.empirical, vf.shape[1] * vf.element_size()):  # both GEMMs from cache
            wt = torch.addmm(shift, vf, block.T, beta=-1.0).mul_(self.weights[:, start:start + len(block)])  # w t
            total += wt.sum(1, keepdim=True)
            second.addmm_(wt, block)
        jv = second.sub_(self.mean * total)
        return (jv / self.variance).reshape(v.shape).to(v.dtype)
