"""k-diffusion checkpoints (train.py's `NAME_00001000.pth`): its config and EMA weights, through its own wrappers.

D(x, sigma) = make_denoiser_wrapper(config)(make_model(config))(x, sigma): k-diffusion's Karras preconditioner,
c_skip = sd^2/(sigma^2 + sd^2), c_out = sigma sd/sqrt(sigma^2 + sd^2), c_in = 1/sqrt(sigma^2 + sd^2), the inner model
taking sigma itself (it computes ln(sigma)/4). The library is k-diffusion's convention already (EDM's), so memaudit
calls it as it is. The config comes from --model-config, else the checkpoint's own 'config'; weights from
'model_ema' ('model' with "weights": "model"). The file is read weights-only, never unpickled.
Class-conditional models: image_transformer_v1 with dataset.num_classes = N gives D(x, sigma, c) =
wrapper(x, sigma, class_cond=c) (train.py's class_cond; its extra class N, the unconditional token, is not audited);
image_v1 with mapping_cond_dim = N takes a vector, read as the one-hot label only when --num-classes N says so:
D(x, sigma, c) = wrapper(x, sigma, mapping_cond=one_hot(c, N)).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from memaudit.conditioning import check_labels
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


def conditioning(config: dict, path: Path, num_classes: Optional[int]) -> tuple[Optional[str], Optional[int]]:
    """(keyword the labels go in: 'class_cond', 'mapping_cond' or None, number of classes); UserError for other
    conditioning (D would need inputs other than a label) and for a --num-classes the config contradicts."""
    model, classes = config["model"], int((config.get("dataset") or {}).get("num_classes") or 0)
    if model["type"] == "image_transformer_v1" and classes:
        if num_classes is not None and num_classes != classes:
            raise UserError(f"{path} is class-conditional with dataset.num_classes {classes}: drop --num-classes "
                            f"{num_classes}")
        return "class_cond", classes
    mapping = int(model.get("mapping_cond_dim") or 0)
    used = [key for key in CONDITIONING if model.get(key) and key != "mapping_cond_dim"]
    if classes and classes != mapping:
        used.append("dataset.num_classes")
    if used:
        raise UserError(f"{path}: conditioned k-diffusion models ({', '.join(used)}) are not supported yet; "
                        "memaudit loads unconditional ones, class_cond transformers and one-hot mapping_cond")
    if mapping and num_classes != mapping:
        given = f"--num-classes {num_classes} does not match it" if num_classes is not None else "it may be anything"
        raise UserError(f"{path} takes a mapping_cond vector of {mapping} values ({given}): if it is a one-hot class "
                        f"label, pass --num-classes {mapping}")
    if not mapping and num_classes is not None:
        raise UserError(f"{path} is an unconditional k-diffusion model: drop --num-classes {num_classes}")
    return ("mapping_cond", mapping) if mapping else (None, None)


class KDiffusionDenoiser(ScheduledDenoiser):
    """D(x, sigma) = k-diffusion's own denoiser wrapper around its inner model."""

    def __init__(self, wrapper: nn.Module, schedule: Schedule, image_shape: Optional[tuple[int, int, int]],
                 cond_key: Optional[str] = None, num_classes: Optional[int] = None):
        super().__init__()
        self.wrapper = wrapper
        self.param = "edm"
        self.schedule = schedule
        self.image_shape = image_shape
        self.cond_key, self.num_classes = cond_key, num_classes

    def denoise(self, x: Tensor, sigma: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        labels = check_labels(class_labels, self.num_classes, x.shape[0])
        if labels is None:
            return self.wrapper(x, sigma)
        labels = labels.to(x.device)
        cond = labels if self.cond_key == "class_cond" else F.one_hot(labels, self.num_classes).to(x.dtype)
        return self.wrapper(x, sigma, **{self.cond_key: cond})


def load_kdiffusion(path: Path, *, model_config: Optional[str] = None, param: Optional[str] = None,
                    schedule: Optional[str] = None, weights: str = "model_ema",
                    num_classes: Optional[int] = None) -> KDiffusionDenoiser:
    """A k-diffusion checkpoint as D(x, sigma), through its make_model and make_denoiser_wrapper."""
    for option, value in (("--param", param), ("--schedule", schedule)):
        if value is not None:
            raise UserError(f"{path} is a k-diffusion model (Karras preconditioning, from its config); drop "
                            f"{option} {value}")
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(weights), dict):
        raise UserError(f"{path}: not a k-diffusion training checkpoint (no {weights!r} state dict)")
    config = read_config(checkpoint, path, model_config)
    cond_key, classes = conditioning(config, path, num_classes)
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
    return KDiffusionDenoiser(wrapper, sched, shape, cond_key, classes).eval()
