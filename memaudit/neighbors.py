"""Exact k-nearest-neighbour search over flattened images with faiss (IndexFlatL2, float32, CPU).

Distances are plain L2 (not squared).  faiss computes ||q||^2 - 2 q.p + ||p||^2, which loses precision for
near-duplicates, so the distances to the k neighbours it returns are recomputed directly as ||q - p||
(bounded memory: one neighbour column at a time) and re-sorted; an exact duplicate therefore has distance 0.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
from torch import Tensor

from memaudit.errors import UserError

QUERY_FLOATS = 1 << 24  # at most ~64 MiB of float32 query rows per batch


def padded_square_radius(radius: float, largest_square_norm: float) -> float:
    """r^2 * 1.02 + 1e-5 (1 + max ||v||^2): a squared radius that rounding in ||q||^2 - 2 q.p + ||p||^2 (float32
    GEMMs) cannot push a pair within `radius` past; candidates are then checked with exact distances. At
    256x256x3 an exact copy's float32 value is at most a quarter of the padding."""
    return radius * radius * 1.02 + 1e-5 * (1.0 + largest_square_norm)


def _flat_numpy(x: Tensor) -> np.ndarray:
    """(N, ...) tensor -> C-contiguous float32 numpy array (N, d) on the CPU."""
    x = torch.as_tensor(x).detach()
    return np.ascontiguousarray(x.reshape(x.shape[0], -1).to("cpu", torch.float32).numpy())


class NeighborIndex:
    """Exact L2 index over points (M, ...), flattened; search returns sorted (distances, indices) on the CPU."""

    def __init__(self, points: Tensor):
        if points.ndim < 2 or points.shape[0] == 0:
            raise UserError("the neighbour index needs a non-empty set of points")
        flat = _flat_numpy(points)
        self.num_points, self.dim = flat.shape
        self.index = faiss.IndexFlatL2(self.dim)
        self.index.add(flat)

    def search(self, queries: Tensor, k: int, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """k nearest points per query: d_j = ||q - p_(j)|| ascending, shapes (N, k) float32 and (N, k) long."""
        if not 1 <= k <= self.num_points:
            raise UserError(f"cannot find {k} nearest neighbours among {self.num_points} points")
        flat = _flat_numpy(queries)
        if flat.shape[1] != self.dim:
            raise UserError(f"query dimension {flat.shape[1]} does not match the indexed points' {self.dim}")
        batch = batch_size or max(1, min(4096, QUERY_FLOATS // max(self.dim, 1)))
        dists, idxs = [], []
        for start in range(0, flat.shape[0], batch):
            d, i = self._search_batch(flat[start:start + batch], k)
            dists.append(d)
            idxs.append(i)
        if not dists:
            return torch.empty((0, k)), torch.empty((0, k), dtype=torch.long)
        return torch.from_numpy(np.concatenate(dists)), torch.from_numpy(np.concatenate(idxs))

    def points(self, start: int, stop: int) -> np.ndarray:
        """Indexed points start:stop as a float32 array (a copy)."""
        return self.index.reconstruct_n(start, stop - start)

    unit = 1.0  # faiss's coordinates are `unit` times ours (memaudit.ivf.ByteIVFIndex holds bytes)
    largest_square_norm = 0.0  # of the indexed points, in faiss's units, where the padding needs it

    def pairs_within(self, queries: np.ndarray, radius: float) -> list[tuple[int, int]]:
        """(query row, point index) pairs with ||q - p|| <= radius, distances checked exactly.

        faiss's range search proposes candidates within a padded radius (its ||q||^2 - 2 q.p + ||p||^2 rounds;
        exact copies may come out slightly positive); each candidate is kept only if its exact distance fits.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scaled = self._faiss_queries(queries)
        scale = float(np.einsum("nd,nd->n", scaled, scaled, dtype=np.float64).max(initial=0.0))
        padded = padded_square_radius(radius * self.unit, max(scale, self.largest_square_norm))
        lims, _, idx = self.index.range_search(scaled, padded)
        rows = np.repeat(np.arange(queries.shape[0]), np.diff(lims.astype(np.int64)))
        if len(idx) == 0:
            return []
        diff = queries[rows].astype(np.float64) - self._exact_rows(idx)  # exact: no rounding
        dist = np.sqrt(np.einsum("nd,nd->n", diff, diff, dtype=np.float64))
        keep = dist <= radius
        return list(zip(rows[keep].tolist(), idx[keep].astype(np.int64).tolist()))

    def _faiss_queries(self, q: np.ndarray) -> np.ndarray:
        """Query rows in faiss's coordinates (here the same)."""
        return q

    def _exact_rows(self, ids: np.ndarray) -> np.ndarray:
        """The indexed points at `ids` (n, d), as the exact re-check reads them."""
        return self.index.reconstruct_batch(ids)

    def _candidates(self, q: np.ndarray, k: int) -> np.ndarray:
        """The k candidate indices per query row (faiss's own ranking)."""
        return self.index.search(self._faiss_queries(q), k)[1]

    def _search_batch(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss search, then exact distances to the k candidates and a stable re-sort."""
        idx = self._candidates(q, k)
        dist = np.empty(idx.shape, dtype=np.float32)
        for j in range(k):
            diff = q.astype(np.float64) - self._exact_rows(idx[:, j])  # float64: exact differences
            dist[:, j] = np.sqrt(np.maximum(np.einsum("nd,nd->n", diff, diff, dtype=np.float64), 0.0))
        order = np.argsort(dist, axis=1, kind="stable")
        return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1).astype(np.int64)
