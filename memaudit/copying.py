"""Meehan, Chaudhuri & Dasgupta's data-copying test C_T (AISTATS 2020), numpy only, as dgm-eval runs it.

Features are reduced to 64 dims by PCA fitted on the training set (when they have more), the training set is
cut into k-means cells (3, as dgm-eval's ct.py), and in each cell pi the distances from the generated samples
Q_m and from the held-out real samples P_n to their nearest training point OF THAT CELL are compared:

    U(pi) = #{(q, p): L(q) > L(p)} + 0.5 #{ties}   (Mann-Whitney U of the generated distances)
    Z_U(pi) = (U - (m n / 2 - 0.5)) / sqrt(m n (m + n + 1) / 12)     (Meehan's Z-score, continuity-corrected)
    C_T = sum_pi P_n(pi) Z_U(pi) / sum_pi P_n(pi)   over cells with Q_m(pi) > tau = 20 / m

C_T << 0 (e.g. < -3): generated samples lie closer to the training set than fresh real data do (copying);
C_T ~ 0 for a model that generalizes. Cells without held-out or training points are dropped (dgm-eval raises).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PCA_DIMS = 64
CELLS = 3
MIN_CELL_SAMPLES = 20  # tau = 20 / m
KMEANS_ITERS = 100


def pca_fit(train: np.ndarray, dims: int = PCA_DIMS):
    """(mean, components (dims, F)) of the training features; None when they have at most `dims` features."""
    if train.shape[1] <= dims:
        return None
    mean = train.mean(0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    return mean, vt[:dims]


def pca_apply(pca, x: np.ndarray) -> np.ndarray:
    return x if pca is None else (x - pca[0]) @ pca[1].T


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = KMEANS_ITERS, restarts: int = 10) -> np.ndarray:
    """Cell centres (k, F): Lloyd's algorithm from k-means++ seeds, the best of `restarts` by inertia."""
    rng = np.random.default_rng(seed)
    k = min(k, len(x))
    best, best_inertia = None, np.inf
    for _ in range(restarts):
        centres = [x[rng.integers(len(x))]]
        for _ in range(1, k):
            d2 = np.min([((x - c) ** 2).sum(1) for c in centres], 0)
            total = d2.sum()
            centres.append(x[rng.choice(len(x), p=d2 / total)] if total > 0 else x[rng.integers(len(x))])
        centres = np.array(centres)
        for _ in range(iters):
            labels = assign(x, centres)
            new = np.array([x[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(k)])
            if np.allclose(new, centres):
                break
            centres = new
        inertia = ((x - centres[assign(x, centres)]) ** 2).sum()
        if inertia < best_inertia:
            best, best_inertia = centres, inertia
    return best


def assign(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of each row's nearest centre."""
    return ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)


def mann_whitney_u(a: np.ndarray, b: np.ndarray) -> float:
    """U of sample a against b: #{a_i > b_j} + 0.5 #{a_i = b_j}, from mid-ranks of the pooled sample."""
    pooled = np.concatenate([a, b]).astype(np.float64)
    order = np.argsort(pooled, kind="stable")
    ranks = np.empty(len(pooled))
    sorted_vals = pooled[order]
    i = 0
    while i < len(pooled):  # mid-ranks over ties
        j = i
        while j + 1 < len(pooled) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float(ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2)


def z_u(gen_dist: np.ndarray, test_dist: np.ndarray) -> float:
    """Meehan's Z-scored U of the generated against the held-out NN distances (continuity-corrected)."""
    m, n = len(gen_dist), len(test_dist)
    u = mann_whitney_u(gen_dist, test_dist)
    return (u - (m * n / 2 - 0.5)) / np.sqrt(m * n * (m + n + 1) / 12)


def nn_distance(queries: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Euclidean distance from each query to its nearest point (chunked)."""
    out = np.empty(len(queries))
    p2 = (points ** 2).sum(1)
    for start in range(0, len(queries), 1024):
        q = queries[start:start + 1024]
        d2 = (q ** 2).sum(1)[:, None] - 2 * q @ points.T + p2[None]
        out[start:start + 1024] = np.sqrt(np.maximum(d2.min(1), 0.0))
    return out


@dataclass
class CTResult:
    ct: float | None
    cells: list[dict]  # per cell: train, test, generated counts, z_u (None when dropped), used


def c_t(train: np.ndarray, test: np.ndarray, gen: np.ndarray, cells: int = CELLS, seed: int = 0,
        min_cell: int = MIN_CELL_SAMPLES) -> CTResult:
    """C_T of generated features `gen` against held-out `test`, both relative to `train` (rows = points)."""
    train, test, gen = (np.asarray(a, dtype=np.float64).reshape(len(a), -1) for a in (train, test, gen))
    pca = pca_fit(train)
    train, test, gen = (pca_apply(pca, a) for a in (train, test, gen))
    centres = kmeans(train, cells, seed)
    lt, lp, lq = assign(train, centres), assign(test, centres), assign(gen, centres)
    m, n = len(gen), len(test)
    rows, num, den = [], 0.0, 0.0
    for j in range(len(centres)):
        t, p, q = train[lt == j], test[lp == j], gen[lq == j]
        row = {"train": int(len(t)), "test": int(len(p)), "generated": int(len(q)), "z_u": None, "used": False}
        if len(t) and len(p) and len(q) and len(q) / m > min_cell / m:
            row["z_u"] = float(z_u(nn_distance(q, t), nn_distance(p, t)))
            row["used"] = True
            num += len(p) / n * row["z_u"]
            den += len(p) / n
        rows.append(row)
    return CTResult(num / den if den > 0 else None, rows)
