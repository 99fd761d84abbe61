"""denoising-diffusion-pytorch Trainer checkpoints (`model-N.pt`): the exact discrete VP schedule and objective.

The checkpoint's GaussianDiffusion state holds sigma_t = sqrt(1/abar_t - 1) (buffer sqrt_recipm1_alphas_cumprod)
and loss_weight, from which the objective follows (snr = abar / (1 - abar), g = min-SNR clip):
  pred_noise: loss_weight = min(snr, g) / snr,  pred_x0: min(snr, g),  pred_v: min(snr, g) / (snr + 1).
The network is unet(x_vp, t), x_vp = x / sqrt(1 + sigma^2) (the library's normalised [-1, 1] images), so
D = x - sigma eps (pred_noise), D = F (pred_x0), D = abar x - sigma sqrt(abar) v (pred_v), as in schedules.py.
The library's samplers (p_sample, ddim_sample) clip x0 to [-1, 1], so D is clipped too unless the config says
"clip_x_start": false. The Unet's constructor arguments come from a JSON object {"unet": {...}, "diffusion":
{...}, "weights": "ema", "clip_x_start": true} (--model-config, or model-config.json beside the checkpoint).
The file is read weights-only, never unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from memaudit.errors import UserError
from memaudit.models.adapters import NetworkDenoiser
from memaudit.models.json_args import parse_json_object, read_json_arg
from memaudit.models.safe_pickle import safe_torch_load, torch_pickle_bytes
from memaudit.models.schedules import Schedule
from memaudit.models.statedict import load_strict
from memaudit.models.x0_limits import X0Limit

CONFIG_NAME = "model-config.json"
OBJECTIVES = {"pred_noise": "eps", "pred_x0": "x0", "pred_v": "v"}
CONFIG_KEYS = ("unet", "diffusion", "weights", "clip_x_start")
WEIGHTS = ("ema", "model")
# GaussianDiffusion buffers that identify such a state dict (the Trainer saves it under 'model' and, in its EMA
# copy, under 'ema' with the prefix 'ema_model.').
MARKERS = (b"sqrt_recipm1_alphas_cumprod", b"alphas_cumprod")
EMA_PREFIX = "ema_model."


def is_ddpm_checkpoint(path: Path) -> bool:
    """True for a torch zip file whose pickle names the GaussianDiffusion buffers (nothing is unpickled)."""
    pickled = torch_pickle_bytes(path)
    return all(marker in pickled for marker in MARKERS) and b"model." in pickled


def import_library() -> Any:
    """The denoising_diffusion_pytorch package, or a UserError saying how to install it."""
    try:
        import denoising_diffusion_pytorch
    except ImportError as exc:
        raise UserError(f"loading a denoising-diffusion-pytorch checkpoint needs that library ({exc}): "
                        "pip install 'memaudit[ddpm]'") from None
    return denoising_diffusion_pytorch


def read_config(path: Path, model_config: Optional[str]) -> dict:
    """--model-config (inline JSON or a file), else model-config.json beside the checkpoint, checked."""
    if model_config is not None:
        config = read_json_arg(model_config, "--model-config")
    elif (path.parent / CONFIG_NAME).is_file():
        config = parse_json_object((path.parent / CONFIG_NAME).read_text(), str(path.parent / CONFIG_NAME))
    else:
        raise UserError(f"{path} is a denoising-diffusion-pytorch checkpoint; its Unet's constructor arguments are "
                        "not saved in it: pass --model-config "
                        "'{\"unet\": {\"dim\": 64, \"dim_mults\": [1, 2, 4, 8]}}' "
                        f"(or a JSON file), or put {CONFIG_NAME} beside it")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown or not isinstance(config.get("unet"), dict):
        raise UserError(f"--model-config for {path}: expected {{\"unet\": {{Unet arguments}}, \"diffusion\": "
                        f"{{\"image_size\": N, \"objective\": ...}}, \"weights\": \"ema\"|\"model\"}}"
                        + (f"; unknown keys {', '.join(unknown)}" if unknown else "; 'unet' is missing"))
    if not isinstance(config.get("clip_x_start", True), bool):
        raise UserError(f"--model-config: clip_x_start must be true or false, not {config['clip_x_start']!r}")
    if config.get("weights", "ema") not in WEIGHTS:
        raise UserError(f"--model-config: weights must be one of {', '.join(WEIGHTS)}, not {config['weights']!r}")
    return config


def diffusion_state(checkpoint: Any, path: Path, weights: str) -> dict[str, Tensor]:
    """The GaussianDiffusion state dict: the EMA copy (what the Trainer samples with) or the trained 'model'."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise UserError(f"{path}: not a denoising-diffusion-pytorch Trainer checkpoint (no 'model' state dict)")
    if weights == "ema":
        ema = checkpoint.get("ema")
        if isinstance(ema, dict) and any(k.startswith(EMA_PREFIX) for k in ema):
            return {k[len(EMA_PREFIX):]: v for k, v in ema.items() if k.startswith(EMA_PREFIX)}
    return checkpoint["model"]


def objective_from_loss_weight(state: dict[str, Tensor]) -> Optional[str]:
    """The objective whose loss_weight formula (module docstring) matches the buffer, or None."""
    weight, abar = state.get("loss_weight"), state.get("alphas_cumprod")
    if weight is None or abar is None:
        return None
    abar, weight = abar.double(), weight.double()
    snr = abar / (1 - abar)
    clipped = {"pred_noise": weight * snr, "pred_x0": weight, "pred_v": weight * (snr + 1)}
    for objective, min_snr in clipped.items():
        if torch.allclose(min_snr, torch.minimum(snr, min_snr.max()), rtol=1e-3, atol=0):
            return objective
    return None


def read_objective(state: dict[str, Tensor], config: dict, path: Path) -> str:
    """The objective recorded in the checkpoint (loss_weight), checked against the config's, if any."""
    given = (config.get("diffusion") or {}).get("objective")
    if given is not None and given not in OBJECTIVES:
        raise UserError(f"--model-config: objective must be one of {', '.join(OBJECTIVES)}, not {given!r}")
    found = objective_from_loss_weight(state)
    if given is not None and found is not None and given != found:
        raise UserError(f"{path} was trained with objective {found} (its loss_weight says so), not {given}; "
                        "fix 'objective' in --model-config")
    if given is None and found is None:
        raise UserError(f"{path}: cannot tell the objective from its loss_weight; add \"diffusion\": "
                        "{\"objective\": \"pred_noise|pred_x0|pred_v\"} to --model-config")
    return given or found


def schedule_from_state(state: dict[str, Tensor], path: Path) -> Schedule:
    """The discrete VP schedule: sigma_t = sqrt_recipm1_alphas_cumprod[t], abar_t = 1 / (1 + sigma_t^2)."""
    sigmas = state.get("sqrt_recipm1_alphas_cumprod")
    if sigmas is None or sigmas.ndim != 1 or len(sigmas) < 2:
        raise UserError(f"{path}: the GaussianDiffusion state lacks its schedule buffer sqrt_recipm1_alphas_cumprod")
    sigmas = sigmas.double()
    if not (torch.isfinite(sigmas).all() and (sigmas > 0).all() and (sigmas.diff() > 0).all()):
        raise UserError(f"{path}: its schedule (sqrt_recipm1_alphas_cumprod) is not positive and increasing")
    abar = 1.0 / (1.0 + sigmas**2)
    return Schedule("vp-linear", float(sigmas[0]), float(sigmas[-1]), alphas_cumprod=abar)


class DDPMUnetNet(nn.Module):
    """net(x_vp, t) = unet(x_vp, t) of a denoising-diffusion-pytorch Unet (t: fractional timestep)."""

    def __init__(self, unet: nn.Module, kwargs: dict):
        super().__init__()
        self.unet = unet
        self.architecture = {"name": "ddpm-pytorch", "kwargs": {"unet": kwargs}}

    def forward(self, x_in: Tensor, noise_in: Tensor) -> Tensor:
        return self.unet(x_in, noise_in)


def build_unet(kwargs: dict, path: Path) -> nn.Module:
    """denoising_diffusion_pytorch.Unet(**kwargs), refusing self-conditioned ones (D needs the previous x0)."""
    library = import_library()
    if kwargs.get("self_condition"):
        raise UserError(f"{path}: self-conditioned Unets feed their previous x0 estimate back in, so D(x, sigma) is "
                        "not a function of x and sigma alone; memaudit does not support them")
    try:
        return library.Unet(**kwargs)
    except Exception as exc:  # the user's arguments: TypeError, AssertionError, ...
        raise UserError(f"--model-config: Unet({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: "
                        f"{type(exc).__name__}: {exc}") from None


def network_from_native(kwargs: dict, folder: Path) -> DDPMUnetNet:
    """Native ARCHITECTURES builder for {"name": "ddpm-pytorch", "kwargs": {"unet": {...}}} (weights loaded after)."""
    if not isinstance(kwargs.get("unet"), dict):
        raise UserError(f"{folder}: ddpm-pytorch architecture lacks its Unet arguments 'unet'")
    return DDPMUnetNet(build_unet(kwargs["unet"], folder), kwargs["unet"])


def image_shape_of(config: dict, unet: nn.Module) -> Optional[tuple[int, int, int]]:
    """(channels, H, W) from the Unet's channels and the diffusion's image_size (int or [H, W]), if given."""
    size = (config.get("diffusion") or {}).get("image_size")
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(unet.channels), int(h), int(w)


def load_ddpm_pytorch(path: Path, *, model_config: Optional[str] = None, param: Optional[str] = None,
                      schedule: Optional[str] = None) -> NetworkDenoiser:
    """A Trainer checkpoint as D(x, sigma): schedule and objective from the checkpoint, Unet from the config."""
    if schedule is not None:
        raise UserError(f"{path} records its schedule (alphas_cumprod); drop --schedule {schedule}")
    config = read_config(path, model_config)
    state = diffusion_state(safe_torch_load(path), path, config.get("weights", "ema"))
    sched = schedule_from_state(state, path)
    recorded = OBJECTIVES[read_objective(state, config, path)]
    if param is not None and param != recorded:
        raise UserError(f"{path} was trained with --param {recorded}; drop --param {param}")
    unet = build_unet(config["unet"], path)
    net_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    load_strict(unet, net_state, f"{path} (its Unet weights, with --model-config)")
    limit = X0Limit("clip", 1.0) if config.get("clip_x_start", True) else None
    denoiser = NetworkDenoiser(DDPMUnetNet(unet, config["unet"]), recorded, sched,
                               image_shape=image_shape_of(config, unet), x0_limit=limit)
    return denoiser.eval()
