"""memaudit's native checkpoint: a folder with model.safetensors (weights) and config.json.

config.json: {"format": "memaudit-native", "version": 1, "architecture": {"name": ..., "kwargs": {...}},
"parameterisation", "schedule", "sigma_min", "sigma_max", "sigma_data", "image_shape", "fixed_noise_input",
"num_classes" (class-conditional: the network takes class labels, memaudit.conditioning), "history": [...]},
plus "alphas_cumprod" for a VP schedule with custom betas (e.g. from diffusers).
No pickle anywhere: loading a native checkpoint never runs code from the file (a "torchscript" architecture
is TorchScript read by torch.jit.load; a "factory" one runs only when the user names the same --factory).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from memaudit.atomic import atomic_dir, check_writable
from memaudit.errors import UserError, first_lines
from memaudit.models import ddpm_pytorch, diffusers_loader, statedict, torchscript
from memaudit.models.adapters import PARAMETERISATIONS, NetworkDenoiser
from memaudit.models.schedules import SCHEDULES, Schedule, make_schedule
from memaudit.models.unet import UNet
from memaudit.models.x0_limits import x0_limit_from_record

INTERPOLATIONS = ("log", "linear")

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
    "ddpm-pytorch": ddpm_pytorch.network_from_native,
}


def is_native(path: str | Path) -> bool:
    """True if `path` is a folder holding a memaudit config.json."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        config = json.loads(cfg.read_text())
    except (ValueError, OSError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


def make_unet_denoiser(image_shape: tuple[int, int, int], base_channels: int = 32,
                       channel_mult: tuple[int, ...] = (1, 2), num_res_blocks: int = 1,
                       sigma_data: float = 0.5, seed: int | None = None,
                       num_classes: int | None = None) -> NetworkDenoiser:
    """A fresh EDM-preconditioned UNet denoiser for images of shape (C, H, W); with `seed`, its initial weights
    come from that seed (the global RNG is left as it was), so `train --seed` is reproducible; with
    `num_classes`, class-conditional."""
    c, h, w = image_shape
    factor = 2 ** (len(channel_mult) - 1)
    if h % factor or w % factor:
        raise UserError(f"image size {h}x{w} must be divisible by {factor} for {len(channel_mult)} UNet levels")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        net = UNet(in_channels=c, base_channels=base_channels, channel_mult=tuple(channel_mult),
                   num_res_blocks=num_res_blocks, num_classes=num_classes)
    net.architecture = {"name": "unet", "kwargs": net.config}
    return NetworkDenoiser(net, "edm", make_schedule("edm", sigma_data=sigma_data), image_shape=image_shape,
                           num_classes=num_classes)


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
        **({"num_classes": denoiser.num_classes} if getattr(denoiser, "num_classes", None) else {}),
        **({"x0_limit": denoiser.x0_limit.record()} if getattr(denoiser, "x0_limit", None) else {}),
        **({"sigma_interpolation": sched.interpolation} if sched.interpolation != "log" else {}),
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
    """Parse and validate config.json of a native checkpoint (every field by type and range)."""
    path = Path(folder) / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} is not a memaudit checkpoint: no {CONFIG_NAME}") from None
    except (ValueError, OSError) as exc:
        raise UserError(f"{path} is not valid JSON: {first_lines(exc)}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{path} is not a memaudit checkpoint config (format != {FORMAT!r})")
    validate_config(config, path)
    return config


def _bad(path: Path, key: str, what: str, value: Any) -> UserError:
    shown = json.dumps(value)[:60]
    return UserError(f"{path}: {key} must be {what}, not {shown}")


def _number(config: dict, key: str, path: Path, positive: bool = True, default: Any = None) -> None:
    value = config.get(key, default)
    if value is None and default is None and key not in config:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise _bad(path, key, "a finite positive number" if positive else "a finite number", value)


def validate_config(config: dict, path: Path) -> None:
    """UserError naming the first field of a native config.json with the wrong type or an absurd value."""
    version = config.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise _bad(path, "version", "a non-negative integer", version)
    if version > VERSION:
        raise UserError(f"{path} has config version {version}; this memaudit reads up to {VERSION}")
    for key in ("architecture", "parameterisation", "schedule"):
        if key not in config:
            raise UserError(f"{path} lacks the required key {key!r}")
    arch = config["architecture"]
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str) \
            or not isinstance(arch.get("kwargs", {}), dict):
        raise _bad(path, "architecture", 'an object {"name": ..., "kwargs": {...}}', arch)
    if arch["name"] not in ARCHITECTURES:
        raise UserError(f"{path}: unknown architecture {arch['name']!r}; known: {', '.join(ARCHITECTURES)}")
    if config["parameterisation"] not in PARAMETERISATIONS:
        raise _bad(path, "parameterisation", f"one of {', '.join(PARAMETERISATIONS)}", config["parameterisation"])
    if config["schedule"] not in SCHEDULES:
        raise _bad(path, "schedule", f"one of {', '.join(SCHEDULES)}", config["schedule"])
    for key in ("sigma_min", "sigma_max", "sigma_data"):
        _number(config, key, path)
    if config.get("sigma_min") is not None and config.get("sigma_max") is not None \
            and not config["sigma_min"] < config["sigma_max"]:
        raise UserError(f"{path}: sigma_min {config['sigma_min']} must be below sigma_max {config['sigma_max']}")
    if config.get("fixed_noise_input") is not None:
        _number(config, "fixed_noise_input", path, positive=False)
    _check_num_classes(config, path)
    if not isinstance(config.get("round_timesteps", False), bool):
        raise _bad(path, "round_timesteps", "true or false", config["round_timesteps"])
    if not isinstance(config.get("history", []), list):
        raise _bad(path, "history", "a list", config["history"])
    _check_image_shape(config.get("image_shape"), path)
    _check_alphas_cumprod(config.get("alphas_cumprod"), path)
    x0_limit_from_record(config.get("x0_limit"), str(path))
    if config.get("sigma_interpolation", "log") not in INTERPOLATIONS:
        raise _bad(path, "sigma_interpolation", f"one of {', '.join(INTERPOLATIONS)}", config["sigma_interpolation"])
    if arch["name"] == "unet":
        check_unet_kwargs(arch.get("kwargs", {}), path)


def _check_num_classes(config: dict, path: Path) -> None:
    """num_classes: absent/null (unconditional) or an integer from 1 to MAX_CLASSES, the same as the UNet's."""
    n = config.get("num_classes")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CLASSES):
        raise _bad(path, "num_classes", f"null or an integer from 1 to {MAX_CLASSES}", n)
    arch = config["architecture"]
    built = arch.get("kwargs", {}).get("num_classes") if arch["name"] == "unet" else n
    if built != n:
        raise UserError(f"{path}: num_classes {json.dumps(n)} disagrees with the UNet's num_classes "
                        f"{json.dumps(built)}")


def _check_image_shape(shape: Any, path: Path) -> None:
    if shape is None:
        return
    if not isinstance(shape, list) or len(shape) != 3 or any(
            isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SIDE for v in shape):
        raise _bad(path, "image_shape", f"[C, H, W] with sides from 1 to {MAX_SIDE}", shape)


def _check_alphas_cumprod(abar: Any, path: Path) -> None:
    if abar is None:
        return
    ok = isinstance(abar, list) and 2 <= len(abar) <= 100_000 and all(
        not isinstance(a, bool) and isinstance(a, (int, float)) and 0 < a < 1 for a in abar)
    if not ok or any(b > a for a, b in zip(abar, abar[1:])):
        raise _bad(path, "alphas_cumprod", "a non-increasing list of numbers in (0, 1)", abar)


# Bounds on the built-in UNet's settings: far beyond any model this UNet is meant for, far below absurd.
UNET_LIMITS = {"in_channels": (1, 64), "base_channels": (1, 4096), "num_res_blocks": (1, 64), "emb_dim": (2, 16384)}
MAX_SIDE = 65536
MAX_CLASSES = 1_000_000
META_CHECKED = ("unet", "diffusers")  # builders that run no user code, so they can be built on the meta device


def check_unet_kwargs(kwargs: dict, path: Path) -> None:
    """UserError for built-in UNet settings of the wrong type or an absurd size (before anything is allocated)."""
    known = set(UNET_LIMITS) | {"channel_mult", "dropout", "num_classes"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise UserError(f"{path}: unknown UNet setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key, (lo, hi) in UNET_LIMITS.items():
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi):
            raise _bad(path, f"architecture.kwargs.{key}", f"an integer from {lo} to {hi}", value)
    mult = kwargs.get("channel_mult")
    if mult is not None and (not isinstance(mult, list) or not 1 <= len(mult) <= 8 or any(
            isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= 64 for m in mult)):
        raise _bad(path, "architecture.kwargs.channel_mult", "a list of 1 to 8 integers from 1 to 64", mult)
    dropout = kwargs.get("dropout")
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                or not 0 <= dropout < 1):
        raise _bad(path, "architecture.kwargs.dropout", "a number in [0, 1)", dropout)


def check_weights_match(builder: Callable[[], nn.Module], weights: Path) -> None:
    """Build the network on the meta device (no memory) and compare its tensor shapes with the safetensors
    header, so a config that disagrees with its weights (or asks for terabytes) fails before allocation."""
    try:
        with safe_open(str(weights), "pt") as handle:
            shapes = {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in handle.keys()}
    except FileNotFoundError:
        raise UserError(f"{weights.parent}: missing {WEIGHTS_NAME}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{weights}: not a readable safetensors file ({first_lines(exc)})") from None
    try:
        with torch.device("meta"):
            expected = dict(builder().state_dict())
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a builder that cannot run on meta tensors is built for real
        if isinstance(exc, TypeError):
            raise
        return
    problem = statedict.state_dict_mismatch(expected, shapes)
    if problem:
        raise UserError(f"{weights} does not match its architecture: {problem}")


def load_native(folder: str | Path, device: str | torch.device = "cpu") -> NetworkDenoiser:
    """Load a native checkpoint folder into a NetworkDenoiser on `device` (eval mode)."""
    folder = Path(folder)
    config = read_config(folder)
    arch = config["architecture"]
    builder = ARCHITECTURES[arch["name"]]
    kwargs = dict(arch.get("kwargs", {}))
    weights = folder / WEIGHTS_NAME
    try:
        if arch["name"] in META_CHECKED:
            check_weights_match(lambda: builder(kwargs, folder), weights)
        net = builder(kwargs, folder)
    except TypeError as exc:
        raise UserError(f"{folder}: bad architecture settings: {exc}") from None
    net.architecture = arch
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
    schedule.interpolation = config.get("sigma_interpolation", "log")
    if config.get("alphas_cumprod") is not None:
        schedule.alphas_cumprod = torch.tensor(config["alphas_cumprod"], dtype=torch.float64)
    shape = config.get("image_shape")
    denoiser = NetworkDenoiser(net, config["parameterisation"], schedule,
                               image_shape=tuple(shape) if shape else None,
                               fixed_noise_input=config.get("fixed_noise_input"),
                               x0_limit=x0_limit_from_record(config.get("x0_limit"), str(folder)),
                               num_classes=config.get("num_classes"))
    denoiser.history = list(config.get("history", []))
    return denoiser.to(device).eval()
