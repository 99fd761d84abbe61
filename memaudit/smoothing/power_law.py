"""Temperature smoothing as the seed paper defines it (Zhou, Zhang & Wright, arXiv 2601.19285, Eqs. 5, 10, 11).

The noise-unconditioned mixture p_MN = (1/Z) sum_j sum_i sigma_i^2 N(x; mu_j, sigma_i^2 I) weighs each training
image mu_j at its own optimal shell sigma_j*^2 = ||x - mu_j||^2 / (d - 2), where f(x, mu, sigma) =
-(d - 2) ln sigma - ||x - mu||^2 / (2 sigma^2) is largest. Tempered, the weights are a power law in distance:

    log w_j = f(x, mu_j, sigma_j*) / T = -((d - 2) / (2 T)) log ||x - mu_j||^2 + const,   softmax over j,

over the K nearest training images mu_(1..K) to the *clean* source mu of the pair (x = mu + sigma n), mu first.
No Gaussian softmax(-||x - mu_j||^2 / (2 sigma'^2)) gives these weights for all x (DESIGN.md "Smoothing"): a
Gaussian temperature only relabels sigma. The target (Eq. 11) is mu itself above sigma_c and, at or below it,

    D_T(x) = sum_j w_j mu_j                          (denominator "sigma": the released code's score
                                                      sum_j w_j (mu_j - x) / sigma^2, as a denoiser), or
    D_T(x, sigma) = x + sigma^2 sum_j w_j (mu_j - x) / sigma_j*^2   (denominator "shell": the paper's text).

The schedule is a constant T, or T = max(c / sigma, 1) with sigma_c = c (the paper's "T = c/sigma").
Units: the paper's images are in [0, 1] and memaudit's in [-1, 1], so a noise level sigma there is 2 sigma
here; the paper's "T = 7/sigma" (sigma_c = 7) is "--temperature 14/sigma" in memaudit. The weights themselves
do not change with the units (only log-distance differences enter).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from memaudit.errors import SettingError, UserError

DENOMINATORS = ("sigma", "shell")


@dataclass(frozen=True)
class TemperatureSchedule:
    """T(sigma): a constant, or max(c / sigma, 1) (`per_sigma`); smoothing applies for sigma <= sigma_c."""

    value: float  # T, or c for a per-sigma schedule
    per_sigma: bool = False
    sigma_c: Optional[float] = None  # None: infinity for a constant T, c for T = c/sigma

    @property
    def collapse(self) -> float:
        """sigma_c: the noise level at and below which the target is smoothed."""
        if self.sigma_c is not None:
            return self.sigma_c
        return self.value if self.per_sigma else math.inf

    def temperature(self, sigma: Tensor) -> Tensor:
        """T per sample (sigma shape)."""
        if self.per_sigma:
            return torch.clamp(self.value / sigma, min=1.0)
        return torch.full_like(sigma, self.value)

    def describe(self) -> str:
        text = f"{self.value:g}/sigma" if self.per_sigma else f"{self.value:g}"
        return text if self.sigma_c is None else f"{text} below sigma_c={self.sigma_c:g}"


def parse_temperature(text: str, sigma_c: Optional[float] = None) -> TemperatureSchedule:
    """'2' -> constant T = 2; '7/sigma' -> T = max(7 / sigma, 1) with sigma_c = 7 (unless sigma_c is given)."""
    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(/\s*sigma)?\s*", str(text))
    try:
        value = float(match[1]) if match else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise SettingError("temperature", repr(text), "a positive number T or c/sigma (e.g. 2 or 7/sigma)")
    per_sigma = bool(match[2])
    if not per_sigma and value < 1:
        raise SettingError("temperature", text, ">= 1 (T = 1 is the unsmoothed mixture; below 1 sharpens it)")
    if sigma_c is not None and not (math.isfinite(sigma_c) and sigma_c > 0):
        raise SettingError("sigma_collapse", sigma_c, "> 0 and finite")
    return TemperatureSchedule(value, per_sigma, sigma_c)


def log_weights(x: Tensor, neighbours: Tensor, temperature: Tensor) -> Tensor:
    """log w_j (unnormalised) = -((d - 2) / (2 T)) log ||x - mu_j||^2 for x (B, d), neighbours (B, K, d), T (B,)."""
    d = x.shape[1]
    dist2 = ((x[:, None, :] - neighbours) ** 2).sum(-1).clamp_min(torch.finfo(x.dtype).tiny)
    return -((d - 2) / (2 * temperature[:, None])) * dist2.log()


def power_law_weights(x: Tensor, neighbours: Tensor, temperature: Tensor) -> Tensor:
    """softmax_j of log_weights: each neighbour weighed by ||x - mu_j||^(-(d-2)/T)."""
    return torch.softmax(log_weights(x, neighbours, temperature), dim=1)


def smoothed_target(x: Tensor, neighbours: Tensor, sigma: Tensor, temperature: Tensor,
                    denominator: str = "sigma") -> Tensor:
    """Eq. 10 as a denoiser target (B, d): sum_j w_j mu_j ("sigma"), or x + sigma^2 sum_j w_j (mu_j - x) /
    sigma_j*^2 ("shell", sigma_j*^2 = ||x - mu_j||^2 / (d - 2))."""
    if denominator not in DENOMINATORS:
        raise UserError(f"unknown score denominator {denominator!r}; choose one of {', '.join(DENOMINATORS)}")
    w = power_law_weights(x, neighbours, temperature)
    if denominator == "sigma":
        return torch.einsum("bk,bkd->bd", w, neighbours)
    d = x.shape[1]
    diff = neighbours - x[:, None, :]
    shell = (diff**2).sum(-1).clamp_min(torch.finfo(x.dtype).tiny) / (d - 2)
    return x + sigma[:, None] ** 2 * torch.einsum("bk,bkd->bd", w / shell, diff)


def weight_entropy(x: Tensor, neighbours: Tensor, temperature: Tensor) -> Tensor:
    """H(w) in nats per sample: 0 when the source dominates, log K when the K neighbours weigh equally."""
    w = power_law_weights(x, neighbours, temperature).double()
    return torch.special.entr(w).sum(1)
