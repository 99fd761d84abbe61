"""Issue 9: the seed papers' smoothing against numpy references and closed forms.

Power-law temperature weights (Zhou et al. 2026, Eq. 10), their schedule, the neighbours of the clean source,
kernel smoothing D_h by Monte Carlo, the unbiased kNN tail, Chen's 1-D flow map, and the interpolation effect on
data spread along a line.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from memaudit.denoiser import Denoiser
from memaudit.empirical import EmpiricalDenoiser
from memaudit.errors import UserError
from memaudit.sampling import SAMPLERS, SamplerConfig, cpu_noise, karras_sigmas, sample
from memaudit.smoothing.kernel import KernelSmoothedDenoiser, kernel_perturbations
from memaudit.smoothing.knn_graph import knn_graph
from memaudit.smoothing.power_law import (log_weights, parse_temperature, power_law_weights, smoothed_target,
                                          weight_entropy)


def numpy_power_law(x, neighbours, T):
    """w_j = ||x - mu_j||^(-(d-2)/T) / sum_l ||x - mu_l||^(-(d-2)/T), in float64 (log domain)."""
    d = x.shape[-1]
    logd = np.log(((x[:, None, :] - neighbours) ** 2).sum(-1))
    logw = -(d - 2) / (2 * T[:, None]) * logd
    logw -= logw.max(1, keepdims=True)
    w = np.exp(logw)
    return w / w.sum(1, keepdims=True)


@pytest.fixture
def pairs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 16))
    neighbours = rng.normal(size=(5, 7, 16))
    T = np.array([1.0, 2.0, 3.5, 10.0, 100.0])
    return x, neighbours, T


def test_power_law_weights_match_numpy(pairs):
    x, nb, T = pairs
    got = power_law_weights(torch.from_numpy(x), torch.from_numpy(nb), torch.from_numpy(T)).numpy()
    np.testing.assert_allclose(got, numpy_power_law(x, nb, T), rtol=1e-10)


@pytest.mark.parametrize("denominator", ["sigma", "shell"])
def test_smoothed_target_matches_numpy(pairs, denominator):
    x, nb, T = pairs
    sigma = np.array([0.1, 0.5, 1.0, 2.0, 5.0])
    w = numpy_power_law(x, nb, T)
    if denominator == "sigma":
        want = np.einsum("bk,bkd->bd", w, nb)
    else:
        d = x.shape[1]
        shell = ((nb - x[:, None]) ** 2).sum(-1) / (d - 2)
        want = x + sigma[:, None] ** 2 * np.einsum("bk,bkd->bd", w / shell, nb - x[:, None])
    got = smoothed_target(torch.from_numpy(x), torch.from_numpy(nb), torch.from_numpy(sigma), torch.from_numpy(T),
                          denominator)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    with pytest.raises(UserError):
        smoothed_target(torch.from_numpy(x), torch.from_numpy(nb), torch.from_numpy(sigma), torch.from_numpy(T), "x")


def test_weight_entropy_limits():
    x = torch.zeros(2, 8, dtype=torch.float64)
    near = torch.tensor([[[0.01] * 8] + [[1.0] * 8] * 3], dtype=torch.float64).expand(2, -1, -1)
    h = weight_entropy(x, near, torch.tensor([1.0, 1e6], dtype=torch.float64))
    assert h[0] == pytest.approx(0.0, abs=1e-6)  # the source dominates at T = 1
    assert h[1] == pytest.approx(math.log(4), rel=1e-3)  # near-uniform at a huge T


@settings(max_examples=60, deadline=None)
@given(st.integers(16, 512), st.lists(st.floats(0.5, 5.0), min_size=3, max_size=8, unique=True),
       st.floats(1.0, 50.0))
def test_no_gaussian_sigma_reproduces_the_power_law_weights(d, distances, T):
    """Power-law log weights are -((d-2)/(2T)) log r^2, Gaussian ones -r^2 / (2 s^2): for three or more distinct
    distances no single s gives the same weights (log is strictly concave), however s is chosen."""
    r2 = np.array(sorted(distances)) ** 2
    assume(np.all(r2[1:] / r2[:-1] >= 1.1))  # three or more clearly distinct distances
    target = -(d - 2) / (2 * T) * (np.log(r2) - np.log(r2[0]))  # log w_j - log w_1
    basis = -(r2 - r2[0]) / 2  # Gaussian: log w_j - log w_1 = basis / s^2
    inv_s2 = max(float(target @ basis / (basis @ basis)), 0.0)  # the best 1/s^2 in least squares
    residual = np.abs(target - inv_s2 * basis).max()
    assert residual > 1e-3 * np.abs(target).max()
    # and memaudit's weights are the power law, not a Gaussian: its log-weight gaps are `target`
    x = torch.zeros(1, d, dtype=torch.float64)
    neighbours = torch.zeros(1, len(r2), d, dtype=torch.float64)
    neighbours[0, :, 0] = torch.from_numpy(np.sqrt(r2))
    got = log_weights(x, neighbours, torch.tensor([T], dtype=torch.float64))[0].numpy()
    np.testing.assert_allclose(got - got[0], target, rtol=1e-9, atol=1e-9)


def test_temperature_schedules():
    constant = parse_temperature("2")
    assert not constant.per_sigma and constant.collapse == math.inf
    assert constant.temperature(torch.tensor([0.01, 50.0])).tolist() == [2.0, 2.0]
    paper = parse_temperature("7/sigma")
    assert paper.per_sigma and paper.collapse == 7.0
    torch.testing.assert_close(paper.temperature(torch.tensor([0.01, 1.0, 7.0, 20.0], dtype=torch.float64)),
                               torch.tensor([700.0, 7.0, 1.0, 1.0], dtype=torch.float64))
    assert parse_temperature("7/sigma", sigma_c=2.5).collapse == 2.5
    for bad in ("0", "-1", "abc", "0.5", "7/x", "inf"):
        with pytest.raises(UserError):
            parse_temperature(bad)


def test_knn_graph_is_the_neighbours_of_the_clean_source(digits32):
    graph = knn_graph(digits32, 5)
    flat = digits32.reshape(32, -1).double().numpy()
    d = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    want = np.argsort(d, axis=1, kind="stable")[:, :5]
    assert graph[:, 0].tolist() == list(range(32))  # the source itself first
    for i in range(32):
        assert set(graph[i].tolist()) == set(want[i].tolist())


def test_knn_graph_puts_the_source_first_among_exact_copies(digits32):
    doubled = torch.cat([digits32[:4], digits32[:4]])
    graph = knn_graph(doubled, 3)
    assert graph[:, 0].tolist() == list(range(8))
    assert all({(i + 4) % 8} <= set(graph[i].tolist()) for i in range(8))


# ------------------------------------------------------------------------------------------- kernel smoothing

def test_kernel_smoothing_is_the_average_over_its_fixed_perturbations(digits32):
    base = EmpiricalDenoiser(digits32)
    model = KernelSmoothedDenoiser(base, h=0.3, samples=8, seed=4)
    x = digits32[:3] + 0.2 * torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.05, 0.3, 1.0])
    e = kernel_perturbations((1, 8, 8), 0.3, 8, seed=4)
    torch.testing.assert_close(e[1], -e[0])  # antithetic pairs
    want = torch.stack([torch.stack([base(x[b:b + 1] + e[s:s + 1], sigma[b:b + 1])[0] for s in range(8)]).mean(0)
                        for b in range(3)])
    torch.testing.assert_close(model(x, sigma), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(model(x, sigma), model(x, sigma))  # a fixed set: deterministic


def test_kernel_smoothing_converges_to_an_independent_monte_carlo_estimate(digits32):
    base = EmpiricalDenoiser(digits32)
    x, sigma, h = digits32[5:6] * 0.5, torch.tensor([0.2]), 0.4
    many = KernelSmoothedDenoiser(base, h, samples=2048, seed=0)(x, sigma)
    g = torch.Generator().manual_seed(123)
    independent = torch.stack([base(x + h * torch.randn(x.shape, generator=g), sigma)[0] for _ in range(2048)]).mean(0)
    assert (many[0] - independent).abs().max() < 0.05


class Ramp(Denoiser):
    """Chen's smoothed piecewise-linear empirical score for two points at -1, +1 (S-PL-ESF, delta_t = kappa sqrt t),
    as a denoiser with t = sigma^2: s = -(x+1)/t left of delta-1, -(x-1)/t right of 1-delta, delta/(1-delta) x/t
    between; D = x + sigma^2 s."""

    image_shape = (1, 1, 1)

    def __init__(self, kappa):
        super().__init__()
        self.kappa = kappa

    def denoise(self, x, sigma):
        t = sigma.reshape(-1, 1, 1, 1).double() ** 2
        delta = (self.kappa * t.sqrt()).clamp(max=1.0)
        xd = x.double()
        score = torch.where(xd <= delta - 1, -(xd + 1) / t,
                            torch.where(xd >= 1 - delta, -(xd - 1) / t, delta / (1 - delta) * xd / t))
        return (xd + t * score).to(x.dtype)


def test_the_flow_map_of_the_interpolation_effect_paper():
    """kappa = 0.5, t0 = 0.5: phi_{0|t}(x) = x / (1 - kappa sqrt t) inside the ramp, so 0.1, 0.5, -0.3 go to
    0.1547, 0.7735, -0.4641 (Chen 2025, Sec. 4); integrated here by memaudit's Heun sampler."""
    sigma0 = math.sqrt(0.5)
    sigmas = torch.cat([torch.logspace(math.log10(sigma0), -6, 400, dtype=torch.float64),
                        torch.zeros(1, dtype=torch.float64)]).tolist()
    x = torch.tensor([0.1, 0.5, -0.3], dtype=torch.float64).reshape(3, 1, 1, 1)
    out = SAMPLERS["heun"].fn(Ramp(0.5), x, sigmas, cpu_noise(torch.Generator(), 3))
    np.testing.assert_allclose(out.reshape(-1).numpy(), [0.1547, 0.7735, -0.4641], atol=1e-4)


def line_data(n=8, d=32, seed=0):
    """n training points evenly spaced on a segment of length 2 along a random unit direction in R^d."""
    direction = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    direction /= direction.norm()
    t = torch.linspace(-1, 1, n, dtype=torch.float64)
    return (t[:, None] * direction).reshape(n, 1, 1, d).float(), direction.float(), t


def ks_to_uniform(positions: np.ndarray, lo=-1.0, hi=1.0) -> float:
    """Kolmogorov-Smirnov distance of the positions to the uniform law on [lo, hi]."""
    from scipy import stats

    return float(stats.kstest(positions, "uniform", args=(lo, hi - lo)).statistic)


def line_samples(model, n=400):
    x, _ = sample(model, n, SamplerConfig(sampler="heun", steps=30), seed=0, batch_size=n)
    return x.reshape(n, -1)


def test_kernel_smoothing_interpolates_along_a_line_and_contracts_across_it():
    train, direction, t = line_data()
    exact = line_samples(EmpiricalDenoiser(train))
    smooth = line_samples(KernelSmoothedDenoiser(EmpiricalDenoiser(train), h=0.25, samples=16))
    flat = train.reshape(len(train), -1)
    for samples in (exact, smooth):
        along = samples @ direction
        across = (samples - along[:, None] * direction).norm(dim=1)
        assert across.max() < 0.05  # both stay on the line
    on_point = lambda s: (torch.cdist(s, flat).min(1).values < 0.02).float().mean().item()  # noqa: E731
    assert on_point(exact) == 1.0  # the exact sampler lands on training points
    assert on_point(smooth) < 0.5  # the smoothed one between them
    assert ks_to_uniform((smooth @ direction).numpy()) < ks_to_uniform((exact @ direction).numpy())


# --------------------------------------------------------------------------------------- the kNN truncation

def test_a_tail_of_every_other_point_is_the_full_denoiser(digits32):
    full = EmpiricalDenoiser(digits32)
    tailed = EmpiricalDenoiser(digits32, k=5, tail=32)
    truncated = EmpiricalDenoiser(digits32, k=5)
    x = digits32[:4] + 0.8 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 1.0, 2.0, 4.0])
    torch.testing.assert_close(tailed(x, sigma), full(x, sigma), rtol=1e-5, atol=1e-5)
    assert (truncated(x, sigma) - full(x, sigma)).abs().max() > 1e-3  # the plain top-k is biased at large sigma


def test_a_short_random_tail_is_reweighted_to_the_full_denoiser_on_average(digits32):
    """tail = 8 of the 27 images outside the top 5: averaged over random tails the (M - K) / L' weight brings D
    close to the full D* (a ratio estimator: small bias), far closer than no reweighting or the plain top k."""
    full = EmpiricalDenoiser(digits32)
    x = digits32[:4] + 0.8 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([1.0, 2.0, 4.0, 8.0])
    want = full(x, sigma)
    mean = torch.stack([EmpiricalDenoiser(digits32, k=5, tail=8, seed=s)(x, sigma) for s in range(300)]).mean(0)
    top = EmpiricalDenoiser(digits32, k=5)(x, sigma)
    # the unweighted tail (each member weighed 1, like a neighbour), by hand from the same code's distances
    plain = []
    for s in range(300):
        model = EmpiricalDenoiser(digits32, k=5, tail=8, seed=s)
        xf, sig = x.reshape(4, -1), sigma
        idx = model.topk(xf, sig, 5).indices
        both = torch.cat([idx, model.tail_indices.expand(4, -1)], 1)
        logits = -((xf[:, None] - model.points[both]) ** 2).sum(-1) / (2 * sig[:, None] ** 2)
        dup = (both[:, 5:, None] == idx[:, None, :]).any(2)
        logits[:, 5:] = logits[:, 5:].masked_fill(dup, -torch.inf)
        plain.append(torch.einsum("bk,bkd->bd", torch.softmax(logits, 1), model.points[both]).reshape(x.shape))
    plain = torch.stack(plain).mean(0)
    err = lambda d: float((d - want).abs().max())  # noqa: E731
    assert err(mean) < 0.06
    assert err(plain) > 4 * err(mean) and err(top) > 4 * err(mean)


def test_truncated_mass_matches_numpy(digits32):
    model = EmpiricalDenoiser(digits32)
    x = digits32[:3] + torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.3, 1.0, 3.0])
    flat, pts = x.reshape(3, -1).double().numpy(), digits32.reshape(32, -1).double().numpy()
    logits = -((flat[:, None] - pts[None]) ** 2).sum(-1) / (2 * sigma.double().numpy()[:, None] ** 2)
    w = np.exp(logits - logits.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    want = 1 - np.sort(w, axis=1)[:, -6:].sum(1)
    np.testing.assert_allclose(model.truncated_mass(x, sigma, 6).numpy(), want, rtol=1e-4, atol=1e-6)
    est = model.truncated_mass(x, sigma, 6, tail=20)
    assert (est - torch.from_numpy(want)).abs().max() < 0.05  # without the (M - k) / L' scale: 0.105 off
