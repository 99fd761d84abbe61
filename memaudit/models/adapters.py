"""Adapters: wrap a raw network net(x_in, noise_in) with a parameterisation and a schedule into D(x, sigma).

Parameterisations (alpha = 1/sqrt(1+sigma^2), sigma_vp = sigma * alpha, x_vp = alpha * x):
  eps:   D = x - sigma * eps
  x0:    D = out
  v:     D = alpha * x_vp - sigma_vp * v           (v = alpha * eps - sigma_vp * x0)
  score: D = x + sigma^2 * out
  edm:   D = c_skip * x + c_out * F,  c_skip = sd^2/(sigma^2+sd^2), c_out = sigma*sd/sqrt(sigma^2+sd^2)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from memaudit.denoiser import Denoiser, expand_like
from memaudit.errors import UserError
from memaudit.models.schedules import Schedule

PARAMETERISATIONS = ("eps", "x0", "v", "score", "edm")


def output_to_denoised(param: str, out: Tensor, x: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """Convert a network output under parameterisation `param` to x0_hat = D(x, sigma)."""
    s = expand_like(sigma, x)
    if param == "eps":
        return x - s * out
    if param == "x0":
        return out
    if param == "v":
        alpha = 1.0 / torch.sqrt(1.0 + s**2)
        return alpha * (alpha * x) - (s * alpha) * out
    if param == "score":
        return x + s**2 * out
    if param == "edm":
        c_skip = sigma_data**2 / (s**2 + sigma_data**2)
        c_out = s * sigma_data / torch.sqrt(s**2 + sigma_data**2)
        return c_skip * x + c_out * out
    raise UserError(f"unknown parameterisation {param!r}; choose one of {', '.join(PARAMETERISATIONS)}")


def denoised_to_output(param: str, d: Tensor, x: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """Inverse of `output_to_denoised`: the network output that would give x0_hat = d."""
    s = expand_like(sigma, x)
    if param == "eps":
        return (x - d) / s
    if param == "x0":
        return d
    if param == "v":
        alpha = 1.0 / torch.sqrt(1.0 + s**2)
        return (alpha * alpha * x - d) / (s * alpha)
    if param == "score":
        return (d - x) / s**2
    if param == "edm":
        c_skip = sigma_data**2 / (s**2 + sigma_data**2)
        c_out = s * sigma_data / torch.sqrt(s**2 + sigma_data**2)
        return (d - c_skip * x) / c_out
    raise UserError(f"unknown parameterisation {param!r}; choose one of {', '.join(PARAMETERISATIONS)}")


def network_output(out) -> Tensor:
    """The tensor a network returned: itself, `.sample` (diffusers' UNet2DOutput), or the only entry of a 1-tuple,
    1-list or 1-dict; a UserError naming what came back otherwise."""
    if isinstance(out, Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    if isinstance(out, (tuple, list)) and len(out) == 1 and isinstance(out[0], Tensor):
        return out[0]
    if isinstance(out, dict) and len(out) == 1 and isinstance(next(iter(out.values())), Tensor):
        return next(iter(out.values()))
    if isinstance(out, dict):
        what = f"a dict with keys {sorted(map(str, out))[:5]}"
    elif isinstance(out, (tuple, list)):
        what = f"a {type(out).__name__} of {len(out)} items"
    else:
        what = f"a {type(out).__name__}"
    raise UserError(f"the network returned {what}, not a tensor; wrap it so forward(x, noise) returns the "
                    "prediction tensor")


class NetworkDenoiser(Denoiser):
    """D(x, sigma) from a network net(x_in, noise_in) under a schedule and a parameterisation.

    `fixed_noise_input`, when set, replaces the network's noise-level input by that constant
    (noise unconditioning); the schedule's input scaling and output mixing still use sigma.
    """

    def __init__(self, net: nn.Module, param: str, schedule: Schedule,
                 image_shape: Optional[tuple[int, int, int]] = None,
                 fixed_noise_input: Optional[float] = None):
        super().__init__()
        if param not in PARAMETERISATIONS:
            raise UserError(f"unknown parameterisation {param!r}; choose one of {', '.join(PARAMETERISATIONS)}")
        self.net = net
        self.param = param
        self.schedule = schedule
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.fixed_noise_input = fixed_noise_input

    @property
    def sigma_min(self) -> float:
        """The valid sigma range is the schedule's (one source of truth, also after set_sigma_range)."""
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def network_inputs(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(x_in, noise_in) that the wrapped network expects for EDM input x at noise level sigma."""
        x_in = expand_like(self.schedule.input_scale(sigma), x) * x
        if self.fixed_noise_input is not None:
            noise_in = torch.full_like(sigma, float(self.fixed_noise_input))
        else:
            noise_in = self.schedule.noise_input(sigma)
        return x_in, noise_in

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        x_in, noise_in = self.network_inputs(x, sigma)
        out = network_output(self.net(x_in, noise_in))
        if out.shape != x.shape:
            raise UserError(f"the model returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        return output_to_denoised(self.param, out.to(x.dtype), x, sigma, self.schedule.sigma_data)
