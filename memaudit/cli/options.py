"""Options shared by several subcommands, their choices generated from the tables, and small helpers.

Choices come from the extension-point tables (samplers, metrics, parameterisations, schedules, feature spaces), so
--help lists what is registered; FLAGS names the flag of each setting a core error speaks of.
"""

from __future__ import annotations

import enum
from typing import Literal, Optional

import torch
import typer

from memaudit.errors import UserError, printable  # noqa: F401 (printable: for the commands)
from memaudit.features import describe as describe_features
from memaudit.metrics import SKIP_CHOICES
from memaudit.metrics.fid import FID_MODES
from memaudit.models.parameterisations import PARAMETERISATIONS
from memaudit.models.schedules import SCHEDULE_SYNTAX, SCHEDULES
from memaudit.sampling import SAMPLERS

def choices(name: str, values) -> type[enum.Enum]:
    """A str Enum of the table's names, for repeatable options (typer lists the choices in --help)."""
    return enum.Enum(name, {v: v for v in values}, type=str)


def values(items) -> list[str]:
    """The names chosen for a repeatable choice option."""
    return [getattr(item, "value", item) for item in items]


SamplerName = choices("SamplerName", SAMPLERS)
SkipName = choices("SkipName", SKIP_CHOICES)
FidMode = Literal[FID_MODES]
ParamName = Literal[tuple(PARAMETERISATIONS)]
ScheduleName = str  # KIND[:name=value,...], parsed by memaudit.models.schedules.parse_schedule_spec

# The flag that sets each setting named by a core SettingError (memaudit.errors).
FLAGS = {"num_samples": "--samples", "samplers": "--sampler", "steps": "--steps", "batch_size": "--batch-size",
         "threshold": "--threshold", "topk": "--topk", "seed": "--seed", "skip": "--skip", "fid": "--fid",
         "dup_tol": "--dup-tol", "sigma_min": "--sigma-min", "sigma_max": "--sigma-max", "lr": "--lr",
         "ema_decay": "--ema", "checkpoint_every": "--checkpoint-every", "temperature": "--temperature",
         "k": "--k", "bandwidth": "--bandwidth", "features": "--features", "channels": "--channels",
         "resize": "--resize", "limit": "--limit", "value_range": "--value-range", "kernel": "--kernel",
         "kernel_samples": "--kernel-samples", "denominator": "--denominator", "sigma_collapse": "--sigma-collapse",
         "sigma_sampling": "--sigma-sampling", "match_shifts": "--match-shifts", "fpr": "--fpr",
         "holdout": "--holdout"}
FEATURES = typer.Option(None, "--features", help=f"Feature space for NN distances and duplicates: "
                                                 f"{describe_features()}.")

DEVICE = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N.")
RESIZE = typer.Option(None, "--resize", help="Resize every training image to N x N.")
CHANNELS = typer.Option(None, "--channels", help="Force 1 (grayscale) or 3 (RGB) channels.")
SEED = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Random seed (same seed, device and thread count = "
                                                               "same results; see docs/reliability.md).")
VALUE_RANGE = typer.Option(None, "--value-range", metavar="LO,HI",
                           help="What the extremes of a .npy/.npz array's values mean, e.g. 0,16 (needed when "
                                "they are not [0, 1], [-1, 1] or [0, 255]).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
CACHE_DIR = typer.Option(None, "--cache-dir", metavar="DIR|off",
                         help="Where decoded image folders are cached, keyed by their files' contents (default "
                              "$MEMAUDIT_IMAGE_CACHE, else $MEMAUDIT_CACHE/images, else ~/.cache/memaudit/images); "
                              "off: no cache.")


def resolve_device(name: str) -> torch.device:
    """A torch device, checked to exist (cuda without a GPU is a one-line error)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device


def positive(value: Optional[float], name: str) -> None:
    if value is not None and not value > 0:
        raise UserError(f"{name} must be > 0, not {value}")


# Checkpoint loader options shared by `scan` and `smooth` (see memaudit.models.load.load_model).
PARAM = typer.Option(None, "--param", help="Network output (TorchScript / state dicts; overrides a diffusers "
                                           "scheduler's prediction_type).")
SCHEDULE = typer.Option(None, "--schedule", metavar="KIND[:name=value,...]",
                        help=f"Noise schedule (TorchScript / state dicts; overrides a diffusers scheduler): "
                             f"{', '.join(SCHEDULES)}; {SCHEDULE_SYNTAX}.")
FACTORY = typer.Option(None, "--factory", help="package.module:function (or file.py:function) building the network "
                                               "net(x_in, noise_in) for a state dict (docs/formats.md has recipes).")
FACTORY_ARGS = typer.Option(None, "--factory-args", metavar="JSON|FILE",
                            help="Keyword arguments for --factory: inline JSON such as '{\"sample_size\": 8}' or a "
                                 "JSON file.")
TRUST_PICKLE = typer.Option(False, "--trust-pickle", help="Allow unpickling a whole module (runs code from the "
                                                          "file: only for files you trust).")
SIGMA_MIN = typer.Option(None, "--sigma-min", help="Override the model's smallest valid sigma.")
SIGMA_MAX = typer.Option(None, "--sigma-max", help="Override the model's largest valid sigma.")
ROUND_TIMESTEPS = typer.Option(False, "--round-timesteps", help="Feed VP models integer timesteps.")
MODEL_CONFIG = typer.Option(None, "--model-config", metavar="JSON|FILE",
                            help="Network constructor arguments for checkpoints that do not save them "
                                 "(denoising-diffusion-pytorch: '{\"unet\": {\"dim\": 64, ...}}'); inline JSON or a "
                                 "file (default: model-config.json beside the checkpoint).")
NUM_CLASSES = typer.Option(None, "--num-classes", min=1, metavar="N",
                           help="The network is class-conditional with N classes, called net(x_in, noise_in, "
                                "class_labels) (TorchScript / state dicts; other formats record it).")

VAE = typer.Option(None, "--vae", metavar="PATH", help="Latent model: the diffusers AutoencoderKL/VQModel folder "
                                                       "(or a pipeline holding vae/) whose latents MODEL denoises.")
LATENT_SCALE = typer.Option(None, "--latent-scale", metavar="S", help="Latent model: the latents' scaling factor "
                                                                     "(default: the VAE config's scaling_factor).")


def load_checked_model(spec: str, train, device, *, param=None, schedule=None, factory=None, trust_pickle=False,
                       sigma_min=None, sigma_max=None, round_timesteps=False, model_config=None,
                       factory_args=None, vae=None, latent_scale=None, latent_cache=None, num_classes=None):
    """Load MODEL with the loader options and check one forward pass on the training images' shape (a latent
    model: on their latents, and that the autoencoder gives back images of that shape)."""
    from memaudit.models import latent
    from memaudit.models.load import check_model_on_data, load_model

    positive(sigma_min, "--sigma-min")
    positive(sigma_max, "--sigma-max")
    model = load_model(spec, device=device, param=param, schedule=schedule, factory=factory,
                       trust_pickle=trust_pickle, sigma_min=sigma_min, sigma_max=sigma_max,
                       round_timesteps=round_timesteps, train=train, model_config=model_config,
                       factory_args=factory_args, vae=vae, latent_scale=latent_scale, latent_cache=latent_cache,
                       num_classes=num_classes)
    if latent.is_latent(model):
        latent.check_on_data(model, tuple(train.shape[1:]))
        return model
    latent.check_not_bare_unet(spec, model, tuple(train.shape[1:]))
    check_model_on_data(model, tuple(train.shape[1:]))
    if model.image_shape is None:  # TorchScript / state-dict networks take the data's shape
        model.image_shape = tuple(train.shape[1:])
    return model


def model_info(spec: str, model) -> dict:
    """The report's "model" section."""
    source = getattr(model, "source", None) or {}
    kind = source.get("format") or ("empirical" if spec.startswith("empirical") else type(model).__name__)
    shape = model.image_shape
    return {"spec": spec, "kind": kind, "sigma_min": float(model.sigma_min), "sigma_max": float(model.sigma_max),
            "image_shape": list(shape) if shape is not None else None}
