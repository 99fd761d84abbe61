"""k-diffusion checkpoints (train.py's `NAME_00001000.pth`): its config and EMA weights, through its own wrappers.

D(x, sigma) = make_denoiser_wrapper(config)(make_model(config))(x, sigma): k-diffusion's Karras preconditioner,
c_skip = sd^2/(sigma^2 + sd^2), c_out = sigma sd/sqrt(sigma^2 + sd^2), c_in = 1/sqrt(sigma^2 + sd^2), the inner model
taking sigma itself (it computes ln(sigma)/4). The library is k-diffusion's convention already (EDM's), so memaudit
calls it as it is. The config comes from --model-config, else the checkpoint's own 'config'; weights from
'model_ema' ('model' with "weights": "model"). The file is read weights-only, never unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from memaudit.models.adapters import ScheduledDenoiser
from memaudit.errors import UserError
from memaudit.models.json_args import read_json_arg
from memaudit.models.safe_pickle import safe_torch_load, torch_pickle_bytes
from memaudit.models.schedules import Schedule
from memaudit.models.statedict import load_strict

MARKER = b"model_ema"
WEIGHTS = ("model_ema", "model")
CONDITIONING = ("mapping_cond_dim", "unet_cond_dim", "cross_cond_dim")


def is_kdiffusion_checkpoint(path: Path) -> bool:
    """True for a torch zip file whose pickle names 'model_ema' (nothing is unpickled)."""
    pickled = torch_pickle_bytes(path)
    return MARKER in pickled and b"sqrt_recipm1_alphas_cumprod" not in pickled


def import_library() -> Any:
    """The k_diffusion package, or a UserError saying how to install it."""
    try:
        import k_diffusion
    except ImportError as exc:
        raise UserError(f"loading a k-diffusion checkpoint needs k-diffusion ({exc}): "
                        "pip install 'memaudit[kdiffusion]'") from None
    return k_diffusion


def read_config(checkpoint: dict, path: Path, model_config: Optional[str]) -> dict:
    """The k-diffusion config (defaults merged by its load_config): --model-config, else the checkpoint's."""
    config = read_json_arg(model_config, "--model-config") if model_config is not None else checkpoint.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UserError(f"{path} is a k-diffusion checkpoint without its config: pass --model-config "
                        "configs/config_NAME.json (the JSON it was trained with)")
    try:
        return import_library().config.load_config(config)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"bad k-diffusion config for {path}: {type(exc).__name__}: {exc}") from None


def check_unconditional(config: dict, path: Path) -> None:
    """UserError for class- or otherwise conditioned models (D would need labels or other inputs)."""
    model = config["model"]
    used = [key for key in CONDITIONING if model.get(key)]
    if (config.get("dataset") or {}).get("num_classes"):
        used.append("dataset.num_classes")
    if used:
        raise UserError(f"{path}: conditioned k-diffusion models ({', '.join(used)}) are not supported yet; "
                        "memaudit loads unconditional ones")


class KDiffusionDenoiser(ScheduledDenoiser):
    """D(x, sigma) = k-diffusion's own denoiser wrapper around its inner model."""

    def __init__(self, wrapper: nn.Module, schedule: Schedule, image_shape: Optional[tuple[int, int, int]]):
        super().__init__()
        self.wrapper = wrapper
        self.param = "edm"
        self.schedule = schedule
        self.image_shape = image_shape

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.wrapper(x, sigma)


def load_kdiffusion(path: Path, *, model_config: Optional[str] = None, param: Optional[str] = None,
                    schedule: Optional[str] = None, weights: str = "model_ema") -> KDiffusionDenoiser:
    """A k-diffusion checkpoint as D(x, sigma), through its make_model and make_denoiser_wrapper."""
    for option, value in (("--param", param), ("--schedule", schedule)):
        if value is not None:
            raise UserError(f"{path} is a k-diffusion model (Karras preconditioning, from its config); drop "
                            f"{option} {value}")
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(weights), dict):
        raise UserError(f"{path}: not a k-diffusion training checkpoint (no {weights!r} state dict)")
    config = read_config(checkpoint, path, model_config)
    check_unconditional(config, path)
    library = import_library()
    try:
        inner = library.config.make_model(config)
        wrapper = library.config.make_denoiser_wrapper(config)(inner)
    except Exception as exc:
        raise UserError(f"k-diffusion cannot build the model of {path}'s config: {type(exc).__name__}: {exc}"
                        ) from None
    load_strict(inner, checkpoint[weights], f"{path} ({weights})")
    model = config["model"]
    sched = Schedule("edm", float(model.get("sigma_min", 1e-2)), float(model.get("sigma_max", 80.0)),
                     sigma_data=float(model.get("sigma_data", 1.0)))
    size = model.get("input_size")
    shape = (int(model["input_channels"]), *map(int, size)) if isinstance(size, (list, tuple)) else None
    return KDiffusionDenoiser(wrapper, sched, shape).eval()
