"""Near-duplicate clusters with the projection prefilter (memaudit.duplicates.may_have_partner): for images of
more than 2 x PROJECTION_DIMS values, the clusters equal those of a brute-force numpy all-pairs search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memaudit.duplicates import (PROJECTION_DIMS, block_factor, block_means, find_duplicates, may_have_partner,
                                 rms_pair_distance)
from memaudit.neighbors import NeighborIndex
from memaudit.torch_index import TorchIndex


def brute_force_labels(points: np.ndarray, radius: float) -> np.ndarray:
    """Connected components of ||a - b|| <= radius (float64, all pairs), labelled by their smallest member."""
    x = points.reshape(len(points), -1).astype(np.float64)
    d = np.stack([np.sqrt(((x - row) ** 2).sum(1)) for row in x])
    labels = np.arange(len(x))
    changed = True
    while changed:  # propagate the smallest label over edges until stable
        neighbour_min = np.where(d <= radius, labels[None, :], len(x)).min(1)
        new = np.minimum(labels, neighbour_min)
        changed = bool((new != labels).any())
        labels = new
    return labels


def planted(seed: int, dim: int) -> torch.Tensor:
    """Correlated images (a few strong directions plus noise) with exact copies, near copies, a chain of near
    copies and a pair just outside the radius planted in them."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(300, 8)) @ rng.normal(size=(8, dim)) + 0.3 * rng.normal(size=(300, dim))
    base[10] = base[3]  # exact copy
    base[20] = base[5] + 0.001 * rng.normal(size=dim)  # near copy
    base[30] = base[20] + 0.001 * rng.normal(size=dim)  # chain: 5 - 20 - 30
    return torch.from_numpy(base.astype(np.float32))


@pytest.mark.parametrize("make_index", [NeighborIndex, TorchIndex])
@pytest.mark.parametrize("seed", [0, 1])
def test_prefiltered_clusters_equal_brute_force(make_index, seed):
    points = planted(seed, 3 * PROJECTION_DIMS)
    index = make_index(points)
    dup = find_duplicates(index, 0.05)
    expected = brute_force_labels(points.numpy(), dup.radius)
    assert np.array_equal(dup.labels, expected)
    assert dup.labels[10] == 3 and dup.labels[20] == dup.labels[30] == 5


def test_prefilter_never_rules_out_a_true_pair_and_rules_out_most_others():
    points = planted(2, 4 * PROJECTION_DIMS)
    index = NeighborIndex(points)
    radius = 0.05 * rms_pair_distance(index)
    maybe = may_have_partner(index, radius)
    truth = brute_force_labels(points.numpy(), radius)
    in_pairs = np.bincount(truth)[truth] > 1
    assert maybe[in_pairs].all()
    assert maybe.sum() <= in_pairs.sum() + 5  # the rest are ruled out without a full-dimension search


def test_a_pair_just_outside_the_radius_is_not_merged():
    points = planted(3, 3 * PROJECTION_DIMS)
    index = NeighborIndex(points)
    radius = 0.05 * rms_pair_distance(index)
    direction = np.random.default_rng(4).normal(size=points.shape[1])
    points[40] = points[7] + torch.from_numpy((1.001 * radius * direction / np.linalg.norm(direction)).astype(np.float32))
    dup = find_duplicates(NeighborIndex(points), 0.05)
    assert np.array_equal(dup.labels, brute_force_labels(points.numpy(), dup.radius))


def planted_images(seed: int, shape=(3, 16, 16), noise: float = 1.0) -> torch.Tensor:
    """Smooth images plus `noise` x white noise, with an exact copy, a near copy and a chain planted."""
    rng = np.random.default_rng(seed)
    n, (c, h, w) = 200, shape
    smooth = np.repeat(np.repeat(rng.normal(size=(n, c, h // 4, w // 4)), 4, 2), 4, 3)
    x = smooth + noise * rng.normal(size=(n, c, h, w))
    x[10] = x[3]
    x[20] = x[5] + 0.001 * rng.normal(size=shape)
    x[30] = x[20] + 0.001 * rng.normal(size=shape)
    return torch.from_numpy(x.astype(np.float32))


@pytest.mark.parametrize("noise", [0.0, 1.0, 10.0])  # 10: nearly white noise, where block means keep least
def test_block_means_prefilter_finds_the_brute_force_clusters(noise):
    """Images with d > 64 / (2 tol)^2 are prefiltered on f x f block means (tol 0.2: f = 2): the clusters
    equal a brute-force search's, and the block means never lengthen a distance."""
    images = planted_images(0, noise=noise)
    index = NeighborIndex(images.reshape(len(images), -1))
    assert block_factor(images.shape[1:], 0.2) == 2
    dup = find_duplicates(index, 0.2, image_shape=images.shape[1:])
    assert np.array_equal(dup.labels, brute_force_labels(images.numpy(), dup.radius))
    assert dup.labels[10] == 3 and dup.labels[20] == dup.labels[30] == 5
    pooled = block_means(index, tuple(images.shape[1:]), 2).double()
    a, b = images.reshape(len(images), -1).double(), pooled
    for i, j in [(0, 1), (3, 10), (7, 150), (20, 30)]:
        assert (b[i] - b[j]).norm() <= (a[i] - a[j]).norm() * (1 + 1e-6) + 1e-6


def test_block_factor_keeps_enough_of_a_distance_and_enough_dimensions():
    assert block_factor((3, 256, 256), 0.05) == 8  # 1 / (2.5 x 0.05) = 8
    assert block_factor((3, 128, 128), 0.05) == 8
    assert block_factor((1, 12, 12), 0.05) == 1  # 2 x 2 blocks would leave 36 < 64 values
    assert block_factor((3, 30, 30), 0.05) == 6  # divides 30; 1 / (2.5 x 0.05) allows up to 8


def test_rows_with_partner_block_against_block_equals_all_pairs(monkeypatch):
    """The distances are taken block against block (no copy of the whole projection); with blocks of 7 rows
    the rows with a partner are those of an all-pairs numpy search, a block's own diagonal excluded, pairs
    across blocks found."""
    import memaudit.duplicates as dup

    points = planted(3, 12)
    points[25] = points[2] + 1e-4  # partners in different blocks
    radius = 0.05 * rms_pair_distance(NeighborIndex(points))
    x = points.numpy().astype(np.float64)
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(2))
    np.fill_diagonal(d, np.inf)
    expected = (d <= radius).any(1)
    monkeypatch.setattr(dup, "QUERY_ROWS", 7)
    got = dup.rows_with_partner(points, radius)
    assert expected[[2, 25, 3, 10, 5, 20, 30]].all() and expected.sum() < 20
    assert np.array_equal(got, expected)


def test_rows_with_partner_keeps_pairs_at_the_radius_in_float32():
    """Block means of 256x256 images (3072 values, |x|^2 ~ 1000) by float32 GEMMs: a pair at 0.999 of the
    radius is kept, one at 1.5 radii is not (the padding is 1e-5 |x|^2 + 2% of the squared radius)."""
    import memaudit.duplicates as dup

    gen = torch.Generator().manual_seed(5)
    points = torch.rand(300, 3072, generator=gen) * 2 - 1
    radius = 0.05 * rms_pair_distance(NeighborIndex(points))
    direction = torch.randn(3072, generator=gen)
    points[200] = points[11] + 0.999 * radius * direction / direction.norm()
    points[201] = points[12] + 1.5 * radius * direction / direction.norm()
    got = dup.rows_with_partner(points, radius)
    assert got[[11, 200]].all() and not got[[12, 201]].any() and got.sum() == 2
