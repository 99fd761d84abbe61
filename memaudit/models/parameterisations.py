"""Parameterisations: what a network's output means, as one table of scalings D = c_skip(sigma) x + c_out(sigma) F.

EDM's preconditioning (Karras et al. 2022, Table 1) and k-diffusion's get_scalings are the model: a network
family differs from another only in (c_skip, c_out); its input scaling and noise input come from its schedule
(memaudit.models.schedules). With alpha = 1/sqrt(1 + sigma^2) (the VP signal scale), sd = sigma_data:

  eps    D = x - sigma eps                         (c_skip, c_out) = (1, -sigma)
  x0     D = F                                     (0, 1)
  v      D = alpha^2 x - sigma alpha v             (alpha^2, -sigma alpha)       v = alpha eps - sigma alpha x0
  score  D = x + sigma^2 s                         (1, sigma^2)
  edm    D = c_skip x + c_out F                    (sd^2/(sigma^2+sd^2), sigma sd/sqrt(sigma^2+sd^2))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from memaudit.errors import UserError

Scalings = Callable[[Tensor, float], tuple[Tensor, Tensor]]  # (sigma, sigma_data) -> (c_skip, c_out)


def _eps(s: Tensor, sd: float) -> tuple[Tensor, Tensor]:
    return torch.ones_like(s), -s


def _x0(s: Tensor, sd: float) -> tuple[Tensor, Tensor]:
    return torch.zeros_like(s), torch.ones_like(s)


def _v(s: Tensor, sd: float) -> tuple[Tensor, Tensor]:
    alpha = 1.0 / torch.sqrt(1.0 + s**2)
    return alpha * alpha, -s * alpha


def _score(s: Tensor, sd: float) -> tuple[Tensor, Tensor]:
    return torch.ones_like(s), s**2


def _edm(s: Tensor, sd: float) -> tuple[Tensor, Tensor]:
    return sd**2 / (s**2 + sd**2), s * sd / torch.sqrt(s**2 + sd**2)


@dataclass(frozen=True)
class Parameterisation:
    scalings: Scalings
    summary: str


PARAMETERISATIONS: dict[str, Parameterisation] = {
    "eps": Parameterisation(_eps, "noise prediction (DDPM)"),
    "x0": Parameterisation(_x0, "clean-image prediction"),
    "v": Parameterisation(_v, "v-prediction (Salimans & Ho 2022)"),
    "score": Parameterisation(_score, "score prediction (NCSN)"),
    "edm": Parameterisation(_edm, "EDM preconditioned F (Karras et al. 2022)"),
}


def check_parameterisation(name: str) -> Parameterisation:
    if name not in PARAMETERISATIONS:
        raise UserError(f"unknown parameterisation {name!r}; choose one of {', '.join(PARAMETERISATIONS)}")
    return PARAMETERISATIONS[name]


def scalings(name: str, sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of the parameterisation `name` at sigma (any shape)."""
    return check_parameterisation(name).scalings(sigma, sigma_data)


def to_denoised(name: str, out: Tensor, x: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """D = c_skip x + c_out out for sigma broadcastable against x."""
    c_skip, c_out = scalings(name, sigma, sigma_data)
    return c_skip * x + c_out * out
