"""The empirical (closed-form) denoiser of a training set {x_i}, optionally temperature-smoothed and kNN-restricted.

w_i(x, sigma; T) = softmax_i(-||x - x_i||^2 / (2 v)),  v = sigma^2 T,  D*_T(x, sigma) = sum_i w_i x_i,
dD*/dx = Cov_w(x_i) / v.  An optional bandwidth floor h uses v = max(sigma^2 T, h^2) instead, so the weights
stop sharpening below sigma = h / sqrt(T) (h = None or 0 is the plain D*_T).  Computed as chunked GEMMs with a streaming log-sum-exp
(||x - x_i||^2 = ||x||^2 - 2 x.x_i + ||x_i||^2; the ||x||^2 term cancels in the softmax), so no B x M
matrix is ever held when M is large.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from memaudit.denoiser import Denoiser, as_sigma
from memaudit.errors import UserError
from memaudit.storage import ImageStore, rows_per_chunk

DEFAULT_CHUNK = 4096
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e6  # beyond these sigma^2 T under- or overflows float32


@dataclass
class TopK:
    """The k largest log-weights (unnormalised logits) per row and their training-set indices, descending."""

    logits: Tensor  # (B, k)
    indices: Tensor  # (B, k) long

    def weights(self) -> Tensor:
        """Weights renormalised over the top k: softmax of the k logits."""
        return torch.softmax(self.logits, dim=1)


class EmpiricalDenoiser(Denoiser):
    """D*_T(x, sigma) over a training tensor (M, C, H, W); `k` restricts the sum to the k nearest points;
    `bandwidth` h floors the softmax variance: max(sigma^2 T, h^2).

    The k-nearest sum renormalises over the top k, which drops the weight mass of the other M - k points.
    `tail` L adds L fixed random non-neighbours, each weighed (M - k) / L' against 1 for a neighbour (L' of the
    L outside the top k for that x), the unbiased estimate of the closed-form diffusion literature (DEANN-style
    random tail); `truncated_mass` estimates the mass the plain top-k sum drops."""

    def __init__(self, train: Tensor, temperature: float = 1.0, k: Optional[int] = None,
                 chunk_size: int = DEFAULT_CHUNK, bandwidth: Optional[float] = None, tail: Optional[int] = None,
                 seed: int = 0):
        super().__init__()
        if len(train.shape) != 4 or train.shape[0] == 0:
            raise UserError("the empirical model needs a non-empty training set of shape (M, C, H, W)")
        if not (math.isfinite(temperature) and MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
            raise UserError(f"temperature T must be a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                            f"not {temperature}")
        if k is not None and k < 1:
            raise UserError(f"k must be >= 1, not {k}")
        if bandwidth is not None and not (math.isfinite(bandwidth) and 0 <= bandwidth <= MAX_TEMPERATURE):
            raise UserError(f"bandwidth h must be a number in [0, {MAX_TEMPERATURE:g}], not {bandwidth}")
        if chunk_size < 1:
            raise UserError(f"chunk must be >= 1 training images per chunk, not {chunk_size}")
        if tail is not None and (k is None or tail < 1):
            raise UserError(f"tail={tail} needs k (the tail samples the images beyond the k nearest) and tail >= 1")
        self.bandwidth = float(bandwidth) if bandwidth else None
        self.image_shape = tuple(train.shape[1:])
        self.temperature = float(temperature)
        self.k = None if k is None else min(int(k), train.shape[0])
        self.chunk_size = rows_per_chunk(int(math.prod(train.shape[1:])), int(chunk_size))
        if isinstance(train, ImageStore) and not train.is_bytes:
            train = train.raw
        self.store = train if isinstance(train, ImageStore) else None
        if self.store is not None:  # uint8 bytes: each chunk converted to float32 when read (memaudit.storage)
            self.register_buffer("points", None, persistent=False)
            norms = [-(rows * rows).sum(1) for _, _, rows in self.store.chunks(self.chunk_size)]
            self.register_buffer("neg_sq_norms", torch.cat(norms), persistent=False)
        else:
            flat = train.reshape(train.shape[0], -1).contiguous()
            self.register_buffer("points", flat, persistent=False)
            self.register_buffer("neg_sq_norms", -(flat * flat).sum(1), persistent=False)
        self.sigma_min, self.sigma_max = 0.002, 80.0
        tail_idx = (torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))[: int(tail)]
                    if tail else torch.empty(0, dtype=torch.long))
        self.register_buffer("tail_indices", tail_idx, persistent=False)

    @classmethod
    def from_spec(cls, spec: str, train: Optional[Tensor]) -> "EmpiricalDenoiser":
        """Build from 'empirical', 'empirical:T=2', 'empirical:T=2,k=64', 'empirical:T=2,k=64,h=0.5' (also chunk=N)."""
        if train is None:
            raise UserError("the empirical model needs training data")
        return cls(train, **parse_empirical_spec(spec))

    @property
    def num_points(self) -> int:
        return len(self.store) if self.points is None else self.points.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.points is None else self.points.dtype

    @property
    def points_device(self) -> torch.device:
        return self.store.device if self.points is None else self.points.device

    def rows(self, start: int, stop: int, reuse: bool = False) -> Tensor:
        """Training rows start:stop as float (d,) vectors: a view, or converted from the uint8 store (reuse: into
        the store's shared buffer, overwritten by the next call of any of its users (the other empirical
        denoisers and the neighbour index): only where the rows are consumed at once, not kept e.g. for autograd)."""
        if self.points is not None:
            return self.points[start:stop]
        if not reuse:
            return self.store.rows(start, stop)
        return self.store.rows(start, stop, out=self.store.shared_buffer(stop - start))

    def gather(self, idx: Tensor) -> Tensor:
        """Training rows at indices of any shape: idx.shape + (d,)."""
        return self.store.gather_rows(idx) if self.points is None else self.points[idx]

    def variance(self, x: Tensor, sigma: Tensor) -> Tensor:
        """The softmax variance v = sigma^2 T, floored at h^2 when a bandwidth is set, as a (B, 1) column."""
        var = (sigma.to(x.dtype) ** 2 * self.temperature).reshape(-1, 1)
        return var.clamp(min=self.bandwidth ** 2) if self.bandwidth else var

    def inverse_scale(self, x: Tensor, sigma: Tensor) -> Tensor:
        """1 / (2 v) as a (B, 1) column (v = sigma^2 T, or max(sigma^2 T, h^2) with a bandwidth floor)."""
        return 1.0 / (2.0 * self.variance(x, sigma))

    def chunk_logits(self, xf: Tensor, start: int, stop: int, inv: Tensor) -> Tensor:
        """Logits -(||x_i||^2 - 2 x.x_i) / (2 sigma^2 T) for training rows start:stop, shape (B, stop-start)."""
        reuse = not (torch.is_grad_enabled() and xf.requires_grad)
        return torch.addmm(self.neg_sq_norms[start:stop], xf, self.rows(start, stop, reuse).T, alpha=2.0) * inv

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        xf = x.reshape(x.shape[0], -1).to(self.dtype)
        sigma = as_sigma(sigma, xf)
        out = self._knn_denoise(xf, sigma) if self.k is not None else self._stream(xf, sigma)[0]
        return out.reshape(x.shape).to(x.dtype)

    def _stream(self, xf: Tensor, sigma: Tensor, v: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """One pass of streaming log-sum-exp: returns sum_i w_i x_i and, if v is given, sum_i w_i x_i (x_i.v)."""
        inv = self.inverse_scale(xf, sigma)
        run_max = torch.full((xf.shape[0], 1), -torch.inf, dtype=xf.dtype, device=xf.device)
        run_sum = torch.zeros_like(run_max)
        acc = torch.zeros_like(xf)
        acc_v = torch.zeros_like(xf) if v is not None else None
        inplace = not (torch.is_grad_enabled() and xf.requires_grad)  # in-place updates break autograd
        for start in range(0, self.num_points, self.chunk_size):
            stop = min(start + self.chunk_size, self.num_points)
            pts = self.rows(start, stop, reuse=inplace)
            logits = torch.addmm(self.neg_sq_norms[start:stop], xf, pts.T, alpha=2.0) * inv
            new_max = torch.maximum(run_max, logits.amax(1, keepdim=True))
            rescale = torch.exp(run_max - new_max)
            if inplace:
                e = logits.sub_(new_max).exp_()
                run_sum.mul_(rescale).add_(e.sum(1, keepdim=True))
                acc.mul_(rescale).addmm_(e, pts)
                if v is not None:
                    acc_v.mul_(rescale).addmm_(e * (v @ pts.T), pts)
            else:
                e = torch.exp(logits - new_max)
                run_sum = run_sum * rescale + e.sum(1, keepdim=True)
                acc = torch.addmm(acc * rescale, e, pts)
                if v is not None:
                    acc_v = torch.addmm(acc_v * rescale, e * (v @ pts.T), pts)
            run_max = new_max
        return acc / run_sum, (acc_v / run_sum if v is not None else None)

    def topk(self, x: Tensor, sigma: Tensor | float, k: int) -> TopK:
        """The k largest empirical logits per sample (= its k nearest training points), streamed over chunks."""
        xf = x.reshape(x.shape[0], -1).to(self.dtype)
        inv = self.inverse_scale(xf, as_sigma(sigma, xf))
        k = min(int(k), self.num_points)
        best_val = torch.empty((xf.shape[0], 0), dtype=xf.dtype, device=xf.device)
        best_idx = torch.empty((xf.shape[0], 0), dtype=torch.long, device=xf.device)
        for start in range(0, self.num_points, self.chunk_size):
            stop = min(start + self.chunk_size, self.num_points)
            logits = self.chunk_logits(xf, start, stop, inv)
            idx = torch.arange(start, stop, device=xf.device).expand(xf.shape[0], -1)
            vals = torch.cat([best_val, logits], 1)
            cand = torch.cat([best_idx, idx], 1)
            best_val, pos = vals.topk(min(k, vals.shape[1]), dim=1)
            best_idx = cand.gather(1, pos)
        return TopK(best_val, best_idx)

    def _knn(self, xf: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Weights (B, n) and points (B, n, d) of the k nearest training points (exact distances on them), and
        with a random tail its members too (n = k + L, tail members inside the top k weighed 0)."""
        idx = self.topk(xf, sigma, self.k).indices
        if not len(self.tail_indices):
            return self.knn_weights(xf, sigma, idx), self.gather(idx)
        tail = self.tail_indices.to(idx.device).expand(idx.shape[0], -1)
        outside = ~(tail[:, :, None] == idx[:, None, :]).any(2)  # (B, L): tail members not among the top k
        factor = (self.num_points - idx.shape[1]) / outside.sum(1, keepdim=True).clamp_min(1)
        both = torch.cat([idx, tail], 1)
        logits = self.logits_at(xf, sigma, both)
        log_scale = torch.cat([torch.zeros_like(idx, dtype=logits.dtype),
                               torch.where(outside, factor.log().to(logits.dtype),
                                           torch.full_like(factor, -torch.inf).expand_as(tail))], 1)
        return torch.softmax(logits + log_scale, dim=1), self.gather(both)

    def _knn_denoise(self, xf: Tensor, sigma: Tensor) -> Tensor:
        """D* restricted to the k nearest points: sum_j w_j x_(j)."""
        w, pts = self._knn(xf, sigma)
        return torch.einsum("bk,bkd->bd", w, pts)

    def logits_at(self, xf: Tensor, sigma: Tensor, idx: Tensor) -> Tensor:
        """-||x - x_i||^2 / (2 v) for the given training indices (B, n), distances computed directly."""
        d2 = ((xf[:, None, :] - self.gather(idx)) ** 2).sum(-1)
        return -d2 * self.inverse_scale(xf, sigma)

    def nearest_distance(self, x: Tensor) -> Tensor:
        """||x - NN(x)|| per sample, NN(x) its nearest training image (exact distance); (B,)."""
        xf = x.reshape(x.shape[0], -1).to(self.dtype)
        idx = self.topk(xf, 1.0, 1).indices[:, 0]
        return (xf - self.gather(idx)).norm(dim=1)

    def truncated_mass(self, x: Tensor, sigma: Tensor | float, k: int, tail: int = 256, seed: int = 0) -> Tensor:
        """The share of the full softmax weight outside the top k, per sample: exact when tail >= M - k, else
        estimated from `tail` random non-neighbours; (B,)."""
        xf = x.reshape(x.shape[0], -1).to(self.dtype)
        sigma = as_sigma(sigma, xf)
        top = self.topk(xf, sigma, k)
        rest = torch.ones(self.num_points, dtype=torch.bool, device=xf.device).expand(xf.shape[0], -1).clone()
        rest.scatter_(1, top.indices, False)
        inside = torch.logsumexp(self.logits_at(xf, sigma, top.indices), 1)
        if self.num_points - top.indices.shape[1] <= tail:  # exact: every point outside the top k
            everyone = torch.arange(self.num_points, device=xf.device).expand(xf.shape[0], -1)
            outside = torch.logsumexp(self.logits_at(xf, sigma, everyone).masked_fill(~rest, -torch.inf), 1)
        else:
            pick = torch.randperm(self.num_points, generator=torch.Generator().manual_seed(seed))[:tail]
            pick = pick.to(xf.device).expand(xf.shape[0], -1)
            keep = rest.gather(1, pick)
            logits = self.logits_at(xf, sigma, pick).masked_fill(~keep, -torch.inf)
            scale = (self.num_points - top.indices.shape[1]) / keep.sum(1).clamp_min(1)
            outside = torch.logsumexp(logits, 1) + scale.log().to(logits.dtype)
        return torch.sigmoid(outside - inside)

    def knn_weights(self, xf: Tensor, sigma: Tensor, idx: Tensor) -> Tensor:
        """softmax over the given neighbours of -||x - x_i||^2 / (2 v), distances computed directly."""
        return torch.softmax(self.logits_at(xf, sigma, idx), dim=1)

    def jvp(self, x: Tensor, sigma: Tensor | float, v: Tensor) -> Tensor:
        """J v = (sum_i w_i x_i (x_i.v) - D (D.v)) / v_sigma, the analytic Jacobian-vector product
        (v_sigma = sigma^2 T, or max(sigma^2 T, h^2) with a bandwidth floor)."""
        xf = x.reshape(x.shape[0], -1).to(self.dtype)
        vf = v.reshape(v.shape[0], -1).to(self.dtype)
        sigma = as_sigma(sigma, xf)
        if self.k is not None:
            w, pts = self._knn(xf, sigma)
            mean = torch.einsum("bk,bkd->bd", w, pts)
            second = torch.einsum("bk,bkd->bd", w * torch.einsum("bkd,bd->bk", pts, vf), pts)
        else:
            mean, second = self._stream(xf, sigma, vf)
        jv = second - mean * (mean * vf).sum(1, keepdim=True)
        return (jv / self.variance(xf, sigma)).reshape(x.shape).to(x.dtype)


def parse_empirical_spec(spec: str) -> dict:
    """'empirical:T=2,k=64,h=0.5' -> {'temperature': 2.0, 'k': 64, 'bandwidth': 0.5}; UserError on anything else.

    Keys: T (temperature), k, h (bandwidth floor), tail (random non-neighbours beyond k), chunk, and kernel=h,
    samples=S for the kernel-smoothed model (memaudit.smoothing.kernel; built by memaudit.models.load)."""
    name, _, args = spec.partition(":")
    if name.strip().lower() != "empirical":
        raise UserError(f"not an empirical model spec: {spec!r}")
    out: dict = {}
    keys = {"t": ("temperature", float), "temperature": ("temperature", float), "k": ("k", int),
            "chunk": ("chunk_size", int), "h": ("bandwidth", float), "bandwidth": ("bandwidth", float),
            "tail": ("tail", int), "kernel": ("kernel", float), "samples": ("samples", int)}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key.strip().lower() not in keys:
            raise UserError(f"bad empirical option {item!r} in {spec!r}; use e.g. empirical:T=2,k=64,h=0.5")
        field, cast = keys[key.strip().lower()]
        if field in out:
            raise UserError(f"{spec!r} sets {field} twice; give each option once")
        try:
            out[field] = cast(value)
        except ValueError:
            raise UserError(f"bad value {value!r} for {key} in {spec!r}") from None
    return out
