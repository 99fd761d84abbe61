"""NeighborIndex vs numpy brute-force L2 distances."""

import numpy as np
import pytest
import torch

from memaudit.errors import UserError
from memaudit.neighbors import NeighborIndex


def brute_force(queries: np.ndarray, points: np.ndarray, k: int):
    q = queries.reshape(len(queries), -1).astype(np.float64)
    p = points.reshape(len(points), -1).astype(np.float64)
    d = np.sqrt(((q[:, None, :] - p[None, :, :]) ** 2).sum(-1))
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


def test_matches_brute_force_and_is_sorted():
    g = torch.Generator().manual_seed(0)
    points, queries = torch.randn(60, 2, 3, 3, generator=g), torch.randn(17, 2, 3, 3, generator=g)
    dist, idx = NeighborIndex(points).search(queries, 5)
    ref_d, ref_i = brute_force(queries.numpy(), points.numpy(), 5)
    assert dist.shape == (17, 5) and dist.dtype == torch.float32 and idx.dtype == torch.long
    np.testing.assert_allclose(dist.numpy(), ref_d, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(idx.numpy(), ref_i)
    assert (dist[:, 1:] >= dist[:, :-1]).all()


def test_batched_queries_give_the_same_answer():
    g = torch.Generator().manual_seed(1)
    points, queries = torch.randn(40, 12, generator=g), torch.randn(23, 12, generator=g)
    index = NeighborIndex(points)
    d_all, i_all = index.search(queries, 3)
    d_bat, i_bat = index.search(queries, 3, batch_size=4)
    assert torch.equal(i_all, i_bat) and torch.allclose(d_all, d_bat)


def test_exact_duplicate_has_distance_exactly_zero():
    g = torch.Generator().manual_seed(2)
    points = torch.randn(30, 3, 8, 8, generator=g) * 10  # large norms: faiss's norm expansion alone is inexact
    dist, idx = NeighborIndex(points).search(points[[3, 7, 29]], 2)
    assert torch.equal(dist[:, 0], torch.zeros(3))
    assert idx[:, 0].tolist() == [3, 7, 29]
    assert (dist[:, 1] > 0).all()


def test_errors():
    index = NeighborIndex(torch.randn(4, 5))
    assert index.search(torch.randn(2, 5), 4)[0].shape == (2, 4)
    with pytest.raises(UserError):
        index.search(torch.randn(2, 5), 5)
    with pytest.raises(UserError):
        index.search(torch.randn(2, 6), 1)
    with pytest.raises(UserError):
        NeighborIndex(torch.empty(0, 5))
