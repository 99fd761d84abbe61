"""Regression targets for `memaudit smooth` (fine-tuning) and `memaudit train` (from scratch): one table.

A target maps a training pair (index i of the clean source mu = x0, x = mu + sigma n, sigma) to what D(x, sigma)
is fitted to with the EDM loss:

  denoise      mu (plain denoising score matching)
  temperature  Zhou et al. 2026 Eqs. 10-11: mu above sigma_c; the power-law mixture of mu's K nearest training
               images (memaudit.smoothing.power_law) at and below it
  kernel       the kernel-smoothed empirical denoiser D_h(x, sigma) = E_e D*(x + e, sigma), e ~ N(0, h^2 I)
               (memaudit.smoothing.kernel)

Noise unconditioning (Eq. 9) is separate and composes with any target: the network's noise input is fixed to
one constant, so the network F never sees sigma (Sun et al. 2025 call this "noise-unconditional"; the EDM
preconditioning around F still scales by sigma, as a sampler's formulation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from memaudit.empirical import EmpiricalDenoiser
from memaudit.errors import SettingError
from memaudit.features import feature_space
from memaudit.smoothing.kernel import DEFAULT_SAMPLES, KernelSmoothedDenoiser, check_samples
from memaudit.smoothing.knn_graph import knn_graph
from memaudit.smoothing.power_law import DENOMINATORS, TemperatureSchedule, parse_temperature, smoothed_target

# target(idx, x0, x, sigma) -> the regression target for D(x, sigma); idx (B,) indexes the training set
TargetFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass
class SmoothingConfig:
    """Which target, and its settings (see the module docstring); `uncondition` fixes the noise input."""

    temperature: Optional[str] = None  # "2" (constant T) or "7/sigma" (T = max(c/sigma, 1), sigma_c = c)
    k: int = 30
    sigma_collapse: Optional[float] = None  # overrides sigma_c
    features: Optional[str] = None  # feature space of the kNN graph (pixels by default)
    denominator: str = "sigma"
    kernel: Optional[float] = None  # bandwidth h of the kernel target
    kernel_samples: int = DEFAULT_SAMPLES
    uncondition: bool = False

    @property
    def target(self) -> str:
        return "temperature" if self.temperature is not None else "kernel" if self.kernel else "denoise"

    def schedule(self) -> Optional[TemperatureSchedule]:
        return parse_temperature(self.temperature, self.sigma_collapse) if self.temperature is not None else None

    def validate(self) -> None:
        if self.temperature is not None and self.kernel:
            raise SettingError("kernel", self.kernel, "not combined with a temperature (choose one target)")
        self.schedule()
        if self.k < 1:
            raise SettingError("k", self.k, ">= 1")
        if self.denominator not in DENOMINATORS:
            raise SettingError("denominator", self.denominator, f"one of {', '.join(DENOMINATORS)}")
        if self.kernel is not None and not (math.isfinite(self.kernel) and self.kernel > 0):
            raise SettingError("kernel", self.kernel, "a finite bandwidth h > 0")
        check_samples(self.kernel_samples, "kernel_samples")

    @property
    def action(self) -> str:
        """The checkpoint history's action: 'smooth', 'kernel', 'uncondition', 'smooth+uncondition', ..."""
        parts = {"temperature": ["smooth"], "kernel": ["kernel"], "denoise": []}[self.target]
        return "+".join(parts + (["uncondition"] if self.uncondition else [])) or "denoise"

    def record(self) -> dict:
        """What the history and the resume check keep of these settings."""
        out = {"target": self.target, "uncondition": self.uncondition}
        if self.target == "temperature":
            schedule = self.schedule()
            out.update(temperature=self.temperature, sigma_collapse=schedule.collapse, k=self.k,
                       denominator=self.denominator, knn_features=self.features or "pixels")
        elif self.target == "kernel":
            out.update(kernel=self.kernel, kernel_samples=self.kernel_samples)
        return out


def power_law_target(train: Tensor, config: SmoothingConfig) -> TargetFn:
    """Eq. 11: mu above sigma_c; below it the power-law mixture (Eq. 10) of the K nearest images to mu."""
    schedule = config.schedule()
    space = feature_space(config.features, train.device, tuple(train.shape[1:]))
    graph = knn_graph(train, config.k, space).to(train.device)
    flat = train.reshape(train.shape[0], -1)

    @torch.no_grad()
    def target(idx: Tensor, x0: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        smooth = sigma <= schedule.collapse
        out = x0.clone()
        if smooth.any():
            rows = idx.to(train.device)[smooth]
            xf = x[smooth].reshape(int(smooth.sum()), -1).double()
            neighbours = flat[graph[rows]].double()
            s = sigma[smooth].double()
            mixed = smoothed_target(xf, neighbours, s, schedule.temperature(s), config.denominator)
            out[smooth] = mixed.reshape(x0[smooth].shape).to(x0.dtype)
        return out

    return target


def kernel_target(train: Tensor, config: SmoothingConfig) -> TargetFn:
    """D_h(x, sigma) of the training set's empirical denoiser."""
    model = KernelSmoothedDenoiser(EmpiricalDenoiser(train), config.kernel, config.kernel_samples).to(train.device)

    @torch.no_grad()
    def target(idx: Tensor, x0: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        return model(x, sigma)

    return target


TARGETS: dict[str, Callable[[Tensor, SmoothingConfig], Optional[TargetFn]]] = {
    "denoise": lambda train, config: None,  # the trainer's own x0
    "temperature": power_law_target,
    "kernel": kernel_target,
}


def make_target(train: Tensor, config: SmoothingConfig) -> Optional[TargetFn]:
    """The target function of config.target (None: plain denoising)."""
    config.validate()
    return TARGETS[config.target](train, config)
