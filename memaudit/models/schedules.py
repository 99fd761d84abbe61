"""Noise schedules: how a network expects its input x and noise level, given the EDM sigma.

VP (discrete DDPM timesteps): x_vp = x / sqrt(1 + sigma^2), abar_t = 1 / (1 + sigma^2),
sigma_t = sqrt((1 - abar_t) / abar_t); fractional t by interpolating log sigma between timesteps.
VE: the network sees x and sigma as they are.  EDM: x_in = c_in * x, noise input c_noise = ln(sigma) / 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from memaudit.errors import UserError

SCHEDULES = ("vp-linear", "vp-cosine", "ve", "edm")


def linear_betas(n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM linear schedule: beta_t evenly spaced in [beta_start, beta_end]."""
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)


def scaled_linear_betas(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Stable Diffusion's schedule: sqrt(beta_t) evenly spaced."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2


def cosine_betas(n: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal cosine schedule: abar(t) = cos^2(((t/n) + s) / (1 + s) * pi / 2)."""
    def abar(t: float) -> float:
        return math.cos((t / n + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - abar(i + 1) / abar(i), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float64)


@dataclass
class Schedule:
    """Maps EDM sigma to the network's (input scale, noise input) and declares the valid sigma range."""

    kind: str
    sigma_min: float
    sigma_max: float
    sigma_data: float = 0.5
    alphas_cumprod: Tensor | None = field(default=None, repr=False)
    round_timesteps: bool = False

    def input_scale(self, sigma: Tensor) -> Tensor:
        """Factor the network's input is multiplied by: 1/sqrt(1+sigma^2) (VP), 1 (VE), c_in (EDM)."""
        if self.kind.startswith("vp"):
            return 1.0 / torch.sqrt(1.0 + sigma**2)
        if self.kind == "edm":
            return 1.0 / torch.sqrt(sigma**2 + self.sigma_data**2)
        return torch.ones_like(sigma)

    def noise_input(self, sigma: Tensor) -> Tensor:
        """The network's noise-level input: timestep t (VP), sigma (VE), ln(sigma)/4 (EDM)."""
        if self.kind.startswith("vp"):
            return self.sigma_to_t(sigma)
        if self.kind == "edm":
            return torch.log(sigma) / 4
        return sigma

    @property
    def discrete_sigmas(self) -> Tensor:
        """sigma_t = sqrt((1 - abar_t) / abar_t) for each discrete VP timestep (increasing in t)."""
        abar = self.alphas_cumprod
        return torch.sqrt((1 - abar) / abar)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep whose log sigma interpolates linearly between discrete timesteps."""
        log_sigmas = self.discrete_sigmas.log().to(sigma.device)
        log_sigma = sigma.double().clamp(min=1e-30).log()
        idx = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
        frac = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        t = (idx - 1).double() + frac
        if self.round_timesteps:
            t = t.round()
        return t.to(sigma.dtype)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Inverse of sigma_to_t: interpolate log sigma at fractional timestep t."""
        log_sigmas = self.discrete_sigmas.log().to(t.device)
        lo = t.double().floor().long().clamp(0, len(log_sigmas) - 1)
        hi = (lo + 1).clamp(max=len(log_sigmas) - 1)
        frac = t.double() - lo.double()
        return ((1 - frac) * log_sigmas[lo] + frac * log_sigmas[hi]).exp().to(t.dtype)


def vp_schedule(kind: str, betas: Tensor, round_timesteps: bool = False) -> Schedule:
    """A VP schedule from its betas; valid sigma range is that of its first and last timestep."""
    abar = torch.cumprod(1 - betas.double(), dim=0)
    sig = torch.sqrt((1 - abar) / abar)
    return Schedule(kind, float(sig[0]), float(sig[-1]), alphas_cumprod=abar, round_timesteps=round_timesteps)


def make_schedule(kind: str, sigma_min: float | None = None, sigma_max: float | None = None,
                  sigma_data: float = 0.5, num_timesteps: int = 1000) -> Schedule:
    """Build a named schedule (vp-linear, vp-cosine, ve, edm); sigma_min/max override the defaults."""
    if kind == "vp-linear":
        sched = vp_schedule(kind, linear_betas(num_timesteps))
    elif kind == "vp-cosine":
        sched = vp_schedule(kind, cosine_betas(num_timesteps))
    elif kind == "ve":
        sched = Schedule(kind, 0.01, 50.0, sigma_data)
    elif kind == "edm":
        sched = Schedule(kind, 0.002, 80.0, sigma_data)
    else:
        raise UserError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    return set_sigma_range(sched, sigma_min, sigma_max)


def set_sigma_range(sched: Schedule, sigma_min: float | None = None, sigma_max: float | None = None) -> Schedule:
    """Override the schedule's valid sigma range where given; UserError unless 0 < min < max."""
    if sigma_min is not None:
        sched.sigma_min = float(sigma_min)
    if sigma_max is not None:
        sched.sigma_max = float(sigma_max)
    if not 0 < sched.sigma_min < sched.sigma_max:
        raise UserError(f"invalid sigma range [{sched.sigma_min}, {sched.sigma_max}]: need 0 < min < max")
    return sched
