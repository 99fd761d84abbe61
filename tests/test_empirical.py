"""The empirical denoiser against slow, independent numpy references."""

import numpy as np
import pytest
import torch

from jacobians import jacobian_of
from memaudit.empirical import EmpiricalDenoiser, parse_empirical_spec
from memaudit.errors import UserError
from memaudit.sampling import SamplerConfig, sample


def numpy_weights(x, train, sigma, temperature, k=None, h=None):
    """w_i = softmax(-||x - x_i||^2 / (2 max(sigma^2 T, h^2))), optionally over the k nearest only (float64)."""
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    pts = train.reshape(train.shape[0], -1).astype(np.float64)
    out = np.zeros((x.shape[0], pts.shape[0]))
    for b in range(x.shape[0]):
        d2 = ((x[b] - pts) ** 2).sum(1)
        keep = np.argsort(d2, kind="stable")[:k] if k else np.arange(len(d2))
        logits = -d2[keep] / (2 * numpy_variance(sigma[b], temperature, h))
        e = np.exp(logits - logits.max())
        out[b, keep] = e / e.sum()
    return out


def numpy_variance(sigma, temperature, h=None):
    """The softmax variance sigma^2 T, floored at h^2 when h is given."""
    return max(sigma ** 2 * temperature, (h or 0.0) ** 2)


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, size=(53, 1, 3, 4))
    x = rng.normal(size=(6, 1, 3, 4))
    sigma = np.array([0.05, 0.3, 1.0, 2.5, 10.0, 0.7])
    return train, x, sigma


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("chunk", [7, 53, 4096])
def test_denoiser_matches_numpy(problem, temperature, chunk):
    train, x, sigma = problem
    model = EmpiricalDenoiser(torch.from_numpy(train), temperature=temperature, chunk_size=chunk)
    got = model(torch.from_numpy(x), torch.from_numpy(sigma)).numpy().reshape(6, -1)
    want = numpy_weights(x, train, sigma, temperature) @ train.reshape(53, -1)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_denoiser_matches_numpy(problem, k):
    train, x, sigma = problem
    model = EmpiricalDenoiser(torch.from_numpy(train), temperature=2.0, k=k, chunk_size=11)
    got = model(torch.from_numpy(x), torch.from_numpy(sigma)).numpy().reshape(6, -1)
    want = numpy_weights(x, train, sigma, 2.0, k=k) @ train.reshape(53, -1)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_topk_weights_are_renormalised_top_weights(problem):
    train, x, sigma = problem
    model = EmpiricalDenoiser(torch.from_numpy(train), temperature=1.5, chunk_size=10)
    top = model.topk(torch.from_numpy(x), torch.from_numpy(sigma), 8)
    full = numpy_weights(x, train, sigma, 1.5)
    for b in range(6):
        order = np.argsort(-full[b], kind="stable")[:8]
        np.testing.assert_array_equal(np.sort(top.indices[b].numpy()), np.sort(order))
        np.testing.assert_allclose(top.weights()[b].numpy(), full[b, top.indices[b].numpy()] / full[b, order].sum(),
                                   rtol=1e-9)


@pytest.mark.parametrize("k", [None, 7])
def test_analytic_jacobian_is_weighted_covariance(problem, k):
    train, x, sigma = problem
    temperature = 2.0
    model = EmpiricalDenoiser(torch.from_numpy(train), temperature=temperature, k=k, chunk_size=9)
    jac = jacobian_of(model, torch.from_numpy(x), torch.from_numpy(sigma)).numpy()
    w = numpy_weights(x, train, sigma, temperature, k=k)
    pts = train.reshape(53, -1)
    for b in range(6):
        mean = w[b] @ pts
        cov = (w[b][:, None] * (pts - mean)).T @ (pts - mean)
        np.testing.assert_allclose(jac[b], cov / (sigma[b] ** 2 * temperature), rtol=1e-8, atol=1e-12)
    # and against autograd through the streaming forward pass
    for b in range(2):
        xb = torch.from_numpy(x[b:b + 1])
        auto = torch.autograd.functional.jacobian(
            lambda z: model(z.reshape(xb.shape), torch.from_numpy(sigma[b:b + 1])).reshape(-1), xb.reshape(-1))
        np.testing.assert_allclose(jac[b], auto.numpy(), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("k", [None, 7])
def test_jvp_matches_full_jacobian(problem, k):
    train, x, sigma = problem
    model = EmpiricalDenoiser(torch.from_numpy(train), temperature=1.0, k=k, chunk_size=8)
    v = torch.from_numpy(np.random.default_rng(1).normal(size=x.shape))
    jac = jacobian_of(model, torch.from_numpy(x), torch.from_numpy(sigma))
    want = torch.einsum("bde,be->bd", jac, v.reshape(6, -1))
    got = model.jvp(torch.from_numpy(x), torch.from_numpy(sigma), v).reshape(6, -1)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


# h = 0.8: the floor is active for sigma 0.05, 0.3 and 0.7 at T = 1 (and 0.05, 0.3 at T = 2), inactive above
@pytest.mark.parametrize("k", [None, 7])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bandwidth_floor_matches_numpy(problem, k, temperature):
    train, x, sigma = problem
    h = 0.8
    model = EmpiricalDenoiser(torch.from_numpy(train), temperature=temperature, k=k, chunk_size=9, bandwidth=h)
    xt, st = torch.from_numpy(x), torch.from_numpy(sigma)
    w = numpy_weights(x, train, sigma, temperature, k=k, h=h)
    pts = train.reshape(53, -1)
    np.testing.assert_allclose(model(xt, st).numpy().reshape(6, -1), w @ pts, rtol=1e-9, atol=1e-12)
    top = model.topk(xt, st, 53)
    full = np.zeros_like(w)
    for b in range(6):
        full[b, top.indices[b].numpy()] = top.weights()[b].numpy()
    if k is None:
        np.testing.assert_allclose(full, w, rtol=1e-9, atol=1e-12)
    jac = jacobian_of(model, xt, st).numpy()
    for b in range(6):
        mean = w[b] @ pts
        cov = (w[b][:, None] * (pts - mean)).T @ (pts - mean)
        np.testing.assert_allclose(jac[b], cov / numpy_variance(sigma[b], temperature, h), rtol=1e-8, atol=1e-12)
    v = torch.from_numpy(np.random.default_rng(1).normal(size=x.shape))
    torch.testing.assert_close(model.jvp(xt, st, v).reshape(6, -1),
                               torch.einsum("bde,be->bd", torch.from_numpy(jac), v.reshape(6, -1)),
                               rtol=1e-8, atol=1e-10)
    for b in range(2):  # autograd through the streaming / kNN forward pass, with the floor active (sigma 0.05, 0.3)
        xb = torch.from_numpy(x[b:b + 1])
        auto = torch.autograd.functional.jacobian(
            lambda z: model(z.reshape(xb.shape), st[b:b + 1]).reshape(-1), xb.reshape(-1))
        np.testing.assert_allclose(jac[b], auto.numpy(), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("h", [None, 0.0])
def test_no_bandwidth_is_the_plain_denoiser(problem, h):
    train, x, sigma = problem
    plain = EmpiricalDenoiser(torch.from_numpy(train), temperature=2.0, k=7)
    floored = EmpiricalDenoiser(torch.from_numpy(train), temperature=2.0, k=7, bandwidth=h)
    xt, st = torch.from_numpy(x), torch.from_numpy(sigma)
    assert floored.bandwidth is None
    torch.testing.assert_close(floored(xt, st), plain(xt, st), rtol=0, atol=0)
    torch.testing.assert_close(jacobian_of(floored, xt, st), jacobian_of(plain, xt, st), rtol=0, atol=0)


def test_bandwidth_stops_the_collapse_at_small_sigma(digits32):
    x = digits32[:4] + 1e-3 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    plain, floored = EmpiricalDenoiser(digits32, temperature=2.0), EmpiricalDenoiser(digits32, 2.0, bandwidth=2.0)
    torch.testing.assert_close(plain(x, 0.002), digits32[:4], atol=1e-5, rtol=0)
    assert (floored(x, 0.002) - digits32[:4]).abs().amax() > 0.1
    torch.testing.assert_close(floored(x, 0.002), floored(x, 1.0), rtol=0, atol=1e-6)  # below h / sqrt(T): constant


def test_float32_tiny_sigma_is_stable_and_picks_nearest(digits32):
    model = EmpiricalDenoiser(digits32, chunk_size=5)
    x = digits32[:4] + 1e-3 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = model(x, 0.002)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, digits32[:4], atol=1e-5, rtol=0)


def test_t1_ode_samples_land_on_training_points(digits32):
    model = EmpiricalDenoiser(digits32)
    samples, _ = sample(model, 24, SamplerConfig(sampler="heun", steps=18), seed=3)
    dist = torch.cdist(samples.reshape(24, -1), digits32.reshape(32, -1))
    two = dist.topk(2, dim=1, largest=False).values
    assert (two[:, 0] < 0.02).all(), two[:, 0].max()
    assert (two[:, 0] / two[:, 1] < 0.01).all()
    assert len(set(dist.argmin(1).tolist())) > 5  # not a single mode


def test_spec_parsing():
    assert parse_empirical_spec("empirical") == {}
    assert parse_empirical_spec("empirical:T=2,k=64") == {"temperature": 2.0, "k": 64}
    assert parse_empirical_spec("empirical: temperature=1.5 , chunk=128") == {"temperature": 1.5, "chunk_size": 128}
    assert parse_empirical_spec("empirical:T=2,k=64,h=0.5") == {"temperature": 2.0, "k": 64, "bandwidth": 0.5}
    assert parse_empirical_spec("empirical:bandwidth=1") == {"bandwidth": 1.0}
    for bad in ["empirical:T", "empirical:q=1", "empirical:k=two", "empiric", "empirical:h=wide"]:
        with pytest.raises(UserError):
            parse_empirical_spec(bad)


def test_bad_arguments_are_user_errors(digits32):
    with pytest.raises(UserError):
        EmpiricalDenoiser(digits32, temperature=0)
    with pytest.raises(UserError):
        EmpiricalDenoiser(digits32, k=0)
    with pytest.raises(UserError):
        EmpiricalDenoiser(digits32[:0])
    with pytest.raises(UserError):
        EmpiricalDenoiser(digits32, bandwidth=-1)
