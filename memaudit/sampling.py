"""Sigma schedules and samplers, written against the denoiser interface D(x, sigma) only.

Probability-flow ODE: dx/dsigma = (x - D(x, sigma)) / sigma.  Reverse VE SDE (Euler-Maruyama):
x' = x + (sigma^2 - sigma'^2) * score + sqrt(sigma^2 - sigma'^2) * z.  All samplers are seeded and
deterministic for a given (seed, batch size, device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from memaudit.denoiser import Denoiser, clip_sigma_range
from memaudit.errors import UserError

SAMPLERS = ("heun", "euler", "sde", "edm-sde", "ddpm")
ODE_SAMPLERS = ("heun", "euler")
# callback(step index, sigma, x at that sigma, D(x, sigma))
StepCallback = Callable[[int, float, Tensor, Tensor], None]


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, i < n, then a final 0 (float64)."""
    if steps < 1:
        raise UserError(f"--steps must be >= 1, not {steps}")
    if not 0 < sigma_min <= sigma_max:
        raise UserError(f"invalid sigma range [{sigma_min}, {sigma_max}]")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


@dataclass
class SamplerConfig:
    """What to sample with: sampler name, steps, sigma range (clipped to the model's), SDE settings."""

    sampler: str = "heun"
    steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    s_churn: float = 40.0
    s_tmin: float = 0.05
    s_tmax: float = 50.0
    s_noise: float = 1.003

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")

    def sigmas_for(self, denoiser: Denoiser) -> Tensor:
        """The Karras schedule clipped to the denoiser's valid sigma range."""
        lo, hi = clip_sigma_range(denoiser, self.sigma_min, self.sigma_max)
        if lo >= hi:
            raise UserError(
                f"sigma range [{self.sigma_min:g}, {self.sigma_max:g}] does not overlap the model's valid range "
                f"[{denoiser.sigma_min:g}, {denoiser.sigma_max:g}]")
        return karras_sigmas(self.steps, lo, hi, self.rho)


def _denoise(denoiser: Denoiser, x: Tensor, sigma: float) -> Tensor:
    return denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device))


def euler_step(denoiser: Denoiser, x: Tensor, s_cur: float, s_next: float, denoised: Optional[Tensor] = None) -> Tensor:
    """x' = x + (s' - s) (x - D(x, s)) / s."""
    denoised = _denoise(denoiser, x, s_cur) if denoised is None else denoised
    return x + (s_next - s_cur) * (x - denoised) / s_cur


def heun_step(denoiser: Denoiser, x: Tensor, s_cur: float, s_next: float, denoised: Optional[Tensor] = None) -> Tensor:
    """EDM Algorithm 1 step: Euler to s', then average slopes (trapezoid) unless s' = 0."""
    denoised = _denoise(denoiser, x, s_cur) if denoised is None else denoised
    d_cur = (x - denoised) / s_cur
    x_next = x + (s_next - s_cur) * d_cur
    if s_next > 0:
        d_next = (x_next - _denoise(denoiser, x_next, s_next)) / s_next
        x_next = x + (s_next - s_cur) * 0.5 * (d_cur + d_next)
    return x_next


def _noise_like(x: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal noise drawn on the CPU generator (same numbers on every device)."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample_batch(denoiser: Denoiser, noise: Tensor, config: SamplerConfig, generator: torch.Generator,
                 callback: Optional[StepCallback] = None) -> Tensor:
    """Run one sampler from unit-variance `noise` (scaled by sigma_max) to sigma = 0."""
    sigmas = config.sigmas_for(denoiser).tolist()
    x = noise * sigmas[0]
    for i, (s_cur, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if config.sampler == "edm-sde":
            x, s_cur = _churn(x, s_cur, config, len(sigmas) - 1, generator)
        denoised = _denoise(denoiser, x, s_cur)
        if callback is not None:
            callback(i, s_cur, x, denoised)
        x = _step(denoiser, x, s_cur, s_next, denoised, config.sampler, generator)
    return x


def _step(denoiser, x, s_cur, s_next, denoised, sampler, generator) -> Tensor:
    if sampler in ("heun", "edm-sde"):
        return heun_step(denoiser, x, s_cur, s_next, denoised)
    if sampler == "euler":
        return euler_step(denoiser, x, s_cur, s_next, denoised)
    if sampler == "sde":
        return _euler_maruyama_step(x, s_cur, s_next, denoised, generator)
    return _ancestral_step(x, s_cur, s_next, denoised, generator)


def _euler_maruyama_step(x, s_cur, s_next, denoised, generator) -> Tensor:
    """Reverse VE SDE: x + (s^2 - s'^2) (D - x)/s^2 + sqrt(s^2 - s'^2) z; the step to 0 returns D."""
    if s_next == 0:
        return denoised
    var = s_cur**2 - s_next**2
    return x + var * (denoised - x) / s_cur**2 + math.sqrt(var) * _noise_like(x, generator)


def _ancestral_step(x, s_cur, s_next, denoised, generator) -> Tensor:
    """DDPM ancestral (eta = 1): s_up = s' sqrt(1 - s'^2/s^2), s_down = sqrt(s'^2 - s_up^2), Euler to s_down."""
    if s_next == 0:
        return denoised
    s_up = min(s_next, math.sqrt(s_next**2 * (s_cur**2 - s_next**2) / s_cur**2))
    s_down = math.sqrt(s_next**2 - s_up**2)
    x = x + (s_down - s_cur) * (x - denoised) / s_cur
    return x + s_up * _noise_like(x, generator)


def _churn(x, s_cur, config: SamplerConfig, n_steps: int, generator) -> tuple[Tensor, float]:
    """EDM Algorithm 2: raise sigma to s_hat = s (1 + gamma) by adding noise, gamma = min(S_churn/N, sqrt2 - 1)."""
    gamma = min(config.s_churn / n_steps, math.sqrt(2) - 1) if config.s_tmin <= s_cur <= config.s_tmax else 0.0
    if gamma == 0:
        return x, s_cur
    s_hat = s_cur * (1 + gamma)
    x = x + math.sqrt(s_hat**2 - s_cur**2) * config.s_noise * _noise_like(x, generator)
    return x, s_hat


@dataclass
class Trajectory:
    """Per-step sigma, x and D(x) for a batch, recorded by `record_trajectory` (CPU tensors)."""

    sigmas: list[float] = field(default_factory=list)
    xs: list[Tensor] = field(default_factory=list)
    denoised: list[Tensor] = field(default_factory=list)

    def __call__(self, step: int, sigma: float, x: Tensor, denoised: Tensor) -> None:
        self.sigmas.append(float(sigma))
        self.xs.append(x.detach().cpu())
        self.denoised.append(denoised.detach().cpu())


@dataclass
class SamplingState:
    """Progress of a batched sampling run: finished batches, recorded trajectories, CPU generator state.

    Saving it after each batch and passing it back to `sample` continues the run exactly (resume).
    """

    batches: list[Tensor] = field(default_factory=list)
    trajectories: list[Trajectory] = field(default_factory=list)
    done: int = 0
    generator_state: Optional[Tensor] = None


def sample(denoiser: Denoiser, n: int, config: SamplerConfig, seed: int = 0, batch_size: int = 64,
           device: str | torch.device | None = None, progress: Optional[Callable[[int], None]] = None,
           record: int = 0, state: Optional[SamplingState] = None,
           on_batch: Optional[Callable[[SamplingState], None]] = None) -> tuple[Tensor, list[Trajectory]]:
    """Draw n samples in batches; returns (samples on CPU, trajectories of the first `record` samples).

    All noise comes from one CPU generator seeded with `seed`, so results do not depend on the device.
    `progress(k)` gets the number of samples done after each batch; `on_batch(state)` gets the state to
    save for a resume, and passing that `state` back continues the run to the same result.
    """
    if denoiser.image_shape is None:
        raise UserError("the model does not declare an image shape; pass data so it can be inferred")
    if n < 1:
        raise UserError(f"number of samples must be >= 1, not {n}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, not {batch_size}")
    device = torch.device(device) if device is not None else denoiser.device
    generator = torch.Generator().manual_seed(int(seed))
    state = state or SamplingState()
    if state.generator_state is not None:
        generator.set_state(state.generator_state)
    while state.done < n:
        size = min(batch_size, n - state.done)
        noise = torch.randn((size, *denoiser.image_shape), generator=generator).to(device)
        traj = Trajectory() if state.done < record else None
        state.batches.append(sample_batch(denoiser, noise, config, generator, traj).cpu())
        if traj is not None:
            state.trajectories.append(traj)
        state.done += size
        state.generator_state = generator.get_state()
        if on_batch is not None:
            on_batch(state)
        if progress is not None:
            progress(state.done)
    return torch.cat(state.batches)[:n], state.trajectories
