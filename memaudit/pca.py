"""Principal directions of a set of images, fitted in bounded memory (the FID proxy, the duplicate search).

The fit images (at most MAX_PCA_FIT, evenly spaced, and at most FIT_BYTES of float32) are held once; the
covariance, or for more pixels than images the Gram matrix, is summed in float64 over chunks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from memaudit.storage import rows_per_chunk

MAX_PCA_FIT = 5000
FIT_BYTES = 64 * 2**20  # the PCA fit's images, held as float32: fewer than MAX_PCA_FIT for large images


def eigh(c: Tensor, overwrite: bool = False) -> tuple[Tensor, Tensor]:
    """eigh of the symmetric part of c; for a degenerate matrix eigh may not converge (repeated eigenvalues of
    duplicated images): then retried with a ridge of 1e-12 x the mean diagonal, then by SVD (c is PSD).
    overwrite: c itself is symmetrised (one d x d copy fewer)."""
    sym = c.add_(c.T.clone()).mul_(0.5) if overwrite else (c + c.T) / 2
    try:
        return torch.linalg.eigh(sym)
    except torch.linalg.LinAlgError:
        pass
    ridge = 1e-12 * float(sym.diagonal().abs().mean().clamp_min(1e-300))
    try:
        vals, vecs = torch.linalg.eigh(sym + ridge * torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device))
        return vals - ridge, vecs
    except torch.linalg.LinAlgError:
        u, vals, _ = torch.linalg.svd(sym)
        return vals.flip(0), u.flip(1)


def pca_basis(train: Tensor, dims: int = 64, max_fit: int = MAX_PCA_FIT) -> tuple[Tensor, Tensor]:
    """Training mean and the top min(dims, M-1, d, rank) principal directions (d, r), float64; fitted on at most
    max_fit evenly spaced training images (directions with a variance below 1e-10 of the largest are dropped:
    duplicated images give a rank-deficient set). The fit images are held once, as float32; the covariance
    (or, for d > rows, the Gram matrix) is accumulated in float64 over chunks, never a float64 copy of them."""
    d = int(math.prod(train.shape[1:]))
    max_fit = min(max_fit, max(dims + 1, FIT_BYTES // (4 * d)))
    rows = (torch.linspace(0, train.shape[0] - 1, max_fit).round().long() if train.shape[0] > max_fit
            else slice(None))
    flat = train[rows].reshape(-1, d)
    n = flat.shape[0]
    mean = sum(flat[a:b].double().sum(0) for a, b in _chunks(n, rows_per_chunk(d, n, 8))) / n
    gram = d > n  # Gram trick: eigenvectors of Xc Xc^T mapped back through Xc^T
    if gram:
        cols = list(_chunks(d, rows_per_chunk(n, d, 8)))  # column blocks of Xc, each as float64
        centred = lambda a, b: flat[:, a:b].double() - mean[a:b]  # noqa: E731
        vals, vecs = eigh(_sum_of_products((centred(a, b) for a, b in cols), n, gram=True), overwrite=True)
    else:
        blocks = (flat[a:b].double() - mean for a, b in _chunks(n, rows_per_chunk(d, n, 8)))
        cov = _sum_of_products(blocks, d, gram=False)
        flat = blocks = None  # the fit images are not needed for the eigenvectors of the covariance
        vals, vecs = eigh(cov, overwrite=True)
    rank = int((vals > 1e-10 * vals.max().clamp_min(1e-300)).sum())
    r = max(1, min(dims, n - 1, d, rank))
    if gram:
        scale = vals[-r:].clamp_min(1e-300).sqrt()
        basis = torch.cat([centred(a, b).T @ vecs[:, -r:] for a, b in cols]) / scale
    else:
        basis = vecs[:, -r:]
    return mean, basis.flip(1)


def _sum_of_products(blocks, size: int, gram: bool) -> Tensor:
    """sum of x x^T (gram) or x^T x over float64 blocks x, accumulated in place into one (size, size) matrix."""
    out = None
    for x in blocks:
        if out is None:
            out = torch.zeros((size, size), dtype=torch.float64, device=x.device)
        out.addmm_(x, x.T) if gram else out.addmm_(x.T, x)
    return out


def _chunks(total: int, step: int):
    """(start, stop) blocks of `step` covering range(total)."""
    return ((a, min(a + step, total)) for a in range(0, total, max(1, step)))


