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
from torch import Tensor

from memaudit.errors import UserError
from memaudit.neighbors import NeighborIndex, _flat_numpy

MIN_PER_CELL = 39  # faiss warns below 39 training points per centroid
TRAIN_PER_CELL = 256  # k-means is trained on at most this many points per cell
KMEANS_SEED = 1234
DEFAULT_NPROBE = 32
ADD_ROWS = 1 << 16


def default_nlist(num_points: int) -> int:
    """4 sqrt(M) cells (faiss's rule of thumb), at least 1 and with >= 39 points per cell."""
    return max(1, min(int(4 * math.sqrt(num_points)), num_points // MIN_PER_CELL))


class IVFIndex(NeighborIndex):
    """IVF-Flat over points (M, ...), flattened; search as NeighborIndex (sorted exact distances of the candidates
    it finds), scanning `nprobe` of `nlist` cells."""

    kind = "ivf"
    approximate = True

    def __init__(self, points: Tensor, nlist: Optional[int] = None, nprobe: int = DEFAULT_NPROBE):
        if points.ndim < 2 or points.shape[0] == 0:
            raise UserError("the neighbour index needs a non-empty set of points")
        flat = _flat_numpy(points)
        self.num_points, self.dim = flat.shape
        self.nlist = int(nlist) if nlist is not None else default_nlist(self.num_points)
        if not 1 <= self.nlist <= self.num_points:
            raise UserError(f"--index ivf: nlist must be in [1, {self.num_points}] (the training images), "
                            f"not {self.nlist}")
        if nprobe < 1:
            raise UserError(f"--index ivf: nprobe must be >= 1, not {nprobe}")
        self.nprobe = min(int(nprobe), self.nlist)
        quantizer = faiss.IndexFlatL2(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist)
        index.cp.seed = KMEANS_SEED
        index.cp.min_points_per_centroid = 1  # default_nlist keeps 39 per cell; a user's nlist is theirs to choose
        index.cp.max_points_per_centroid = TRAIN_PER_CELL  # _training_sample already subsamples to this
        index.train(_training_sample(flat, self.nlist))
        for start in range(0, self.num_points, ADD_ROWS):
            index.add(flat[start:start + ADD_ROWS])
        index.make_direct_map()  # reconstruct(i) for the exact re-check
        index.nprobe = self.nprobe
        self.quantizer = quantizer  # the IVF index does not own it: keep it alive
        self.index = index

    def _candidates(self, q: np.ndarray, k: int) -> np.ndarray:
        """k candidates per row; a row whose scanned cells hold fewer than k points (faiss pads with -1) is searched
        again with twice the cells, up to all of them (exact)."""
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
    count = min(flat.shape[0], TRAIN_PER_CELL * nlist)
    rows = np.linspace(0, flat.shape[0] - 1, count).round().astype(np.int64)
    return np.ascontiguousarray(flat[rows])
