"""What a loaded model is taken to be: format, parameterisation, schedule, sigma range, limits, conditioning, shape.

The settings every D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) depends on, as plain JSON values, so a user
sees what a scan will assume before it runs (`memaudit inspect`).
"""

from __future__ import annotations

from typing import Any

import torch

from memaudit.conditioning import describe_conditioning, num_classes
from memaudit.models import latent
from memaudit.models.parameterisations import PARAMETERISATIONS
from memaudit.models.schedules import SCHEDULES, make_schedule


def describe_model(denoiser: Any) -> dict:
    """A JSON-ready dict of the settings a scan of `denoiser` assumes."""
    source = getattr(denoiser, "source", None) or {}
    param = getattr(denoiser, "param", None)
    limit = getattr(denoiser, "x0_limit", None)
    shape = denoiser.image_shape
    net = getattr(denoiser, "net", None) or getattr(denoiser, "wrapper", None) or denoiser
    return {
        "format": source.get("format", type(denoiser).__name__),
        "path": source.get("path"),
        "parameterisation": param,
        "parameterisation_summary": PARAMETERISATIONS[param].summary if param in PARAMETERISATIONS else None,
        "schedule": describe_schedule(getattr(denoiser, "schedule", None)),
        "sigma_min": float(denoiser.sigma_min),
        "sigma_max": float(denoiser.sigma_max),
        "x0_limit": limit.describe() if limit is not None else None,
        "conditioning": describe_conditioning(denoiser),
        "num_classes": num_classes(denoiser),
        "noise_input": ("fixed at %g (noise-unconditioned)" % denoiser.fixed_noise_input
                        if getattr(denoiser, "fixed_noise_input", None) is not None else "the noise level"),
        "image_shape": list(shape) if shape is not None else None,
        "parameters": sum(p.numel() for p in net.parameters()),
        "latent": latent.describe(denoiser) if latent.is_latent(denoiser) else None,
    }


def describe_schedule(schedule: Any) -> dict | None:
    """kind, its summary, sigma_data, and for discrete VP schedules the number of timesteps and interpolation."""
    if schedule is None:
        return None
    info = {"kind": schedule.kind, "summary": SCHEDULES[schedule.kind].summary if schedule.kind in SCHEDULES
            else None, "sigma_data": float(schedule.sigma_data)}
    abar = getattr(schedule, "alphas_cumprod", None)
    if abar is not None:
        default = make_schedule(schedule.kind).alphas_cumprod if schedule.kind in SCHEDULES else None
        if default is None or default.shape != abar.shape or not torch.allclose(abar.double().cpu(), default,
                                                                                 rtol=1e-4, atol=0):
            info["summary"] = "discrete VP with the checkpoint's own alphas_cumprod"
        info.update(timesteps=int(len(schedule.alphas_cumprod)), interpolation=schedule.interpolation,
                    round_timesteps=bool(schedule.round_timesteps))
    return info
