"""Tensor helpers shared by the metric modules."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def device_of(module: Callable, fallback: torch.device) -> torch.device:
    """The device a denoiser lives on (its `.device`), else `fallback`."""
    device = getattr(module, "device", None)
    return torch.device(device) if device is not None else fallback


def run_denoiser(denoiser: Callable, x: Tensor, sigma: Tensor | float) -> Tensor:
    """D(x, sigma) evaluated on the denoiser's device without autograd, returned on x's device and dtype."""
    device = device_of(denoiser, x.device)
    if isinstance(sigma, Tensor):
        sigma = sigma.to(device)
    with torch.no_grad():
        return denoiser(x.to(device), sigma).to(x.device, x.dtype)


def summary(values: list[Tensor]) -> tuple[float, float]:
    """(mean, population std) of the concatenated values, as Python floats."""
    v = torch.cat([t.reshape(-1).double().cpu() for t in values])
    return float(v.mean()), float(v.std(unbiased=False))
