"""Fine-tuning a loaded denoiser toward the smoothed empirical denoiser and/or without noise conditioning.

Smoothing: regress D_theta(x, sigma), x = x0 + sigma n, onto D*_T(x, sigma) = sum_{i in kNN_k(x)} w_i x_i,
w_i = softmax_i(-||x - x_i||^2 / (2 sigma^2 T)).  Unconditioning: the network's noise input is fixed to a
constant c, D_theta(x, sigma) = mix_sigma(x, F(c_in(sigma) x, c)), regressed onto x0 (onto D*_T when both are
asked for: the two options compose, one changes the target, the other the network's conditioning).
Both run training.fit (EDM loss, EMA, atomic resumable native checkpoints).
Note D*_T(x, sigma) = D*_1(x, sigma sqrt(T)) (the kNN set does not depend on sigma): at small sigma the target
still collapses onto the nearest training point, so any effect on memorization comes from how the network
generalises, not from the target (measured in examples/smoothing/README.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from memaudit.denoiser import Denoiser
from memaudit.empirical import EmpiricalDenoiser
from memaudit.errors import SettingError, UserError
from memaudit.fingerprints import model_fingerprint
from memaudit.models.adapters import NetworkDenoiser
from memaudit.models.native import native_config
from memaudit.training import TargetFn, TrainConfig, fit


@dataclass
class FinetuneConfig:
    """What to fine-tune toward: D*_T over k neighbours (temperature None = target x0), optionally with a
    bandwidth floor h (softmax variance max(sigma^2 T, h^2)), and unconditioning."""

    temperature: Optional[float] = 2.0
    k: int = 64
    uncondition: bool = False
    bandwidth: Optional[float] = None

    def validate(self) -> None:
        if self.temperature is None and not self.uncondition:
            raise UserError("nothing to fine-tune: give a temperature, --uncondition, or both")
        if self.temperature is not None and not self.temperature >= 1:
            raise SettingError("temperature", self.temperature, ">= 1 (T = 1 is the exact empirical denoiser)")
        if self.k < 1:
            raise SettingError("k", self.k, ">= 1")
        if self.bandwidth is not None:
            if not self.bandwidth >= 0:
                raise SettingError("bandwidth", self.bandwidth, ">= 0")
            if self.temperature is None:
                raise UserError("--bandwidth applies to the smoothed target: give --temperature too")

    @property
    def action(self) -> str:
        """'smooth', 'uncondition' or 'smooth+uncondition' (the checkpoint history's action)."""
        return "+".join(name for name, on in (("smooth", self.temperature is not None),
                                               ("uncondition", self.uncondition)) if on)


def smoothing_target(train: Tensor, temperature: float, k: int, bandwidth: Optional[float] = None) -> TargetFn:
    """target(x0, x, sigma) = D*_T(x, sigma) restricted to the k nearest training points of x (softmax variance
    max(sigma^2 T, h^2) with a bandwidth floor h)."""
    empirical = EmpiricalDenoiser(train, temperature=temperature, k=k, bandwidth=bandwidth)

    @torch.no_grad()
    def target(x0: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        return empirical(x, sigma)

    return target


def constant_noise_input(denoiser: NetworkDenoiser, p_mean: float) -> float:
    """c = c_noise(exp(P_mean)): the network's own noise input at the median training sigma."""
    sigma = torch.tensor([math.exp(p_mean)], dtype=torch.float64)
    return float(denoiser.schedule.c_noise(sigma).reshape(-1)[0])


def uncondition(denoiser: NetworkDenoiser, value: float) -> NetworkDenoiser:
    """Fix the network's noise input to `value` (in place): F(c_in x, value) instead of F(c_in x, c_noise(sigma))."""
    denoiser.fixed_noise_input = float(value)
    return denoiser


def trainable(model: Denoiser) -> NetworkDenoiser:
    """The model as a NetworkDenoiser that can be fine-tuned and saved natively, or a UserError."""
    if not isinstance(model, NetworkDenoiser):
        raise UserError("only a network can be fine-tuned; the closed-form empirical model has no weights "
                        "(use it directly as --model empirical:T=..,k=..)")
    native_config(model)  # fails now, not after training, if the architecture cannot be saved
    return model.requires_grad_(True)


def history_entry(config: FinetuneConfig, train_config: TrainConfig, **info) -> dict:
    """The checkpoint-history record of one fine-tuning run."""
    entry = {"action": config.action, **info, "steps": train_config.steps, "batch_size": train_config.batch_size,
             "lr": train_config.lr, "seed": train_config.seed}
    if config.temperature is not None:
        entry.update(temperature=config.temperature, k=config.k)
        if config.bandwidth:
            entry["bandwidth"] = config.bandwidth
    return entry


def finetune(model: Denoiser, train: Tensor, config: FinetuneConfig, train_config: TrainConfig, out: Path,
             info: Optional[dict] = None, resume: bool = False,
             progress: Optional[Callable[..., None]] = None) -> NetworkDenoiser:
    """Fine-tune `model` on `train` as configured; write the native checkpoint `out` (EMA weights), whose
    history is the model's own plus one entry for this run (`info`, e.g. model and data paths, included)."""
    config.validate()
    train_config.validate()
    denoiser = trainable(model)
    extra = dict(info or {})
    if config.uncondition:
        extra["noise_input"] = constant_noise_input(denoiser, train_config.p_mean)
        uncondition(denoiser, extra["noise_input"])
    history = list(getattr(model, "history", []) or []) + [history_entry(config, train_config, **extra)]
    target = (smoothing_target(train, config.temperature, config.k, config.bandwidth)
              if config.temperature is not None else None)
    settings = {"finetune": {"temperature": config.temperature, "k": config.k, "uncondition": config.uncondition,
                             "bandwidth": config.bandwidth}, "weights": model_fingerprint(denoiser)}
    return fit(denoiser, train, train_config, out, history, target_fn=target, resume=resume, progress=progress,
               settings=settings)
