"""Near-duplicate clusters of the training set, so a copy of a duplicated image is still a copy.

Two training images are near-duplicates when their distance is at most tol x r, with r = sqrt(2 tr Cov) the
RMS distance between two random training images (scale-free: the same tol works in pixel and feature spaces);
clusters are the connected components of that relation.  A training set holding an image twice would
otherwise give a copy of it d1 ~ d2 and an NN ratio near 1 (not memorized): the duplicate-aware ratio measures
d2 to the nearest image of another cluster instead (Carlini et al. 2023 deduplicate for the same reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from memaudit.neighbors import NeighborIndex, padded_square_radius
from memaudit.pca import FIT_BYTES, MAX_PCA_FIT, pca_basis
from memaudit.storage import rows_per_chunk

DEFAULT_TOLERANCE = 0.05
QUERY_ROWS = 4096  # at most; fewer for large images (memaudit.storage.rows_per_chunk)
PROJECTION_DIMS = 64  # the all-pairs prefilter of images with more than 2x this many values (may_have_partner)


@dataclass
class Duplicates:
    """labels[i] = the smallest index in image i's cluster; `radius` = tol x r in the index's space."""

    labels: np.ndarray  # (M,) int64
    tolerance: float
    radius: float

    def clusters(self) -> list[list[int]]:
        """Clusters of two or more images, each sorted, ordered by their first member."""
        groups: dict[int, list[int]] = {}
        for i, label in enumerate(self.labels.tolist()):
            groups.setdefault(label, []).append(i)
        return [members for _, members in sorted(groups.items()) if len(members) > 1]

    @property
    def max_size(self) -> int:
        return int(np.bincount(self.labels).max()) if len(self.labels) else 0

    @property
    def num_distinct(self) -> int:
        return int(len(np.unique(self.labels)))

    def section(self, limit: int = 100) -> dict:
        """The report's data.duplicates: tolerance, radius, counts and (at most `limit`) clusters."""
        clusters = self.clusters()
        return {"tolerance": self.tolerance, "radius": self.radius, "num_clusters": len(clusters),
                "num_images_in_clusters": int(sum(len(c) for c in clusters)),
                "num_distinct": self.num_distinct, "clusters": clusters[:limit]}


def rms_pair_distance(index: NeighborIndex) -> float:
    """sqrt(E ||a - b||^2) over two independent random training points = sqrt(2 tr Cov), in float64."""
    total, sq = np.zeros(index.dim), np.zeros(index.dim)
    rows = rows_per_chunk(index.dim, QUERY_ROWS, 8)
    for start in range(0, index.num_points, rows):
        block = index.points(start, min(start + rows, index.num_points)).astype(np.float64)
        total += block.sum(0)
        sq += (block * block).sum(0)
    mean = total / index.num_points
    var = np.maximum(sq / index.num_points - mean * mean, 0.0)
    return float(np.sqrt(2.0 * var.sum()))


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)  # the root is always the smallest index


def find_duplicates(index: NeighborIndex, tolerance: float = DEFAULT_TOLERANCE,
                    image_shape: Optional[Sequence[int]] = None) -> Duplicates:
    """Near-duplicate clusters of the indexed training points: pairs with ||a - b|| <= tolerance x r.

    faiss range search proposes candidate pairs (radius padded for its rounding); each pair's distance is
    then computed exactly, so exact copies are always found and nothing beyond the radius is merged.
    """
    radius = float(tolerance) * rms_pair_distance(index)
    uf = _UnionFind(index.num_points)
    maybe = may_have_partner(index, radius, image_shape, tolerance)
    rows = rows_per_chunk(index.dim, QUERY_ROWS)
    for start in range(0, index.num_points, rows):
        stop = min(start + rows, index.num_points)
        ids = np.flatnonzero(maybe[start:stop])
        if not len(ids):
            continue
        queries = index.points(start, stop)[ids]
        for i, j in index.pairs_within(queries, radius):
            if start + ids[i] != j:
                uf.union(start + int(ids[i]), int(j))
    labels = np.array([uf.find(i) for i in range(index.num_points)], dtype=np.int64)
    return Duplicates(labels, float(tolerance), radius)


def may_have_partner(index: NeighborIndex, radius: float, image_shape: Optional[Sequence[int]] = None,
                     tolerance: float = DEFAULT_TOLERANCE) -> np.ndarray:
    """Boolean per point: whether another point may lie within `radius`, from a lower bound on every pairwise
    distance computed in far fewer dimensions; only the points it leaves are searched in full. The bound is
    |P(a - b)| <= |a - b| for a projection P: the top PROJECTION_DIMS principal coordinates where they keep
    enough of a distance (d <= 64 / (2 tol)^2, memaudit.pca), else, for images (`image_shape`), f x f block
    means scaled by f (block_factor: f <= 1 / (2.5 tol), so even white noise keeps 1/f of a distance). Every
    point for small d or flat vectors of large d."""
    if index.num_points < 2 or index.dim <= 2 * PROJECTION_DIMS:
        return np.ones(index.num_points, dtype=bool)
    if index.dim <= PROJECTION_DIMS / max(2 * tolerance, 1e-12) ** 2:
        return rows_with_partner(principal_projection(index), radius)
    f = block_factor(image_shape, tolerance) if image_shape is not None else 1
    if f < 2:
        return np.ones(index.num_points, dtype=bool)
    return rows_with_partner(block_means(index, tuple(image_shape), f), radius)


def block_factor(image_shape: Sequence[int], tolerance: float) -> int:
    """The largest f dividing H and W with f <= 1 / (2.5 tol) and at least PROJECTION_DIMS block means."""
    c, h, w = (int(v) for v in image_shape[-3:])
    limit = 1.0 / max(2.5 * tolerance, 1e-12)
    fits = [f for f in range(2, min(h, w) + 1)
            if h % f == 0 and w % f == 0 and f <= limit and c * (h // f) * (w // f) >= PROJECTION_DIMS]
    return max(fits, default=1)


def block_means(index: NeighborIndex, image_shape: tuple, f: int) -> Tensor:
    """f x f block means of every point (as a (C, H, W) image), times f: an orthogonal projection's
    coordinates (|P x|^2 = sum over blocks of f^2 mean^2 <= |x|^2), float32, chunk by chunk into one tensor
    (a list of 1 MiB parts then cat held the projection twice, the parts left in the heap: 0.35 GiB at 256x256,
    M = 30k)."""
    rows = rows_per_chunk(index.dim, QUERY_ROWS)
    c, h, w = image_shape[-3:]
    out = torch.empty((index.num_points, c * (h // f) * (w // f)))  # filled in place: no list of parts + cat
    for a in range(0, index.num_points, rows):
        x = torch.from_numpy(index.points(a, min(a + rows, index.num_points))).reshape(-1, *image_shape)
        out[a:a + x.shape[0]] = torch.nn.functional.avg_pool2d(x, f).mul_(f).reshape(x.shape[0], -1)
    return out


def rows_with_partner(projected: Tensor, radius: float) -> np.ndarray:
    """Boolean per row: another row within `radius` of it, by float32 GEMMs block against block, in place,
    against the padded radius (neighbors.padded_square_radius: their rounding cannot push a pair within `radius`
    out; only candidates are kept, and find_duplicates checks each exactly). No copy of the projection is made
    (30k x 3072 block means at 256x256: float64 blocks and their temporaries took 0.3 GB more)."""
    step = rows_per_chunk(projected.shape[1], QUERY_ROWS, 8)
    blocks = range(0, projected.shape[0], step)
    sq = torch.cat([projected[a:a + step].double().square_().sum(1) for a in blocks])
    padded = padded_square_radius(radius, float(sq.max()))
    sq = sq.float()
    out = np.zeros(projected.shape[0], dtype=bool)
    for start in blocks:
        q = projected[start:start + step]
        hit = torch.zeros(q.shape[0], dtype=torch.bool)
        for other in blocks:
            d2 = torch.mm(q, projected[other:other + step].T).mul_(-2.0)
            d2.add_(sq[start:start + step, None]).add_(sq[None, other:other + step])
            if other == start:
                d2.fill_diagonal_(float("inf"))  # not itself
            hit |= (d2 <= padded).any(1)
        out[start:start + q.shape[0]] = hit.numpy()
    return out


def principal_projection(index: NeighborIndex) -> Tensor:
    """The points' coordinates (M, PROJECTION_DIMS) on the top principal directions of an evenly spaced sample
    of them (at most FIT_BYTES of float32, memaudit.pca), float32, computed chunk by chunk."""
    count = min(index.num_points, MAX_PCA_FIT, max(PROJECTION_DIMS + 1, FIT_BYTES // (4 * index.dim)))
    fit = np.unique(np.linspace(0, index.num_points - 1, count).round().astype(int))
    sample = torch.from_numpy(np.stack([index.points(int(i), int(i) + 1)[0] for i in fit]))
    mean, basis = pca_basis(sample, PROJECTION_DIMS)
    basis = torch.linalg.qr(basis).Q  # orthonormal to float64 precision, whatever the fit's small eigenvalues
    rows = rows_per_chunk(index.dim, QUERY_ROWS, 8)
    out = torch.empty((index.num_points, basis.shape[1]))  # filled in place: no list of parts + cat
    for a in range(0, index.num_points, rows):
        block = torch.from_numpy(index.points(a, min(a + rows, index.num_points))).double()
        out[a:a + block.shape[0]] = ((block - mean) @ basis).float()
    return out


def distinct_second(dist: Tensor, idx: Tensor, labels: np.ndarray) -> tuple[Tensor, Tensor]:
    """For neighbour lists sorted by distance: (distance, index) of the nearest neighbour whose cluster differs
    from the first neighbour's; inf / -1 where the k neighbours hold no other cluster."""
    lab = torch.from_numpy(labels)[idx]
    other = lab != lab[:, :1]
    first = torch.where(other.any(1), other.int().argmax(1), torch.full((idx.shape[0],), -1))
    rows = torch.arange(idx.shape[0])
    d2 = torch.where(first >= 0, dist[rows, first.clamp(min=0)], torch.full_like(dist[:, 0], float("inf")))
    i2 = torch.where(first >= 0, idx[rows, first.clamp(min=0)], torch.full_like(idx[:, 0], -1))
    return d2, i2
