"""Score-cosine deviation vs numpy cosines, with a numpy empirical denoiser as the independent reference."""

import numpy as np
import pytest
import torch

from memaudit.denoiser import Denoiser, expand_like
from memaudit.empirical import EmpiricalDenoiser
from memaudit.metrics.score_cosine import (cosine_deviation, cosine_on_training_points, cosine_on_trajectories,
                                           score_cosine_deviation)
from memaudit.sampling import Trajectory


class Shrink(Denoiser):
    """D(x, s) = x / (1 + s^2) + c: a Gaussian-prior denoiser with an offset (not the empirical one)."""

    def __init__(self, c: float = 0.1):
        super().__init__()
        self.c = c

    def denoise(self, x, sigma):
        return x / (1 + expand_like(sigma, x) ** 2) + self.c


class Identity(Denoiser):
    def denoise(self, x, sigma):
        return x.clone()


def numpy_empirical(x: np.ndarray, train: np.ndarray, sigma: float) -> np.ndarray:
    xf, tf = x.reshape(len(x), -1).astype(np.float64), train.reshape(len(train), -1).astype(np.float64)
    logits = -((xf[:, None] - tf[None]) ** 2).sum(-1) / (2 * sigma**2)
    w = np.exp(logits - logits.max(1, keepdims=True))
    return ((w / w.sum(1, keepdims=True)) @ tf).reshape(x.shape)


def numpy_deviation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return 1 - (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def train():
    return torch.rand(25, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("sigma", [0.05, 0.4, 3.0])
def test_matches_numpy(train, sigma):
    x = train[:6] + sigma * torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    dev = score_cosine_deviation(Shrink(), EmpiricalDenoiser(train), x, sigma)
    xn = x.numpy().astype(np.float64)
    ref = numpy_deviation(xn / (1 + sigma**2) + 0.1 - xn, numpy_empirical(xn, train.numpy(), sigma) - xn)
    assert dev.shape == (6,)
    np.testing.assert_allclose(dev.numpy(), ref, rtol=1e-4, atol=1e-5)
    assert ((dev >= 0) & (dev <= 2)).all()


def test_same_and_opposite_scores(train):
    emp = EmpiricalDenoiser(train)
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(score_cosine_deviation(emp, emp, x, 0.7), torch.zeros(5, dtype=torch.float64), atol=1e-6)

    class Mirror(Denoiser):  # D = 2x - D*  =>  D - x = -(D* - x)
        def denoise(self, x, sigma):
            return 2 * x - emp(x, sigma)

    assert torch.allclose(score_cosine_deviation(Mirror(), emp, x, 0.7), torch.full((5,), 2.0, dtype=torch.float64),
                          atol=1e-6)


def test_zero_vector_convention(train):
    x = torch.randn(3, 1, 4, 4)
    # model score is zero, empirical is not: similarity 0, deviation 1
    dev = score_cosine_deviation(Identity(), EmpiricalDenoiser(train), x, 0.5)
    assert dev.tolist() == [1.0, 1.0, 1.0]
    zero, other = torch.zeros(2, 3), torch.tensor([[1.0, 0, 0], [0, 0, 0]])
    assert cosine_deviation(zero, zero, torch.ones(2, 3)).tolist() == [0.0, 0.0]
    assert cosine_deviation(zero, other, torch.ones(2, 3)).tolist() == [1.0, 0.0]


def test_on_training_points_replays_the_generator(train):
    sigmas, n = [2.0, 0.5, 0.1], 8
    out = cosine_on_training_points(Shrink(), EmpiricalDenoiser(train), train, sigmas, n,
                                    torch.Generator().manual_seed(5), batch_size=3)
    g = torch.Generator().manual_seed(5)
    x0 = train[torch.randperm(len(train), generator=g)[:n]].numpy().astype(np.float64)
    assert out["sigmas"] == sigmas
    for i, s in enumerate(sigmas):
        x = x0 + s * torch.randn(x0.shape, generator=g).numpy()
        ref = numpy_deviation(x / (1 + s**2) + 0.1 - x, numpy_empirical(x, train.numpy(), s) - x)
        assert out["mean"][i] == pytest.approx(ref.mean(), rel=1e-3, abs=1e-5)
        assert out["std"][i] == pytest.approx(ref.std(), rel=1e-3, abs=1e-5)


def test_on_training_points_with_the_empirical_model_is_zero(train):
    emp = EmpiricalDenoiser(train)
    out = cosine_on_training_points(emp, emp, train, [1.0, 0.01], 100, torch.Generator().manual_seed(0))
    assert max(out["mean"]) < 1e-6 and max(out["std"]) < 1e-6


def test_on_trajectories_uses_recorded_denoised(train):
    emp, model = EmpiricalDenoiser(train), Shrink(c=-0.2)
    g = torch.Generator().manual_seed(3)
    trajs, sigmas = [], [4.0, 1.0, 0.2]
    for size in (2, 5):
        t = Trajectory()
        for s in sigmas:
            x = torch.randn(size, 1, 4, 4, generator=g) * s
            t(0, s, x, model(x, s))
        trajs.append(t)
    out = cosine_on_trajectories(emp, trajs)
    assert out["sigmas"] == sigmas
    for i, s in enumerate(sigmas):
        xs = np.concatenate([t.xs[i].numpy() for t in trajs]).astype(np.float64)
        ds = np.concatenate([t.denoised[i].numpy() for t in trajs]).astype(np.float64)
        ref = numpy_deviation(ds - xs, numpy_empirical(xs, train.numpy(), s) - xs)
        assert out["mean"][i] == pytest.approx(ref.mean(), rel=1e-4, abs=1e-5)
        assert out["std"][i] == pytest.approx(ref.std(), rel=1e-3, abs=1e-5)
    assert cosine_on_trajectories(emp, []) == {"sigmas": [], "mean": [], "std": []}


def test_cosine_deviation_in_row_blocks_equals_one_block(monkeypatch):
    """The float64 working copies are bounded by computing a few rows at a time; the result is that of all rows
    at once (a numpy float64 reference), zero vectors included."""
    import memaudit.metrics.score_cosine as sc

    g = torch.Generator().manual_seed(3)
    a, b, x = (torch.randn(7, 2, 3, generator=g) for _ in range(3))
    a[2] = 0.0
    b[2] = 0.0
    b[4] = 0.0
    a64, b64 = a.reshape(7, -1).double().numpy(), b.reshape(7, -1).double().numpy()
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    ref = 1.0 - np.where(norms > 0, (a64 * b64).sum(1) / np.where(norms > 0, norms, 1.0), 0.0)
    ref[2] = 0.0  # both zero: cos = 1
    monkeypatch.setattr(sc, "FLOAT64_BYTES", 8 * 3 * 6 * 2)  # two rows per block
    got = sc.cosine_deviation(a, b, x)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-12)
    assert sc.cosine_deviation(a[:0], b[:0], x[:0]).shape == (0,)
