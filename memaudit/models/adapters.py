"""Adapters: wrap a raw network net(x_in, noise_in) with a parameterisation and a schedule into D(x, sigma).

D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)), with (c_skip, c_out) from the
parameterisation table (memaudit.models.parameterisations) and (c_in, c_noise) from the schedule table
(memaudit.models.schedules), as EDM's EDMPrecond and k-diffusion's external.py denoisers compose them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from memaudit.conditioning import check_labels
from memaudit.denoiser import Denoiser, expand_like
from memaudit.errors import UserError
from memaudit.models.parameterisations import PARAMETERISATIONS, check_parameterisation, to_denoised
from memaudit.models.schedules import Schedule
from memaudit.models.x0_limits import X0Limit

__all__ = ["PARAMETERISATIONS", "NetworkDenoiser", "network_output"]


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


class ScheduledDenoiser(Denoiser):
    """A denoiser whose valid sigma range is its schedule's (one source of truth, also after set_sigma_range)."""

    schedule: Schedule

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max


class NetworkDenoiser(ScheduledDenoiser):
    """D(x, sigma) from a network net(x_in, noise_in) under a schedule and a parameterisation.

    `fixed_noise_input`, when set, replaces the network's noise-level input by that constant
    (noise unconditioning); the schedule's input scaling and output mixing still use sigma. `x0_limit`, when set,
    clips or thresholds D as the checkpoint's own sampler does (memaudit.models.x0_limits). `num_classes`, when
    set, makes it class-conditional: the network is called net(x_in, noise_in, class_labels) (memaudit.conditioning).
    """

    def __init__(self, net: nn.Module, param: str, schedule: Schedule,
                 image_shape: Optional[tuple[int, int, int]] = None,
                 fixed_noise_input: Optional[float] = None, x0_limit: Optional[X0Limit] = None,
                 num_classes: Optional[int] = None):
        super().__init__()
        check_parameterisation(param)
        self.net = net
        self.param = param
        self.schedule = schedule
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.fixed_noise_input = fixed_noise_input
        self.x0_limit = x0_limit
        self.num_classes = num_classes

    def network_inputs(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(x_in, noise_in) that the wrapped network expects for EDM input x at noise level sigma."""
        x_in = expand_like(self.schedule.c_in(sigma), x) * x
        if self.fixed_noise_input is not None:
            noise_in = torch.full_like(sigma, float(self.fixed_noise_input))
        else:
            noise_in = self.schedule.c_noise(sigma)
        return x_in, noise_in

    def denoise(self, x: Tensor, sigma: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        x_in, noise_in = self.network_inputs(x, sigma)
        labels = check_labels(class_labels, self.num_classes, x.shape[0])
        args = (x_in, noise_in) if labels is None else (x_in, noise_in, labels.to(x.device))
        out = network_output(self.net(*args))
        if out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
            out = out[:, : x.shape[1]]  # a learned-variance output (guided-diffusion, diffusers): the mean part
        if out.shape != x.shape:
            raise UserError(f"the model returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        denoised = to_denoised(self.param, out.to(x.dtype), x, expand_like(sigma, x), self.schedule.sigma_data)
        return self.x0_limit(denoised) if self.x0_limit is not None else denoised
