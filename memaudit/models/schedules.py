"""Noise schedules: how a network expects its input x and noise level, given the EDM sigma; one table of kinds.

Each kind gives c_in(sigma) (the input scale) and c_noise(sigma) (the network's noise input), as EDM's
preconditioning classes and k-diffusion's DiscreteSchedule do:
  vp-*  discrete DDPM timesteps: c_in = 1/sqrt(1 + sigma^2) (x_vp = x / sqrt(1 + sigma^2)), c_noise = t with
        abar_t = 1 / (1 + sigma^2), sigma_t = sqrt((1 - abar_t) / abar_t); fractional t by interpolating log sigma
        between timesteps (vp-linear: DDPM's betas, vp-cosine: Nichol & Dhariwal's; any betas via alphas_cumprod)
  ve    the network sees x and sigma as they are: c_in = 1, c_noise = sigma
  edm   c_in = 1/sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from memaudit.errors import UserError



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
    interpolation: str = "log"  # between VP timesteps: "log" sigma (k-diffusion) or "linear" sigma (diffusers' Euler)

    def c_in(self, sigma: Tensor) -> Tensor:
        """Factor the network's input is multiplied by: 1/sqrt(1+sigma^2) (VP), 1 (VE), 1/sqrt(sigma^2+sd^2) (EDM)."""
        return SCHEDULES[self.kind].c_in(self, sigma)

    def c_noise(self, sigma: Tensor) -> Tensor:
        """The network's noise-level input: timestep t (VP), sigma (VE), ln(sigma)/4 (EDM)."""
        return SCHEDULES[self.kind].c_noise(self, sigma)

    @property
    def discrete_sigmas(self) -> Tensor:
        """sigma_t = sqrt((1 - abar_t) / abar_t) for each discrete VP timestep (increasing in t)."""
        abar = self.alphas_cumprod
        return torch.sqrt((1 - abar) / abar)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep whose log sigma (or sigma, interpolation "linear") interpolates linearly between
        discrete timesteps."""
        linear = self.interpolation == "linear"
        log_sigmas = self.discrete_sigmas.to(sigma.device)
        log_sigmas = log_sigmas if linear else log_sigmas.log()
        log_sigma = sigma.double() if linear else sigma.double().clamp(min=1e-30).log()
        idx = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
        frac = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        t = (idx - 1).double() + frac
        if self.round_timesteps:
            t = t.round()
        return t.to(sigma.dtype)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Inverse of sigma_to_t: interpolate log sigma (or sigma, interpolation "linear") at fractional timestep t."""
        linear = self.interpolation == "linear"
        sigmas = self.discrete_sigmas.to(t.device)
        values = sigmas if linear else sigmas.log()
        lo = t.double().floor().long().clamp(0, len(values) - 1)
        hi = (lo + 1).clamp(max=len(values) - 1)
        frac = t.double() - lo.double()
        value = (1 - frac) * values[lo] + frac * values[hi]
        return (value if linear else value.exp()).to(t.dtype)


def vp_schedule(kind: str, betas: Tensor, round_timesteps: bool = False) -> Schedule:
    """A VP schedule from its betas; valid sigma range is that of its first and last timestep."""
    abar = torch.cumprod(1 - betas.double(), dim=0)
    sig = torch.sqrt((1 - abar) / abar)
    return Schedule(kind, float(sig[0]), float(sig[-1]), alphas_cumprod=abar, round_timesteps=round_timesteps)


@dataclass(frozen=True)
class ScheduleKind:
    """A table entry: the two input functions of a schedule, its instance from parameters, and the parameters a
    --schedule KIND:name=value,... may set (besides sigma_data, which every kind takes)."""

    c_in: Callable[[Schedule, Tensor], Tensor]
    c_noise: Callable[[Schedule, Tensor], Tensor]
    default: Callable[..., Schedule]  # (sigma_data, num_timesteps, **params) -> Schedule
    summary: str
    params: tuple[str, ...] = ()


def _vp_c_in(sched: Schedule, sigma: Tensor) -> Tensor:
    return 1.0 / torch.sqrt(1.0 + sigma**2)


def _vp(kind: str, betas: Callable[..., Tensor]) -> Callable[..., Schedule]:
    def default(sigma_data: float, n: int, **params: float) -> Schedule:
        sched = vp_schedule(kind, betas(n, **params))
        sched.sigma_data = sigma_data
        return sched
    return default


BETA_RANGE = ("steps", "beta_start", "beta_end")


SCHEDULES: dict[str, ScheduleKind] = {
    "vp-linear": ScheduleKind(_vp_c_in, Schedule.sigma_to_t, _vp("vp-linear", linear_betas),
                              "discrete VP, DDPM linear betas 1e-4..0.02 (Ho et al. 2020)", BETA_RANGE),
    "vp-scaled-linear": ScheduleKind(_vp_c_in, Schedule.sigma_to_t, _vp("vp-scaled-linear", scaled_linear_betas),
                                     "discrete VP, sqrt(beta) linear 0.00085..0.012 (Stable Diffusion)", BETA_RANGE),
    "vp-cosine": ScheduleKind(_vp_c_in, Schedule.sigma_to_t, _vp("vp-cosine", cosine_betas),
                              "discrete VP, cosine betas (Nichol & Dhariwal 2021)", ("steps", "s", "max_beta")),
    "ve": ScheduleKind(lambda s, sigma: torch.ones_like(sigma), lambda s, sigma: sigma,
                       lambda sd, n: Schedule("ve", 0.01, 50.0, sd), "VE: x and sigma as they are (Song et al. 2021)"),
    "edm": ScheduleKind(lambda s, sigma: 1.0 / torch.sqrt(sigma**2 + s.sigma_data**2),
                        lambda s, sigma: torch.log(sigma) / 4, lambda sd, n: Schedule("edm", 0.002, 80.0, sd),
                        "EDM: c_in = 1/sqrt(sigma^2 + sd^2), c_noise = ln(sigma)/4 (Karras et al. 2022)"),
}
SCHEDULE_SYNTAX = ("KIND or KIND:name=value,... e.g. vp-linear:beta_start=1e-4,beta_end=0.02,steps=1000, "
                   "vp-cosine:steps=4000, edm:sigma_data=1")


def parse_schedule_spec(spec: str) -> tuple[str, dict[str, float]]:
    """("vp-linear", {"beta_end": 0.02, ...}) of "vp-linear:beta_end=0.02,..."; UserError naming a bad part."""
    kind, _, rest = spec.partition(":")
    if kind not in SCHEDULES:
        raise UserError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)} ({SCHEDULE_SYNTAX})")
    allowed = SCHEDULES[kind].params + ("sigma_data",)
    params: dict[str, float] = {}
    for part in filter(None, rest.split(",")):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in allowed:
            raise UserError(f"schedule {spec!r}: {part!r} is not name=value with a name of {kind}'s: "
                            f"{', '.join(allowed)}")
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"schedule {spec!r}: {name} must be a number, not {value!r}") from None
        if name == "steps" and not (number.is_integer() and number >= 2):
            raise UserError(f"schedule {spec!r}: steps must be an integer >= 2, not {value}")
        if not math.isfinite(number) or (name != "s" and number <= 0) or number < 0:
            raise UserError(f"schedule {spec!r}: {name} must be a positive number, not {value}")
        params[name] = int(number) if name == "steps" else number
    if "beta_start" in params and "beta_end" in params and not params["beta_start"] < params["beta_end"] < 1:
        raise UserError(f"schedule {spec!r}: need beta_start < beta_end < 1")
    return kind, params


def make_schedule(spec: str, sigma_min: float | None = None, sigma_max: float | None = None,
                  sigma_data: float = 0.5, num_timesteps: int = 1000) -> Schedule:
    """Build a named schedule (vp-linear, vp-scaled-linear, vp-cosine, ve, edm), with parameters as in
    "vp-linear:beta_start=1e-4,beta_end=0.02,steps=1000"; sigma_min/max override the default range."""
    kind, params = parse_schedule_spec(spec)
    sigma_data = params.pop("sigma_data", sigma_data)
    num_timesteps = params.pop("steps", num_timesteps)
    if kind.startswith("vp-"):
        sched = SCHEDULES[kind].default(sigma_data, num_timesteps, **params)
    else:
        sched = SCHEDULES[kind].default(sigma_data, num_timesteps)
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
