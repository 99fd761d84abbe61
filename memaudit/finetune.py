"""Fine-tuning a loaded denoiser toward a smoothed target and/or without noise conditioning (`memaudit smooth`).

The targets are memaudit.smoothing.targets' table (denoise, temperature: Zhou et al. 2026 Eqs. 10-11, kernel);
unconditioning fixes the network's noise input to one constant, c = c_noise(exp(P_mean)), so F never sees sigma
(Eq. 9: the network gets no noise input). Both run training.fit (EDM loss, EMA, atomic resumable native
checkpoints); the same targets train from scratch through `memaudit train`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from memaudit.denoiser import Denoiser
from memaudit.errors import UserError
from memaudit.fingerprints import model_fingerprint
from memaudit.models.adapters import NetworkDenoiser
from memaudit.models.native import native_config
from memaudit.smoothing.targets import SmoothingConfig, make_target
from memaudit.training import TrainConfig, fit


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
        fmt = (getattr(model, "source", None) or {}).get("format")
        if fmt is not None:
            raise UserError(f"a {fmt} model cannot be fine-tuned by memaudit (it is scanned through its own "
                            "library's denoiser); scan it, or fine-tune it with that library")
        raise UserError("only a network can be fine-tuned; the closed-form empirical model has no weights "
                        "(use it directly as a model, e.g. empirical:kernel=0.2)")
    native_config(model)  # fails now, not after training, if the architecture cannot be saved
    return model.requires_grad_(True)


def history_entry(config: SmoothingConfig, train_config: TrainConfig, **info) -> dict:
    """The checkpoint-history record of one fine-tuning or training run."""
    return {"action": config.action, **info, **config.record(), "steps": train_config.steps,
            "batch_size": train_config.batch_size, "lr": train_config.lr, "seed": train_config.seed}


def prepare(denoiser: NetworkDenoiser, config: SmoothingConfig, train_config: TrainConfig, info: dict) -> dict:
    """Uncondition the network if asked (in place) and return the history entry's extra fields."""
    extra = dict(info)
    if config.uncondition:
        extra["noise_input"] = constant_noise_input(denoiser, train_config.p_mean)
        uncondition(denoiser, extra["noise_input"])
    return extra


def finetune(model: Denoiser, train: Tensor, config: SmoothingConfig, train_config: TrainConfig, out: Path,
             info: Optional[dict] = None, resume: bool = False,
             progress: Optional[Callable[..., None]] = None) -> NetworkDenoiser:
    """Fine-tune `model` on `train` as configured; write the native checkpoint `out` (EMA weights), whose
    history is the model's own plus one entry for this run (`info`, e.g. model and data paths, included)."""
    config.validate()
    train_config.validate()
    denoiser = trainable(model)
    weights = model_fingerprint(denoiser)
    extra = prepare(denoiser, config, train_config, info or {})
    history = list(getattr(model, "history", []) or []) + [history_entry(config, train_config, **extra)]
    return fit(denoiser, train, train_config, out, history, target_fn=make_target(train, config), resume=resume,
               progress=progress, settings={"smoothing": config.record(), "weights": weights})
