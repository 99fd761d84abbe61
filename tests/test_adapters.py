"""Exactness of the adapters: eps/x0/v/score/edm networks and VP timesteps all give the same D(x, sigma)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from memaudit.denoiser import expand_like
from memaudit.models.adapters import NetworkDenoiser
from memaudit.models.parameterisations import PARAMETERISATIONS, to_denoised
from memaudit.models.schedules import SCHEDULES, Schedule, make_schedule


def denoised_to_output(param, d, x, sigma, sigma_data=0.5):
    """The network output that gives x0_hat = d, written out per parameterisation from the textbook formulas."""
    s = expand_like(sigma, x)
    alpha = 1.0 / torch.sqrt(1.0 + s**2)
    if param == "eps":
        return (x - d) / s
    if param == "x0":
        return d
    if param == "v":  # v = alpha eps - sigma_vp x0 with x_vp = alpha x, sigma_vp = sigma alpha
        return alpha * (x - d) / s - s * alpha * d
    if param == "score":
        return (d - x) / s**2
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / torch.sqrt(s**2 + sigma_data**2)
    return (d - c_skip * x) / c_out


class EpsNet(nn.Module):
    """A fixed nonlinear eps-predictor of (x_in, noise_in): a different output for every noise level."""

    def __init__(self, channels: int = 2):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(channels, channels, generator=gen, dtype=torch.float64) / 2)

    def forward(self, x_in, noise_in):
        mixed = torch.einsum("oc,bchw->bohw", self.weight, x_in)
        return torch.tanh(mixed + torch.sin(noise_in / 7.0)[:, None, None, None])


def sigma_from_noise_input(sched: Schedule, noise_in):
    """Invert the schedule's noise input: t -> sigma (VP), ln(sigma)/4 -> sigma (EDM), sigma (VE)."""
    if sched.kind.startswith("vp"):
        return sched.t_to_sigma(noise_in)
    if sched.kind == "edm":
        return torch.exp(4 * noise_in)
    return noise_in


class Reparameterised(nn.Module):
    """The network predicting `param` whose denoiser equals `base`: out = denoised_to_output(param, D_base)."""

    def __init__(self, base: NetworkDenoiser, param: str):
        super().__init__()
        self.base, self.param = base, param

    def forward(self, x_in, noise_in):
        sched = self.base.schedule
        sigma = sigma_from_noise_input(sched, noise_in)
        x = x_in / expand_like(sched.c_in(sigma), x_in)
        return denoised_to_output(self.param, self.base(x, sigma), x, sigma, sched.sigma_data)


def test_sigma_data_mapping_of_edm_is_consistent():
    sched = make_schedule("edm", sigma_data=0.5)
    sigma = torch.tensor([0.5], dtype=torch.float64)
    assert torch.allclose(sched.c_in(sigma), torch.tensor([1 / math.sqrt(0.5)], dtype=torch.float64))
    assert torch.allclose(sched.c_noise(sigma), torch.log(sigma) / 4)


@pytest.mark.parametrize("param", list(PARAMETERISATIONS))
def test_scalings_match_the_textbook_formulas(param):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    d = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.003, 0.2, 3.0, 70.0], dtype=torch.float64)
    out = denoised_to_output(param, d, x, sigma)
    torch.testing.assert_close(to_denoised(param, out, x, expand_like(sigma, x)), d, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("kind", list(SCHEDULES))
@pytest.mark.parametrize("param", [p for p in PARAMETERISATIONS if p != "eps"])
def test_equivalent_networks_give_the_same_denoiser(kind, param):
    sched = make_schedule(kind)
    eps_model = NetworkDenoiser(EpsNet(), "eps", sched)
    other = NetworkDenoiser(Reparameterised(eps_model, param), param, sched)
    lo, hi = sched.sigma_min, sched.sigma_max
    sigma = torch.tensor([lo * 1.01, math.sqrt(lo * hi), 0.3, 2.0, min(40.0, hi * 0.99)], dtype=torch.float64)
    x = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = x * (1 + sigma[:, None, None, None])
    expected = eps_model(x, sigma)
    assert not torch.allclose(expected, x)  # the eps network really does something
    torch.testing.assert_close(other(x, sigma), expected, atol=1e-5, rtol=1e-5)


# ---- discrete VP timesteps against an independent numpy computation ------------------------------

def numpy_alphas_cumprod(kind: str, n: int = 1000) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s): DDPM linear betas, or Nichol & Dhariwal cosine betas (capped)."""
    if kind == "vp-linear":
        betas = np.linspace(1e-4, 0.02, n)
    else:
        f = np.cos((np.arange(n + 1) / n + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    return np.cumprod(1 - betas)


class Recorder(nn.Module):
    """Records the inputs it is called with and predicts eps = 0 (so D(x, sigma) = x)."""

    def forward(self, x_in, noise_in):
        self.x_in, self.noise_in = x_in.clone(), noise_in.clone()
        return torch.zeros_like(x_in)


@pytest.mark.parametrize("kind", ["vp-linear", "vp-cosine"])
def test_vp_schedule_matches_numpy(kind):
    sched = make_schedule(kind)
    abar = numpy_alphas_cumprod(kind)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), abar, rtol=1e-12)
    np.testing.assert_allclose(sched.discrete_sigmas.numpy(), np.sqrt((1 - abar) / abar), rtol=1e-10)
    assert sched.sigma_min == pytest.approx(math.sqrt((1 - abar[0]) / abar[0]))
    assert sched.sigma_max == pytest.approx(math.sqrt((1 - abar[-1]) / abar[-1]))


@pytest.mark.parametrize("kind", ["vp-linear", "vp-cosine"])
def test_network_sees_exact_timestep_and_scaled_input(kind):
    sched = make_schedule(kind)
    abar = numpy_alphas_cumprod(kind)
    steps = [0, 1, 17, 500, 998, 999]
    sigma = sched.discrete_sigmas[steps]  # float64
    net = Recorder()
    x = torch.randn(len(steps), 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = NetworkDenoiser(net, "eps", sched)(x, sigma)
    torch.testing.assert_close(out, x)
    assert net.noise_in.tolist() == [float(t) for t in steps]
    expected_x_in = x.numpy() * np.sqrt(abar[steps])[:, None, None, None]  # x / sqrt(1 + sigma^2)
    np.testing.assert_allclose(net.x_in.numpy(), expected_x_in, rtol=1e-12)


def test_fractional_and_rounded_timesteps():
    sched = make_schedule("vp-linear")
    log_s = sched.discrete_sigmas.log()
    mid = ((log_s[10] + log_s[11]) / 2).exp()
    assert sched.sigma_to_t(mid.reshape(1)).item() == pytest.approx(10.5, abs=1e-9)
    sigma32 = sched.discrete_sigmas[[3, 250, 777]].float()
    sched.round_timesteps = True
    net = Recorder()
    NetworkDenoiser(net, "eps", sched)(torch.zeros(3, 1, 2, 2), sigma32)
    assert net.noise_in.tolist() == [3.0, 250.0, 777.0]


class TextbookNet(nn.Module):
    """VP textbook algebra, independent of memaudit: x_t = sqrt(a) x0 + sqrt(1-a) eps, v = sqrt(a) eps - sqrt(1-a) x0."""

    def __init__(self, eps_net: nn.Module, abar: np.ndarray, target: str):
        super().__init__()
        self.eps_net, self.abar, self.target = eps_net, torch.from_numpy(abar), target

    def forward(self, x_t, t):
        a = self.abar[t.long()][:, None, None, None]
        eps = self.eps_net(x_t, t)
        x0 = (x_t - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
        return x0 if self.target == "x0" else torch.sqrt(a) * eps - torch.sqrt(1 - a) * x0


@pytest.mark.parametrize("kind", ["vp-linear", "vp-cosine"])
@pytest.mark.parametrize("target", ["x0", "v"])
def test_textbook_vp_networks_match_eps_network(kind, target):
    sched = make_schedule(kind)
    steps = [0, 5, 100, 600, 999]
    sigma = sched.discrete_sigmas[steps]
    eps_net = EpsNet()
    x = torch.randn(len(steps), 2, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected = NetworkDenoiser(eps_net, "eps", sched)(x, sigma)
    textbook = NetworkDenoiser(TextbookNet(eps_net, numpy_alphas_cumprod(kind), target), target, sched)
    torch.testing.assert_close(textbook(x, sigma), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("interpolation", ["log", "linear"])
def test_fractional_timesteps_round_trip_and_linear_matches_np_interp(interpolation):
    sched = make_schedule("vp-linear:steps=50")
    sched.interpolation = interpolation
    t = torch.tensor([0.0, 0.3, 7.5, 20.25, 48.9, 49.0], dtype=torch.float64)
    sigma = sched.t_to_sigma(t)
    torch.testing.assert_close(sched.sigma_to_t(sigma), t, atol=1e-9, rtol=0)
    if interpolation == "linear":  # diffusers' Euler: np.interp(t, arange(T), sigmas)
        expected = np.interp(t.numpy(), np.arange(50), sched.discrete_sigmas.numpy())
        np.testing.assert_allclose(sigma.numpy(), expected, rtol=1e-12)
