"""Sigma schedules and a table of samplers, written against the denoiser interface D(x, sigma) only.

Every sampler is one function `f(denoiser, x, sigmas, noise, callback)` in the style of k-diffusion's
`sampling.py`: `x` is the starting point at sigmas[0], `sigmas` the descending schedule ending in 0,
`noise(x)` draws standard normal noise shaped like x (unused by ODE samplers), and `callback(i, sigma, x,
denoised)` sees every step.  Probability-flow ODE: dx/dsigma = (x - D(x, sigma)) / sigma.  Every sampler ends
with a denoising step (the step to sigma = 0 returns D(x, sigma_min)).  `sample()` batches, seeds and resumes;
all noise comes from one CPU generator, so results do not depend on the device.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from memaudit.denoiser import Denoiser, clip_sigma_range
from memaudit.errors import UserError
from memaudit.storage import owned_cpu

# callback(step index, sigma, x at that sigma, D(x, sigma))
StepCallback = Callable[[int, float, Tensor, Tensor], None]
# noise(x) -> standard normal noise shaped like x
NoiseFn = Callable[[Tensor], Tensor]

DEFAULT_SIGMA_MIN = 0.002
DEFAULT_SIGMA_MAX = 80.0
# 50 Karras steps: at 18 (EDM's CIFAR setting) every sampler put a near-memorizer's fraction 3-15 points too
# low in tests against exact draws (tests/test_sampling.py); at 50 the second-order samplers are within 2.
DEFAULT_STEPS = 50


def karras_sigmas(steps: int, sigma_min: float = DEFAULT_SIGMA_MIN, sigma_max: float = DEFAULT_SIGMA_MAX,
                  rho: float = 7.0) -> Tensor:
    """sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, i < n, then a final 0 (float64)."""
    if steps < 1:
        raise UserError(f"the number of sampling steps must be >= 1, not {steps}")
    if not 0 < sigma_min <= sigma_max:
        raise UserError(f"invalid sigma range [{sigma_min}, {sigma_max}]")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def _denoise(denoiser: Denoiser, x: Tensor, sigma: float) -> Tensor:
    return denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device))


def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / sigma


# ------------------------------------------------------------------------------------------------ samplers

@torch.no_grad()
def euler(denoiser: Denoiser, x: Tensor, sigmas: Sequence[float], noise: Optional[NoiseFn] = None,
          callback: Optional[StepCallback] = None) -> Tensor:
    """Euler steps of the probability-flow ODE: x' = x + (s' - s) (x - D(x, s)) / s (Karras et al. 2022)."""
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = _denoise(denoiser, x, s)
        if callback is not None:
            callback(i, s, x, denoised)
        x = x + (s_next - s) * to_d(x, s, denoised)
    return x


@torch.no_grad()
def heun(denoiser: Denoiser, x: Tensor, sigmas: Sequence[float], noise: Optional[NoiseFn] = None,
         callback: Optional[StepCallback] = None, s_churn: float = 0.0, s_tmin: float = 0.0,
         s_tmax: float = math.inf, s_noise: float = 1.0) -> Tensor:
    """EDM Heun steps (Karras et al. 2022, Algorithm 1; with s_churn > 0 the stochastic Algorithm 2)."""
    steps = len(sigmas) - 1
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        # Increase noise temporarily: s_hat = s (1 + gamma).
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_churn > 0 and s_tmin <= s <= s_tmax else 0.0
        if gamma > 0:
            s_hat = s * (1 + gamma)
            x = x + math.sqrt(s_hat**2 - s**2) * s_noise * noise(x)
            s = s_hat
        denoised = _denoise(denoiser, x, s)
        if callback is not None:
            callback(i, s, x, denoised)
        # Euler step, then the 2nd-order correction (trapezoid) unless the step ends at sigma = 0.
        d_cur = to_d(x, s, denoised)
        x_next = x + (s_next - s) * d_cur
        if s_next > 0:
            d_next = to_d(x_next, s_next, _denoise(denoiser, x_next, s_next))
            x_next = x + (s_next - s) * 0.5 * (d_cur + d_next)
        x = x_next
    return x


@torch.no_grad()
def dpmpp_2m_sde(denoiser: Denoiser, x: Tensor, sigmas: Sequence[float], noise: NoiseFn,
                 callback: Optional[StepCallback] = None, eta: float = 1.0) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022; k-diffusion's sample_dpmpp_2m_sde, midpoint), the reverse SDE.

    With h = ln(s / s'): x' = (s'/s) e^(-eta h) x + (1 - e^(-(1+eta) h)) D + second-order correction
    + s' sqrt(1 - e^(-2 eta h)) z.  The injected noise keeps x at exactly noise level s' for any step size
    (Euler-Maruyama injects s^2 - s'^2, which leaves residual noise at coarse steps); the last step is D.
    """
    old_denoised, h_last = None, None
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = _denoise(denoiser, x, s)
        if callback is not None:
            callback(i, s, x, denoised)
        if s_next == 0:  # final denoising step
            x = denoised
            continue
        h = math.log(s / s_next)
        eta_h = eta * h
        x = (s_next / s) * math.exp(-eta_h) * x + (-math.expm1(-h - eta_h)) * denoised
        if old_denoised is not None:
            r = h_last / h
            x = x + 0.5 * (-math.expm1(-h - eta_h)) * (1 / r) * (denoised - old_denoised)
        if eta:
            x = x + noise(x) * s_next * math.sqrt(-math.expm1(-2 * eta_h))
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def ancestral(denoiser: Denoiser, x: Tensor, sigmas: Sequence[float], noise: NoiseFn,
              callback: Optional[StepCallback] = None, eta: float = 1.0) -> Tensor:
    """DDPM ancestral steps (Ho et al. 2020; k-diffusion's sample_euler_ancestral): the posterior
    q(x_s' | x_s, D): s_up = min(s', eta s' sqrt(1 - s'^2/s^2)), s_down = sqrt(s'^2 - s_up^2), Euler to s_down,
    add s_up z; the last step is D."""
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = _denoise(denoiser, x, s)
        if callback is not None:
            callback(i, s, x, denoised)
        if s_next == 0:
            x = denoised
            continue
        s_up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
        s_down = math.sqrt(s_next**2 - s_up**2)
        x = x + (s_down - s) * to_d(x, s, denoised)
        x = x + s_up * noise(x)
    return x


@torch.no_grad()
def predictor_corrector(denoiser: Denoiser, x: Tensor, sigmas: Sequence[float], noise: NoiseFn,
                        callback: Optional[StepCallback] = None, snr: float = 0.16, corrector_steps: int = 1) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 2, VE): at each sigma, Langevin corrector steps
    x <- x + e g + sqrt(2 e) z with g = s(x, sigma), e = 2 (snr sqrt(d) / ||g||)^2, then the reverse-diffusion
    predictor x <- x + (s^2 - s'^2) g + sqrt(s^2 - s'^2) z; the last predictor step returns its noise-free mean
    D(x, sigma_min).  Song's code takes batch means of ||z|| and ||g||; here ||g|| is per sample (a sample must
    not depend on the other rows of its batch: resume re-draws single rows) and ||z|| is its expectation sqrt(d),
    since the drawn ||z||^2 / ||g||^2 per sample is heavy-tailed and inflates the variance (on N(0.3, 0.5^2),
    50 steps: std 0.521 at d = 64, 0.623 at d = 4; batch means 0.515 and 0.517)."""
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        for _ in range(corrector_steps):
            grad = (_denoise(denoiser, x, s) - x) / s**2
            z = noise(x)
            ratio = math.sqrt(math.prod(x.shape[1:])) / _norms(grad).clamp_min(torch.finfo(x.dtype).tiny)
            step = 2 * (snr * ratio) ** 2
            x = x + step * grad + torch.sqrt(2 * step) * z
        denoised = _denoise(denoiser, x, s)
        if callback is not None:
            callback(i, s, x, denoised)
        if s_next == 0:
            x = denoised
            continue
        var = s**2 - s_next**2
        x = x + var * (denoised - x) / s**2 + math.sqrt(var) * noise(x)
    return x


def _norms(v: Tensor) -> Tensor:
    """Per-sample L2 norms shaped (B, 1, 1, ...) to broadcast against v."""
    return v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (v.ndim - 1)))


@torch.no_grad()
def adaptive(denoiser: Denoiser, x: Tensor, sigmas: Sequence[float], noise: Optional[NoiseFn] = None,
             callback: Optional[StepCallback] = None, nearest: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """The seed paper's adaptive step for noise-unconditioned models (Zhou et al. 2026, Sec. A.7, fix (b)):
    x <- x + alpha sigma*^2 s(x, sigma*), sigma* = ||x - NN(x)|| / sqrt(d) the noise level x actually carries
    (NN = its nearest training image), alpha = 1 - sigma'/sigma from the schedule (1 at the last step: a
    denoising step at sigma*). With s = (D - x) / sigma*^2 this is x <- x + alpha (D(x, sigma*) - x).
    It reads the training set (`nearest`), so it is a measuring device for audits, not a deployable sampler;
    note that it pulls any sample far from the training set back toward a denoised average."""
    if nearest is None:
        raise UserError("the adaptive sampler needs the training set (a nearest-neighbour distance)")
    lo, hi = float(denoiser.sigma_min), float(denoiser.sigma_max)
    d = math.prod(x.shape[1:])
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        star = (nearest(x).to(x.device, x.dtype) / math.sqrt(d)).clamp(lo, hi)
        denoised = denoiser(x, star)
        if callback is not None:
            callback(i, s, x, denoised)
        x = x + (1.0 - s_next / s) * (denoised - x)
    return x


@dataclass(frozen=True)
class Sampler:
    """A table entry: the function, whether it draws noise, whether it reads the training set (`nearest`), and
    one line for --help and the docs, and how many model evaluations a sample takes with N steps (the cost model)."""

    fn: Callable[..., Tensor]
    stochastic: bool
    summary: str
    needs_nearest: bool = False
    evals: Callable[[int], int] = lambda steps: steps


def _two_per_step(steps: int) -> int:
    """Heun: two evaluations per step, one for the last (it ends at sigma = 0)."""
    return 2 * steps - 1


SAMPLERS: dict[str, Sampler] = {
    "heun": Sampler(heun, False, "EDM Heun, 2nd-order ODE (Karras et al. 2022, Alg. 1)", evals=_two_per_step),
    "euler": Sampler(euler, False, "Euler, 1st-order ODE"),
    "sde": Sampler(dpmpp_2m_sde, True, "reverse SDE, DPM-Solver++(2M) SDE (Lu et al. 2022)"),
    "edm-sde": Sampler(partial(heun, s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003), True,
                       "EDM stochastic Heun, S_churn 40 (Karras et al. 2022, Alg. 2)", evals=_two_per_step),
    "ddpm": Sampler(ancestral, True, "DDPM ancestral, eta 1 (Ho et al. 2020)"),
    "pc": Sampler(predictor_corrector, True, "predictor-corrector: reverse diffusion + Langevin, snr 0.16 "
                                             "(Song et al. 2021)", evals=lambda steps: 2 * steps),
    "adaptive": Sampler(adaptive, False, "adaptive step at the implicit noise level ||x - NN(x)||/sqrt(d), for "
                                         "unconditioned models (Zhou et al. 2026)", needs_nearest=True),
}


def check_sampler(name: str) -> Sampler:
    """The table entry of `name`, or a UserError listing the choices."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


# --------------------------------------------------------------------------------------------- schedules

@dataclass
class SamplerConfig:
    """What to sample with: sampler name, steps and the Karras schedule's sigma range (clipped to the model's)."""

    sampler: str = "heun"
    steps: int = DEFAULT_STEPS
    sigma_min: float = DEFAULT_SIGMA_MIN
    sigma_max: float = DEFAULT_SIGMA_MAX
    rho: float = 7.0

    def __post_init__(self):
        check_sampler(self.sampler)

    def sigma_range(self, denoiser: Denoiser) -> tuple[float, float]:
        """[sigma_min, sigma_max] intersected with the denoiser's valid range (UserError if empty)."""
        lo, hi = clip_sigma_range(denoiser, self.sigma_min, self.sigma_max)
        if lo >= hi:
            raise UserError(
                f"sigma range [{self.sigma_min:g}, {self.sigma_max:g}] does not overlap the model's valid range "
                f"[{denoiser.sigma_min:g}, {denoiser.sigma_max:g}]")
        return lo, hi

    def sigmas_for(self, denoiser: Denoiser) -> Tensor:
        """The Karras schedule over sigma_range(denoiser), ending in 0."""
        lo, hi = self.sigma_range(denoiser)
        return karras_sigmas(self.steps, lo, hi, self.rho)


# ------------------------------------------------------------------------------------- batches and resume

class NonFiniteSamples(UserError):
    """The model produced NaN or inf while sampling: a one-line error (exit 2), never a 'perfect copy'."""


def cpu_noise(generator: torch.Generator, batch: int, rows: Optional[Tensor] = None) -> NoiseFn:
    """noise(x): standard normal noise for a batch of `batch` samples drawn on the CPU generator (same numbers
    on every device); with `rows`, the full batch is drawn and only those rows are returned (to re-run part of
    a batch exactly)."""
    def noise(x: Tensor) -> Tensor:
        z = torch.randn((batch, *x.shape[1:]), generator=generator, dtype=torch.float32)
        z = z if rows is None else z[rows]
        return z.to(device=x.device, dtype=x.dtype)

    return noise


def sample_batch(denoiser: Denoiser, size: int, config: SamplerConfig, generator: torch.Generator,
                 device: torch.device, callback: Optional[StepCallback] = None,
                 rows: Optional[Tensor] = None, nearest: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """One batch of `size` samples from the generator's current state (only `rows` of it when given); `nearest`
    (distance of each x to its nearest training image) is passed to the samplers that read the training set."""
    sigmas = config.sigmas_for(denoiser).tolist()
    noise = cpu_noise(generator, size, rows)
    x = noise(torch.empty((size if rows is None else len(rows), *denoiser.image_shape), device=device)) * sigmas[0]

    def checked(i: int, sigma: float, x_i: Tensor, denoised: Tensor) -> None:
        if not (torch.isfinite(x_i).all() and torch.isfinite(denoised).all()):
            raise NonFiniteSamples(
                f"the model's output became NaN or infinite while sampling with {config.sampler} at sigma={sigma:.4g} "
                f"(step {i + 1} of {config.steps}); it cannot be audited there: check its --param/--schedule, or "
                "narrow the noise range with --sigma-min/--sigma-max")
        if callback is not None:
            callback(i, sigma, x_i, denoised)

    entry = SAMPLERS[config.sampler]
    extra = {"nearest": nearest} if entry.needs_nearest else {}
    out = entry.fn(denoiser, x, sigmas, noise, checked, **extra)
    if not torch.isfinite(out).all():
        raise NonFiniteSamples(f"the model's final samples ({config.sampler}) hold NaN or infinite values")
    return out


@dataclass
class Trajectory:
    """Per-step sigma, x and D(x) of the first rows of a batch, recorded as a step callback (CPU tensors)."""

    sigmas: list[float] = field(default_factory=list)
    xs: list[Tensor] = field(default_factory=list)
    denoised: list[Tensor] = field(default_factory=list)
    rows: Optional[int] = None  # record only this many rows of each step (None: all)

    def __call__(self, step: int, sigma: float, x: Tensor, denoised: Tensor) -> None:
        self.sigmas.append(float(sigma))
        self.xs.append(owned_cpu(x[: self.rows]))  # not a view holding the whole batch
        self.denoised.append(owned_cpu(denoised[: self.rows]))


@dataclass
class Batch:
    """One finished batch: its samples (CPU), the generator state before and after it, its trajectory."""

    samples: Tensor
    generator_before: Tensor
    generator_after: Tensor
    trajectory: Optional[Trajectory] = None


def batch_seed(seed: int, k: int) -> int:
    """The seed of batch k of a run seeded with `seed`: every batch has its own generator, so any process can
    draw any batch (memaudit.distributed) and a run's samples do not depend on how its batches are shared out."""
    digest = hashlib.sha256(f"memaudit-batch:{int(seed)}:{int(k)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def batch_generator(seed: int, k: int) -> torch.Generator:
    """The CPU generator batch k of a run seeded with `seed` draws all its noise from."""
    return torch.Generator().manual_seed(batch_seed(seed, k))


@dataclass(frozen=True)
class BatchPlan:
    """What a sampling run draws: n samples in batches of `batch_size`, batch k seeded by batch_seed(seed, k),
    trajectories recorded for the first `record` samples."""

    n: int
    config: SamplerConfig
    seed: int
    batch_size: int
    record: int = 0

    @property
    def num_batches(self) -> int:
        return -(-self.n // self.batch_size)

    def size(self, k: int) -> int:
        return min(self.batch_size, self.n - k * self.batch_size)


def draw_batch(denoiser: Denoiser, plan: BatchPlan, k: int, device: torch.device,
               nearest: Optional[Callable[[Tensor], Tensor]] = None) -> Batch:
    """Batch k of the plan, from its own generator."""
    start, size = k * plan.batch_size, plan.size(k)
    generator = batch_generator(plan.seed, k)
    before = generator.get_state()
    traj = Trajectory(rows=min(size, plan.record - start)) if start < plan.record else None
    out = sample_batch(denoiser, size, plan.config, generator, device, traj, nearest=nearest)
    return Batch(out.cpu(), before, generator.get_state(), traj)


# source(denoiser, plan, first, device, nearest) -> the plan's batches first, first + 1, ... in order
BatchSource = Callable[..., Iterable[Batch]]


def local_batches(denoiser: Denoiser, plan: BatchPlan, first: int, device: torch.device,
                  nearest: Optional[Callable[[Tensor], Tensor]] = None) -> Iterator[Batch]:
    """The plan's batches from `first` on, drawn in this process."""
    for k in range(first, plan.num_batches):
        yield draw_batch(denoiser, plan, k, device, nearest)


def resumed_problem(plan: BatchPlan, batches: Sequence[Batch]) -> Optional[str]:
    """Why saved `batches` cannot be the plan's first batches (sizes, or generators other than the plan's
    batch_generator), or None."""
    for k, batch in enumerate(batches):
        if k >= plan.num_batches or batch.samples.shape[0] != plan.size(k):
            return f"saved batch {k} does not hold the {plan.size(k) if k < plan.num_batches else 0} samples " \
                   "these settings draw in it"
        if not torch.equal(batch.generator_before, batch_generator(plan.seed, k).get_state()):
            return f"saved batch {k} was drawn from another generator (an older memaudit seeded runs differently)"
    return None


def sample(denoiser: Denoiser, n: int, config: SamplerConfig, seed: int = 0, batch_size: int = 64,
           device: str | torch.device | None = None, progress: Optional[Callable[[int], None]] = None,
           record: int = 0, batches: Sequence[Batch] = (),
           on_batch: Optional[Callable[[Batch], None]] = None,
           nearest: Optional[Callable[[Tensor], Tensor]] = None,
           source: BatchSource = local_batches) -> tuple[Tensor, list[Trajectory]]:
    """Draw n samples in batches; returns (samples on CPU, trajectories of the first `record` samples).

    Batch k draws all its noise from its own CPU generator (batch_generator(seed, k)), so results depend on
    neither the device nor which process drew the batch (`source`: memaudit.distributed shares the batches out
    over torchrun ranks). `batches` are the first finished batches of an earlier run with the same settings
    (resume): sampling continues after them and gives the same result as an uninterrupted run.
    `on_batch(batch)` sees every new batch; `progress(k)` gets the number of samples done after each batch.
    """
    if denoiser.image_shape is None:
        raise UserError("the model does not declare an image shape; pass data so it can be inferred")
    if n < 1:
        raise UserError(f"number of samples must be >= 1, not {n}")
    if batch_size < 1:
        raise UserError(f"the batch size must be >= 1, not {batch_size}")
    device = torch.device(device) if device is not None else denoiser.device
    plan = BatchPlan(int(n), config, int(seed), int(batch_size), int(record))
    batches = list(batches)
    done = sum(b.samples.shape[0] for b in batches)
    for batch in source(denoiser, plan, len(batches), device, nearest):
        batches.append(batch)
        done += batch.samples.shape[0]
        if on_batch is not None:
            on_batch(batch)
        if progress is not None:
            progress(done)
    samples = torch.cat([b.samples for b in batches])[:n] if batches else torch.empty(0)
    return samples, [b.trajectory for b in batches if b.trajectory is not None]


def rerun_rows(denoiser: Denoiser, batch: Batch, rows: Tensor, config: SamplerConfig,
               device: str | torch.device, nearest: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Re-draw `rows` of a finished batch from its saved generator state (to check saved samples on resume)."""
    generator = torch.Generator()
    generator.set_state(batch.generator_before)
    return sample_batch(denoiser, batch.samples.shape[0], config, generator, torch.device(device), rows=rows,
                        nearest=nearest).cpu()
