"""Top-k entropy vs a numpy softmax over brute-force distances."""

import math

import numpy as np
import pytest
import torch

from digits import digits_dataset
from memaudit.data import array_to_images
from memaudit.empirical import EmpiricalDenoiser
from memaudit.metrics.entropy import topk_entropy, trajectory_entropy
from memaudit.sampling import SamplerConfig, Trajectory, sample


def numpy_entropy(x: np.ndarray, train: np.ndarray, sigma: float, k: int, temperature: float = 1.0) -> np.ndarray:
    xf = x.reshape(len(x), -1).astype(np.float64)
    tf = train.reshape(len(train), -1).astype(np.float64)
    d2 = ((xf[:, None] - tf[None]) ** 2).sum(-1)
    logits = -d2 / (2 * sigma**2 * temperature)
    top = -np.sort(-logits, axis=1)[:, :k]
    w = np.exp(top - top.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    return -(w * np.log(np.where(w > 0, w, 1))).sum(1)


@pytest.fixture(scope="module")
def train():
    return array_to_images(digits_dataset(120))


@pytest.mark.parametrize("sigma,k,temperature", [(0.5, 5, 1.0), (2.0, 10, 1.0), (1.0, 7, 3.0), (5.0, 120, 1.0)])
def test_matches_numpy(train, sigma, k, temperature):
    emp = EmpiricalDenoiser(train, temperature=temperature, chunk_size=32)
    g = torch.Generator().manual_seed(0)
    x = train[:9] + sigma * torch.randn(9, *train.shape[1:], generator=g)
    h = topk_entropy(emp, x, sigma, k)
    ref = numpy_entropy(x.numpy(), train.numpy(), sigma, k, temperature)
    assert h.shape == (9,)
    np.testing.assert_allclose(h.numpy(), ref, rtol=1e-4, atol=1e-5)
    assert (h >= 0).all() and (h <= math.log(k) + 1e-9).all()


def test_limits(train):
    emp = EmpiricalDenoiser(train)
    # on a training point at tiny sigma one point dominates: H = 0, exp(H) = 1
    assert torch.allclose(topk_entropy(emp, train[:4], 0.01, 8), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    # k = 1 always has zero entropy; huge sigma gives nearly uniform weights: H -> log k
    assert (topk_entropy(emp, train[:4] * 0.3, 1.0, 1) == 0).all()
    assert torch.allclose(topk_entropy(emp, train[:4], 1e4, 16), torch.full((4,), math.log(16), dtype=torch.float64),
                          atol=1e-4)


def test_trajectory_entropy_statistics(train):
    emp = EmpiricalDenoiser(train)
    g = torch.Generator().manual_seed(1)
    sigmas = [3.0, 1.0, 0.3]
    trajs = []
    for size in (3, 4):
        t = Trajectory()
        for s in sigmas:
            x = train[:size] + s * torch.randn(size, *train.shape[1:], generator=g)
            t(0, s, x, x)
        trajs.append(t)
    out = trajectory_entropy(emp, trajs, k=6)
    assert out["sigmas"] == sigmas
    for i, s in enumerate(sigmas):
        h = np.concatenate([numpy_entropy(t.xs[i].numpy(), train.numpy(), s, 6) for t in trajs])
        assert out["mean"][i] == pytest.approx(h.mean(), rel=1e-4, abs=1e-6)
        assert out["median"][i] == pytest.approx(np.median(h), rel=1e-4, abs=1e-6)
        assert out["min"][i] == pytest.approx(h.min(), rel=1e-4, abs=1e-6)
        assert out["effective_points_mean"][i] == pytest.approx(np.exp(h).mean(), rel=1e-4)
    assert out["final_mean"] == out["mean"][-1]


def test_empirical_sampler_collapses_to_single_points(train):
    emp = EmpiricalDenoiser(train[:40])
    _, trajs = sample(emp, 6, SamplerConfig(steps=8), seed=0, batch_size=3, record=6)
    out = trajectory_entropy(emp, trajs, k=10)
    assert len(out["sigmas"]) == 8 and out["sigmas"][0] == pytest.approx(80.0)
    assert out["mean"][0] > 0.9 * math.log(10)  # at sigma_max all 10 neighbours weigh about the same
    assert out["final_mean"] < 1e-3 and out["effective_points_mean"][-1] == pytest.approx(1.0, abs=1e-3)


def test_empty_and_inconsistent():
    emp = EmpiricalDenoiser(torch.randn(5, 1, 2, 2))
    assert trajectory_entropy(emp, [], 3)["final_mean"] is None
    a, b = Trajectory(), Trajectory()
    a(0, 1.0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError):
        trajectory_entropy(emp, [a, b], 3)
