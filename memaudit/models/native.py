"""memaudit's native checkpoint: a folder with model.safetensors (weights) and config.json.

config.json: {"format": "memaudit-native", "version": 1, "architecture": {"name": ..., "kwargs": {...}},
"parameterisation", "schedule", "sigma_min", "sigma_max", "sigma_data", "image_shape", "fixed_noise_input",
"history": [...]}, plus "alphas_cumprod" for a VP schedule with custom betas (e.g. from diffusers).
No pickle anywhere: loading a native checkpoint never runs code from the file (a "torchscript" architecture
is TorchScript read by torch.jit.load; a "factory" one runs only when the user names the same --factory).
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from memaudit.atomic import atomic_dir, check_writable
from memaudit.errors import UserError, first_lines
from memaudit.models import diffusers_loader, statedict, torchscript
from memaudit.models.adapters import NetworkDenoiser
from memaudit.models.schedules import Schedule, make_schedule
from memaudit.models.unet import UNet

FORMAT = "memaudit-native"
VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# Builders from architecture kwargs (and the checkpoint folder) to an nn.Module taking (x_in, noise_in).
ARCHITECTURES: dict[str, Callable[[dict, Path], nn.Module]] = {
    "unet": lambda kwargs, folder: UNet(**kwargs),
    "factory": statedict.network_from_native,
    "torchscript": torchscript.network_from_native,
    "diffusers": diffusers_loader.network_from_native,
}


def is_native(path: str | Path) -> bool:
    """True if `path` is a folder holding a memaudit config.json."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (ValueError, OSError):
        return False


def make_unet_denoiser(image_shape: tuple[int, int, int], base_channels: int = 32,
                       channel_mult: tuple[int, ...] = (1, 2), num_res_blocks: int = 1,
                       sigma_data: float = 0.5) -> NetworkDenoiser:
    """A fresh EDM-preconditioned UNet denoiser for images of shape (C, H, W)."""
    c, h, w = image_shape
    factor = 2 ** (len(channel_mult) - 1)
    if h % factor or w % factor:
        raise UserError(f"image size {h}x{w} must be divisible by {factor} for {len(channel_mult)} UNet levels")
    net = UNet(in_channels=c, base_channels=base_channels, channel_mult=tuple(channel_mult),
               num_res_blocks=num_res_blocks)
    net.architecture = {"name": "unet", "kwargs": net.config}
    return NetworkDenoiser(net, "edm", make_schedule("edm", sigma_data=sigma_data), image_shape=image_shape)


def native_config(denoiser: NetworkDenoiser, history: list[dict] | None = None) -> dict[str, Any]:
    """The config.json content describing `denoiser` (its network must carry an `architecture` dict)."""
    arch = getattr(denoiser.net, "architecture", None)
    if arch is None:
        raise UserError("this model's architecture cannot be described in a native checkpoint")
    sched = denoiser.schedule
    return {
        "format": FORMAT,
        "version": VERSION,
        "architecture": arch,
        "parameterisation": denoiser.param,
        "schedule": sched.kind,
        "sigma_min": denoiser.sigma_min,
        "sigma_max": denoiser.sigma_max,
        "sigma_data": sched.sigma_data,
        "round_timesteps": sched.round_timesteps,
        **custom_alphas_cumprod(sched),
        "image_shape": list(denoiser.image_shape) if denoiser.image_shape else None,
        "fixed_noise_input": denoiser.fixed_noise_input,
        "history": list(history or []),
    }


def custom_alphas_cumprod(sched: Schedule) -> dict[str, Any]:
    """{"alphas_cumprod": [...]} for a VP schedule whose abar_t differs from its kind's default, else {}."""
    abar = sched.alphas_cumprod
    if abar is None:
        return {}
    default = make_schedule(sched.kind).alphas_cumprod
    if default is not None and default.shape == abar.shape and torch.equal(default, abar.double().cpu()):
        return {}
    return {"alphas_cumprod": abar.double().cpu().tolist()}


def check_output_folder(folder: str | Path) -> None:
    """UserError unless `folder` can become a checkpoint: new, empty, or a memaudit checkpoint already.

    A checkpoint folder is replaced as a whole, so any other folder (a project, a home folder) is refused
    rather than deleted; so is a file. Call it before a long training run, not only when saving.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"cannot write the checkpoint folder {folder}: it is a file")
    if folder.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise UserError(f"cannot use {folder} as the checkpoint folder: it is the current folder or holds it; "
                        "give a new folder, e.g. --out model/")
    if folder.is_dir() and not is_native(folder):
        entries = sorted(p.name for p in folder.iterdir())
        if entries:
            raise UserError(f"refusing to replace {folder}: it is not a memaudit checkpoint (it holds e.g. "
                            f"{entries[0]}); give a new or empty folder for the checkpoint")
    check_writable(folder, folder=True)


def save_native(denoiser: NetworkDenoiser, folder: str | Path, history: list[dict] | None = None,
                extra_files: dict[str, bytes] | None = None) -> Path:
    """Write weights + config atomically into `folder` (replacing it as a whole only on success).

    Refuses (UserError) to replace a file or a non-empty folder that is not a memaudit checkpoint.
    """
    check_output_folder(folder)
    config = native_config(denoiser, history)
    state = {k: v.detach().to("cpu").contiguous() for k, v in denoiser.net.state_dict().items()}
    files = dict(getattr(denoiser.net, "native_files", {}) or {})
    files.update(extra_files or {})
    with atomic_dir(folder) as tmp:
        try:
            save_file(state, str(tmp / WEIGHTS_NAME))
        except SafetensorError as exc:  # I/O errors, disk full included, come as SafetensorError
            raise _as_os_error(exc) from None
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return Path(folder)


def _as_os_error(exc: Exception) -> OSError:
    """An OSError for a SafetensorError ("... (os error 28)" -> errno 28), so the atomic write reports it."""
    match = re.search(r"os error (\d+)", str(exc))
    if match:
        code = int(match[1])
        return OSError(code, os.strerror(code))
    return OSError(errno.EIO, str(exc).splitlines()[0] if str(exc) else "write failed")


def read_config(folder: str | Path) -> dict[str, Any]:
    """Parse and validate config.json of a native checkpoint."""
    path = Path(folder) / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} is not a memaudit checkpoint: no {CONFIG_NAME}") from None
    except (ValueError, OSError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{path} is not a memaudit checkpoint config (format != {FORMAT!r})")
    if int(config.get("version", 0)) > VERSION:
        raise UserError(f"{path} has config version {config['version']}; this memaudit reads up to {VERSION}")
    for key in ("architecture", "parameterisation", "schedule"):
        if key not in config:
            raise UserError(f"{path} lacks the required key {key!r}")
    return config


def load_native(folder: str | Path, device: str | torch.device = "cpu") -> NetworkDenoiser:
    """Load a native checkpoint folder into a NetworkDenoiser on `device` (eval mode)."""
    folder = Path(folder)
    config = read_config(folder)
    arch = config["architecture"]
    builder = ARCHITECTURES.get(arch.get("name"))
    if builder is None:
        raise UserError(f"{folder}: unknown architecture {arch.get('name')!r}")
    try:
        net = builder(dict(arch.get("kwargs", {})), folder)
    except TypeError as exc:
        raise UserError(f"{folder}: bad architecture settings: {exc}") from None
    net.architecture = arch
    weights = folder / WEIGHTS_NAME
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        raise UserError(f"{folder}: missing {WEIGHTS_NAME}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{weights}: not a readable safetensors file ({exc})") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{weights} does not match its architecture: {first_lines(exc, 2)}") from None
    schedule = make_schedule(config["schedule"], config.get("sigma_min"), config.get("sigma_max"),
                             sigma_data=float(config.get("sigma_data", 0.5)))
    schedule.round_timesteps = bool(config.get("round_timesteps", False))
    if config.get("alphas_cumprod") is not None:
        schedule.alphas_cumprod = torch.tensor(config["alphas_cumprod"], dtype=torch.float64)
    shape = config.get("image_shape")
    denoiser = NetworkDenoiser(net, config["parameterisation"], schedule,
                               image_shape=tuple(shape) if shape else None,
                               fixed_noise_input=config.get("fixed_noise_input"))
    denoiser.history = list(config.get("history", []))
    return denoiser.to(device).eval()
