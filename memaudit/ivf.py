"""Approximate neighbour search for millions of training images: faiss IVF (inverted file, Jegou et al. 2011).

k-means (faiss, fixed seed) cuts the training set into `nlist` cells; a query scans the `nprobe` cells nearest to
it, about nprobe / nlist of the set, so a true neighbour in an unscanned cell is missed.  The k candidates it does
return get the exact distance re-check of memaudit.neighbors.NeighborIndex.  Scanning every cell (nprobe = nlist)
is exact, which is how the recall is measured on a subset of queries (memaudit.metrics.index_recall) without a
second copy of the training set.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional

import faiss
import numpy as np
import torch
from torch import Tensor

from memaudit.errors import UserError
from memaudit.neighbors import NeighborIndex, _flat_numpy
from memaudit.resources import check_fits
from memaudit.storage import BYTE_SCALE, ImageStore, rows_per_chunk

MIN_PER_CELL = 39  # faiss warns below 39 training points per centroid
TRAIN_PER_CELL = 256  # k-means is trained on at most this many points per cell
KMEANS_SEED = 1234
DEFAULT_NPROBE = 32
ADD_ROWS = 1 << 16
TRAIN_BYTES = 256 * 2**20  # the float32 k-means sample of a uint8 set takes at most this (but 39 per cell)


def default_nlist(num_points: int) -> int:
    """4 sqrt(M) cells (faiss's rule of thumb), at least 1 and with >= 39 points per cell."""
    return max(1, min(int(4 * math.sqrt(num_points)), num_points // MIN_PER_CELL))


def checked_cells(num_points: int, nlist: Optional[int], nprobe: int = DEFAULT_NPROBE) -> tuple[int, int]:
    """(nlist, nprobe) for M points: nlist default_nlist(M) when None, in [1, M]; nprobe >= 1, at most nlist;
    UserError naming --index otherwise."""
    nlist = int(nlist) if nlist is not None else default_nlist(num_points)
    if not 1 <= nlist <= num_points:
        raise UserError(f"--index ivf: nlist must be in [1, {num_points}] (the training images), not {nlist}")
    if nprobe < 1:
        raise UserError(f"--index ivf: nprobe must be >= 1, not {nprobe}")
    return nlist, min(int(nprobe), nlist)


class IVFIndex(NeighborIndex):
    """IVF-Flat over points (M, ...), flattened; search as NeighborIndex (sorted exact distances of the candidates
    it finds), scanning `nprobe` of `nlist` cells."""

    kind = "ivf"
    approximate = True

    def __init__(self, points: Tensor, nlist: Optional[int] = None, nprobe: int = DEFAULT_NPROBE):
        if points.ndim < 2 or points.shape[0] == 0:
            raise UserError("the neighbour index needs a non-empty set of points")
        flat = _flat_numpy(points)
        self._configure(*flat.shape, nlist, nprobe)
        quantizer = faiss.IndexFlatL2(self.dim)
        self._build(quantizer, faiss.IndexIVFFlat(quantizer, self.dim, self.nlist),
                    _training_sample(flat, self.nlist),
                    (flat[start:start + ADD_ROWS] for start in range(0, self.num_points, ADD_ROWS)))
        self.index.make_direct_map()  # reconstruct(i) for the exact re-check

    def _configure(self, num_points: int, dim: int, nlist: Optional[int], nprobe: int) -> None:
        """Sizes, nlist (default_nlist when None) and nprobe, checked."""
        self.num_points, self.dim = int(num_points), int(dim)
        self.nlist, self.nprobe = checked_cells(self.num_points, nlist, nprobe)

    def _build(self, quantizer, index, sample: np.ndarray, parts) -> None:
        """k-means (fixed seed) on `sample`, then the points added part by part (float32 rows in faiss's units)."""
        index.cp.seed = KMEANS_SEED
        index.cp.min_points_per_centroid = 1  # default_nlist keeps 39 per cell; a user's nlist is theirs to choose
        index.cp.max_points_per_centroid = TRAIN_PER_CELL  # _training_sample already subsamples to this
        index.train(sample)
        for part in parts:
            index.add(part)
        index.nprobe = self.nprobe
        self.quantizer = quantizer  # the IVF index does not own it: keep it alive
        self.index = index

    def _candidates(self, q: np.ndarray, k: int) -> np.ndarray:
        """k candidates per row; a row whose scanned cells hold fewer than k points (faiss pads with -1) is searched
        again with twice the cells, up to all of them (exact)."""
        q = self._faiss_queries(q)
        idx = self.index.search(q, k)[1]
        short = np.flatnonzero((idx < 0).any(1))
        base = nprobe = self.index.nprobe
        try:
            while len(short) and nprobe < self.nlist:
                nprobe = self.index.nprobe = min(2 * nprobe, self.nlist)
                idx[short] = self.index.search(np.ascontiguousarray(q[short]), k)[1]
                short = short[(idx[short] < 0).any(1)]
        finally:
            self.index.nprobe = base
        return idx

    @contextmanager
    def exhaustive(self):
        """Scan every cell inside the block (exact search), then restore nprobe."""
        self.index.nprobe = self.nlist
        try:
            yield self
        finally:
            self.index.nprobe = self.nprobe

    def describe(self) -> dict:
        return {"kind": self.kind, "nlist": self.nlist, "nprobe": self.nprobe,
                "scanned_fraction": self.nprobe / self.nlist}


def _training_sample(flat: np.ndarray, nlist: int) -> np.ndarray:
    """Evenly spaced rows, at most TRAIN_PER_CELL per cell, for k-means."""
    return np.ascontiguousarray(flat[_sample_rows(flat.shape[0], nlist)])


def _sample_rows(num_points: int, nlist: int, cap: Optional[int] = None) -> np.ndarray:
    """Indices of evenly spaced rows: TRAIN_PER_CELL per cell, at most `cap` (but MIN_PER_CELL per cell), at most M."""
    count = TRAIN_PER_CELL * nlist if cap is None else max(MIN_PER_CELL * nlist, min(cap, TRAIN_PER_CELL * nlist))
    return np.linspace(0, num_points - 1, min(num_points, count)).round().astype(np.int64)


class ByteIVFIndex(IVFIndex):
    """IVF over a uint8 training store (memaudit.storage): faiss keeps the byte values u as fp16 (its fp16 scalar
    quantizer: exact for integers 0..255, two bytes per value, half a float32 copy) and is searched with float
    queries in byte units, (q + 1) 127.5; the candidates' exact distances are taken from the store's float32
    rows u / 127.5 - 1, the values the exact search uses. Not faiss's 8-bit direct quantizer: where d % 16 == 0
    it rounds and clamps the query to bytes too, so scanning every cell missed true neighbours (0 of 50 for
    samples at 1.5x the pixel range) and the measured recall, which takes that scan as exact, stayed 1."""

    unit = BYTE_SCALE

    def __init__(self, store: ImageStore, nlist: Optional[int] = None, nprobe: int = DEFAULT_NPROBE):
        if len(store) == 0:
            raise UserError("the neighbour index needs a non-empty set of points")
        self.store = store
        self._configure(len(store), store.dim, nlist, nprobe)
        check_fits(2 * store.nbytes + TRAIN_BYTES, "--index ivf over the uint8 training set (an fp16 copy)",
                   "use --index exact, or audit a subset with --limit")
        quantizer = faiss.IndexFlatL2(self.dim)
        index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, self.nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_L2, False)  # not by residual: codes are the bytes' values
        rows = _sample_rows(len(store), self.nlist, cap=max(1, TRAIN_BYTES // (4 * self.dim)))
        self._build(quantizer, index, self._bytes_as_float(store.raw[torch.from_numpy(rows)]), self._parts())

    @staticmethod
    def _bytes_as_float(raw: Tensor) -> np.ndarray:
        """uint8 images (n, C, H, W) as float32 byte values (n, d), C-contiguous."""
        return np.ascontiguousarray(raw.reshape(raw.shape[0], -1).to("cpu", torch.float32).numpy())

    def _parts(self):
        """The store's bytes as float32 rows, chunk by chunk; the largest squared norm noted for the padding."""
        step = rows_per_chunk(self.dim, ADD_ROWS)
        for start in range(0, self.num_points, step):
            part = self._bytes_as_float(self.store.raw[start:start + step])
            norm = float(np.einsum("nd,nd->n", part, part, dtype=np.float64).max())
            self.largest_square_norm = max(self.largest_square_norm, norm)
            yield part

    def _faiss_queries(self, q: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((q + np.float32(1.0)) * np.float32(BYTE_SCALE), dtype=np.float32)

    def _exact_rows(self, ids: np.ndarray) -> np.ndarray:
        return self.store.gather_rows(torch.from_numpy(np.asarray(ids, dtype=np.int64))).numpy()
