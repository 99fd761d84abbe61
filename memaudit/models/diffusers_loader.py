"""diffusers checkpoints: a UNet2DModel folder (save_pretrained) plus its scheduler config.

The scheduler's own alphas_cumprod give the VP schedule, abar_t = prod_{s<=t} (1 - beta_s); prediction_type
epsilon|v_prediction|sample -> eps|v|x0; clip_sample / thresholding limit D; every other field is honoured or
refused by memaudit.models.scheduler_fields; the network is net(x_vp, t) = unet(x_vp, t).sample, or with
num_class_embeds = N (class_embed_type None) the class-conditional net(x_vp, t, c) = unet(x_vp, t, class_labels=c).
diffusers is an optional extra, imported only when such a folder is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from memaudit.errors import UserError, first_lines
from memaudit.models import scheduler_fields
from memaudit.models.adapters import NetworkDenoiser
from memaudit.models.schedules import Schedule, make_schedule, set_sigma_range

CONFIG_NAME = "config.json"
SCHEDULER_NAME = "scheduler_config.json"
UNET_CLASSES = ("UNet2DModel",)


def import_diffusers() -> Any:
    """The diffusers package, or a UserError saying how to install it."""
    try:
        import diffusers
    except ImportError as exc:
        raise UserError(f"loading a diffusers model needs diffusers ({exc}): pip install 'memaudit[diffusers]'"
                        ) from None
    return diffusers


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in `path`, or None if it is absent or not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_unet(folder: str | Path) -> Optional[Path]:
    """The diffusers model folder: `folder` itself or its unet/ subfolder (a pipeline), if either has one."""
    folder = Path(folder)
    for unet_dir in (folder, folder / "unet"):
        config = read_json(unet_dir / CONFIG_NAME)
        if config is not None and "_class_name" in config:
            return unet_dir
    return None


def find_scheduler_config(unet_dir: Path) -> Optional[Path]:
    """scheduler_config.json beside the UNet, in its scheduler/ subfolder, or in the pipeline's scheduler/."""
    for path in (unet_dir / SCHEDULER_NAME, unet_dir / "scheduler" / SCHEDULER_NAME,
                 unet_dir.parent / "scheduler" / SCHEDULER_NAME):
        if path.is_file():
            return path
    return None


def is_diffusers(folder: str | Path) -> bool:
    """True if `folder` (or its unet/ subfolder) holds a diffusers model config.json."""
    return Path(folder).is_dir() and find_unet(folder) is not None


def schedule_from_scheduler(config: dict, source: Path) -> Schedule:
    """The VP schedule of a scheduler config: diffusers' own alphas_cumprod (scheduler_fields checks each field)."""
    scheduler = scheduler_fields.build_scheduler(config, source)
    full = {**dict(scheduler.config), "_class_name": type(scheduler).__name__}  # with the class's defaults
    scheduler_fields.check_fields(full, source)
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise UserError(f"{source}: {type(scheduler).__name__} has no alphas_cumprod; pass --schedule and --param")
    kind = "vp-cosine" if full.get("beta_schedule") == "squaredcos_cap_v2" else "vp-linear"
    abar = torch.as_tensor(abar).double()
    sig = torch.sqrt((1 - abar) / abar)
    if not (torch.isfinite(sig).all() and (sig > 0).all() and (sig.diff() > 0).all()):
        raise UserError(f"{source}: its schedule's sigmas are not finite and increasing; pass --schedule and --param")
    return Schedule(kind, float(sig[0]), float(sig[-1]), alphas_cumprod=abar,
                    interpolation=scheduler_fields.interpolation_of(full))


def full_scheduler_config(config: dict, source: Path) -> dict:
    """The scheduler config with the class's defaults filled in, as diffusers' from_config does."""
    return {**dict(scheduler_fields.build_scheduler(config, source).config), "_class_name":
            config.get("_class_name", "DDPMScheduler")}


def param_from_scheduler(config: dict, source: Path) -> str:
    """prediction_type epsilon|v_prediction|sample -> eps|v|x0 (diffusers defaults to epsilon)."""
    return scheduler_fields.param_of(config, source)


class DiffusersUNetNet(nn.Module):
    """net(x_in, t[, c]) = unet(x_in, t, class_labels=c).sample; of a learned-variance output (2C channels) the
    first C."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.architecture = {"name": "diffusers", "kwargs": {"config": unet_config(unet)}}
        self.num_classes = class_count(dict(unet.config))

    def forward(self, x_in: Tensor, noise_in: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        out = self.unet(x_in, noise_in, class_labels=class_labels).sample
        if out.shape[1] == 2 * x_in.shape[1]:
            out = out[:, : x_in.shape[1]]
        return out


def unet_config(unet: nn.Module) -> dict:
    """The UNet's public config as plain JSON values (tuples become lists, private keys dropped)."""
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return json.loads(json.dumps(config))


def class_count(config: dict) -> Optional[int]:
    """num_class_embeds of a UNet with a label embedding (class_embed_type None), None when unconditional;
    a UserError for the class embeddings memaudit cannot feed (timestep, identity, projection, simple_projection)."""
    kind, n = config.get("class_embed_type"), config.get("num_class_embeds")
    if kind is not None:
        raise UserError(f"the diffusers UNet has class_embed_type {kind!r}, which takes vectors rather than class "
                        "labels; memaudit audits label-conditioned UNets (num_class_embeds) and unconditional ones")
    return int(n) if n is not None else None


def image_shape_of(config: dict) -> Optional[tuple[int, int, int]]:
    """(in_channels, H, W) from the UNet config's in_channels and sample_size (int or [H, W])."""
    size = config.get("sample_size")
    if size is None or config.get("in_channels") is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(config["in_channels"]), int(h), int(w)


def build_unet(config: dict) -> DiffusersUNetNet:
    """A UNet2DModel with fresh weights from its config (native ARCHITECTURES builder)."""
    model_cls = import_diffusers().UNet2DModel
    try:
        return DiffusersUNetNet(model_cls.from_config(config))
    except Exception as exc:
        raise UserError(f"bad diffusers UNet config: {type(exc).__name__}: {exc}") from None


def network_from_native(kwargs: dict, folder: Path) -> DiffusersUNetNet:
    """Native ARCHITECTURES builder for {"name": "diffusers", "kwargs": {"config": {...}}}."""
    if not isinstance(kwargs.get("config"), dict):
        raise UserError(f"{folder}: diffusers architecture lacks its UNet 'config'")
    return build_unet(kwargs["config"])


def load_unet(unet_dir: Path) -> DiffusersUNetNet:
    """UNet2DModel.from_pretrained on a local folder (safetensors, or .bin read with weights_only=True)."""
    config = read_json(unet_dir / CONFIG_NAME) or {}
    if config.get("_class_name") not in UNET_CLASSES:
        raise UserError(f"{unet_dir}: {config.get('_class_name')!r} is not supported; memaudit loads "
                        f"{', '.join(UNET_CLASSES)} models (unconditional or with num_class_embeds)")
    model_cls = import_diffusers().UNet2DModel
    try:
        unet = model_cls.from_pretrained(str(unet_dir), local_files_only=True, low_cpu_mem_usage=False)
    except Exception as exc:
        raise UserError(f"{unet_dir}: cannot load the diffusers UNet: {first_lines(exc, with_type=True)}") from None
    return DiffusersUNetNet(unet)


def load_diffusers(folder: str | Path, *, device: str | torch.device = "cpu", param: Optional[str] = None,
                   schedule: Optional[str] = None, sigma_min: Optional[float] = None,
                   sigma_max: Optional[float] = None, round_timesteps: bool = False) -> NetworkDenoiser:
    """A diffusers UNet folder as D(x, sigma); --param/--schedule, when given, override the scheduler config."""
    folder = Path(folder)
    unet_dir = find_unet(folder)
    if unet_dir is None:
        raise UserError(f"{folder}: no diffusers model config.json (with _class_name) here or in unet/")
    net = load_unet(unet_dir)
    sched_config, sched_path = _scheduler_config(unet_dir, needed=param is None or schedule is None)
    if param is None or schedule is None:
        sched_config = full_scheduler_config(sched_config, sched_path)
    sched = (make_schedule(schedule) if schedule is not None
             else schedule_from_scheduler(sched_config, sched_path))
    sched.round_timesteps = bool(round_timesteps)
    set_sigma_range(sched, sigma_min, sigma_max)
    param = param or param_from_scheduler(sched_config, sched_path)
    limit = scheduler_fields.x0_limit_of(sched_config) if schedule is None else None
    denoiser = NetworkDenoiser(net, param, sched, image_shape=image_shape_of(dict(net.unet.config)), x0_limit=limit,
                               num_classes=net.num_classes)
    return denoiser.to(device).eval()


def _scheduler_config(unet_dir: Path, needed: bool) -> tuple[dict, Path]:
    path = find_scheduler_config(unet_dir)
    if path is None:
        if needed:
            raise UserError(f"{unet_dir}: no {SCHEDULER_NAME} beside the UNet, in scheduler/ or ../scheduler/; "
                            "save the scheduler with save_pretrained or pass --param and --schedule")
        return {}, unet_dir
    config = read_json(path)
    if config is None:
        raise UserError(f"{path} is not a JSON object")
    return config, path
