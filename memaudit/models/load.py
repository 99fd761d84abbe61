"""Load any supported checkpoint as a Denoiser D(x, sigma), detecting its format, and check it on the data.

Formats: memaudit native folder; latent diffusers pipeline (unet/, scheduler/, vae/ or vqvae/; or any model plus
--vae: memaudit.models.latent); diffusers UNet2DModel folder (+ scheduler config); TorchScript archive;
denoising-diffusion-pytorch Trainer checkpoint (+ --model-config); k-diffusion train.py checkpoint;
state dict (.safetensors or torch file) + --factory [--factory-args]; a whole pickled nn.Module (or a plain
pickle holding one) only with --trust-pickle;
"empirical[:T=..,k=..]" for the closed-form denoiser of the training set. Pickles are read weights-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from memaudit.conditioning import num_classes
from memaudit.denoiser import Denoiser, check_shape, fmt_shape
from memaudit.errors import UserError, first_lines
from memaudit.models import ddpm_pytorch, diffusers_loader, kdiffusion, latent, native, statedict, torchscript
from memaudit.models.adapters import PARAMETERISATIONS, NetworkDenoiser
from memaudit.models.json_args import read_json_arg
from memaudit.models.safe_pickle import safe_torch_load
from memaudit.models.schedules import SCHEDULES, make_schedule, set_sigma_range

EMPIRICAL = "empirical"


@dataclass(frozen=True)
class LoadOptions:
    """The loader flags: how to read a checkpoint that does not record everything (see load_model)."""

    device: str | torch.device = "cpu"
    param: Optional[str] = None
    schedule: Optional[str] = None
    factory: Optional[str] = None
    trust_pickle: bool = False
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    round_timesteps: bool = False
    model_config: Optional[str] = None
    factory_args: Optional[str] = None
    vae: Optional[str] = None  # --vae: the autoencoder of a latent model (memaudit.models.latent)
    latent_scale: Optional[float] = None
    num_classes: Optional[int] = None

    def network(self) -> dict:
        """The options that shape how a bare network is wrapped."""
        return dict(param=self.param, schedule=self.schedule, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                    round_timesteps=self.round_timesteps)


@dataclass(frozen=True)
class ModelFormat:
    """A table entry: whether a path is in this format, and how to load it as a Denoiser."""

    detect: Callable[[Path], bool]
    load: Callable[[Path, LoadOptions], Denoiser]
    summary: str


def _load_native(path: Path, o: LoadOptions) -> Denoiser:
    return load_native_checked(path, o.device, factory=o.factory, **o.network())


def _load_diffusers(path: Path, o: LoadOptions) -> Denoiser:
    _reject(o.factory, "--factory", path, "diffusers")
    return diffusers_loader.load_diffusers(path, device=o.device, **o.network())


def _load_torchscript(path: Path, o: LoadOptions) -> Denoiser:
    _reject(o.factory, "--factory", path, "torchscript")
    return wrap_network(torchscript.load_torchscript(path, o.device), path, "torchscript", **o.network(),
                        num_classes=o.num_classes)


def _load_ddpm_pytorch(path: Path, o: LoadOptions) -> Denoiser:
    _reject(o.factory, "--factory", path, "denoising-diffusion-pytorch")
    denoiser = ddpm_pytorch.load_ddpm_pytorch(path, model_config=o.model_config, param=o.param, schedule=o.schedule)
    denoiser.schedule.round_timesteps = bool(o.round_timesteps)
    set_sigma_range(denoiser.schedule, o.sigma_min, o.sigma_max)
    return denoiser


def _load_kdiffusion(path: Path, o: LoadOptions) -> Denoiser:
    _reject(o.factory, "--factory", path, "k-diffusion")
    denoiser = kdiffusion.load_kdiffusion(path, model_config=o.model_config, param=o.param, schedule=o.schedule,
                                          num_classes=o.num_classes)
    check_within(o.sigma_min, o.sigma_max, denoiser.sigma_min, denoiser.sigma_max, f"of {path}'s config")
    set_sigma_range(denoiser.schedule, o.sigma_min, o.sigma_max)
    return denoiser


def _load_file(fmt: str) -> Callable[[Path, LoadOptions], Denoiser]:
    def load(path: Path, o: LoadOptions) -> Denoiser:
        args = read_json_arg(o.factory_args, "--factory-args")
        return wrap_network(load_file_network(path, o.factory, o.trust_pickle, args), path, fmt, **o.network(),
                            num_classes=o.num_classes)
    return load


def _is_torch_file(path: Path) -> bool:
    check_torch_file(path)  # names what the file is instead when it is not a torch file
    return True


# Tried in order; the last one (a torch file) is the fallback for any other file.
FORMATS: dict[str, ModelFormat] = {
    "native": ModelFormat(lambda p: p.is_dir() and native.is_native(p), _load_native,
                          "memaudit checkpoint folder (model.safetensors + config.json)"),
    "latent": ModelFormat(latent.is_latent_folder, latent.load_latent_folder,
                          "latent diffusers pipeline folder: unet/, scheduler/ and vae/ (AutoencoderKL) or vqvae/ "
                          "(VQModel)"),
    "diffusers": ModelFormat(lambda p: p.is_dir() and diffusers_loader.is_diffusers(p), _load_diffusers,
                             "diffusers UNet2DModel or pipeline folder with its scheduler config"),
    "torchscript": ModelFormat(lambda p: p.is_file() and torchscript.is_torchscript(p), _load_torchscript,
                               "TorchScript network net(x_in, noise_in) (needs --param and --schedule)"),
    "ddpm-pytorch": ModelFormat(lambda p: p.is_file() and ddpm_pytorch.is_ddpm_checkpoint(p), _load_ddpm_pytorch,
                                "denoising-diffusion-pytorch Trainer checkpoint model-N.pt (needs --model-config "
                                "or model-config.json beside it)"),
    "k-diffusion": ModelFormat(lambda p: p.is_file() and kdiffusion.is_kdiffusion_checkpoint(p), _load_kdiffusion,
                               "k-diffusion train.py checkpoint (config + model_ema; --model-config for old ones)"),
    "safetensors": ModelFormat(lambda p: p.is_file() and statedict.is_safetensors(p), _load_file("safetensors"),
                               "state dict .safetensors (needs --factory, --param and --schedule)"),
    "torch": ModelFormat(lambda p: p.is_file() and _is_torch_file(p), _load_file("torch"),
                         "torch.save file: a state dict (read weights-only; needs --factory) or, with --trust-pickle, "
                         "a whole module"),
}


MODEL_CONFIG_FORMATS = ("ddpm-pytorch", "k-diffusion")  # the formats --model-config applies to
# --num-classes says whether they take labels: bare networks, and k-diffusion's mapping_cond (checked there)
NUM_CLASSES_FORMATS = ("torchscript", "safetensors", "torch", "k-diffusion")


def load_model(spec: str, *, device: str | torch.device = "cpu", param: Optional[str] = None,
               schedule: Optional[str] = None, factory: Optional[str] = None, trust_pickle: bool = False,
               sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
               round_timesteps: bool = False, train: Optional[torch.Tensor] = None,
               model_config: Optional[str] = None, factory_args: Optional[str] = None,
               vae: Optional[str] = None, latent_scale: Optional[float] = None,
               latent_cache: Optional[Path] = None, num_classes: Optional[int] = None) -> Denoiser:
    """The model named by `spec` (a path, or "empirical[:...]" built on `train`) as D(x, sigma), eval mode.

    A latent model (a pipeline folder with vae/, or any model with `vae`) is a latent.LatentModel; the empirical
    one is then built on the training set's latents (cached under `latent_cache`)."""
    if is_empirical_spec(spec) and vae is not None:
        return load_empirical_latent(spec, train, device, vae, latent_scale, latent_cache)
    if is_empirical_spec(spec):
        _no_latent_scale(latent_scale, spec)
        return load_empirical(spec, train, device)
    path = Path(spec).expanduser()
    fmt = detect_format(path)
    options = LoadOptions(device, param, schedule, factory, trust_pickle, sigma_min, sigma_max, round_timesteps,
                          model_config, factory_args, vae, latent_scale, num_classes)
    if factory_args is not None and (factory is None or fmt not in ("safetensors", "torch")):
        raise UserError("--factory-args gives the arguments of --factory, for a state-dict file: "
                        + ("pass --factory too" if factory is None else f"{path} is a {fmt} model"))
    if model_config is not None and fmt not in MODEL_CONFIG_FORMATS:
        raise UserError(f"--model-config does not apply to {path}: it is a {fmt} model")
    denoiser = FORMATS[fmt].load(path, options)
    if fmt not in NUM_CLASSES_FORMATS:
        check_recorded_classes(num_classes, denoiser, path, fmt)
    if fmt != "native" and (sigma_min is not None or sigma_max is not None):
        check_timestep_range(denoiser.schedule, sigma_min, sigma_max)
    denoiser.source = {"format": fmt, "path": str(path)}
    if fmt != "latent" and vae is not None:
        denoiser = latent.LatentModel(denoiser, latent.load_autoencoder(latent.vae_folder(Path(vae)), latent_scale,
                                                                         device))
        denoiser.source = {"format": f"latent ({fmt} + --vae)", "path": str(path)}
    elif fmt != "latent":
        _no_latent_scale(latent_scale, spec)
    return denoiser.to(device).eval()


def _no_latent_scale(latent_scale: Optional[float], spec: str) -> None:
    if latent_scale is not None:
        raise UserError(f"--latent-scale applies to latent models, and {spec} is not one: pass --vae PATH too, or a "
                        "pipeline folder with vae/")


def load_empirical_latent(spec: str, train: Optional[torch.Tensor], device: str | torch.device, vae: str,
                          latent_scale: Optional[float], cache: Optional[Path]) -> Denoiser:
    """The closed-form denoiser of the training set's latents, with the --vae autoencoder."""
    from memaudit.latents import train_latents

    if train is None:
        raise UserError("the empirical model needs training data")
    ae = latent.load_autoencoder(latent.vae_folder(Path(vae)), latent_scale, device)
    encoded = train_latents(ae, train, cache)
    model = latent.LatentModel(load_empirical(spec, encoded.latents.to(device), device), ae)
    model.encoded = encoded
    model.source = {"format": "latent (empirical + --vae)", "path": None}
    return model


def check_recorded_classes(given: Optional[int], denoiser: Denoiser, path: Path, fmt: str) -> None:
    """UserError when --num-classes contradicts the conditioning a checkpoint records."""
    recorded = num_classes(denoiser)
    if given is not None and given != recorded:
        what = f"class-conditional with {recorded} classes" if recorded else "unconditional"
        raise UserError(f"{path} is a {fmt} model that records its conditioning ({what}): drop --num-classes {given}")


def check_within(sigma_min: Optional[float], sigma_max: Optional[float], lo: float, hi: float, what: str) -> None:
    """UserError when a --sigma-min/--sigma-max override lies outside [lo, hi] (overrides may only narrow it)."""
    for option, value in (("--sigma-min", sigma_min), ("--sigma-max", sigma_max)):
        if value is not None and not lo * (1 - 1e-6) <= value <= hi * (1 + 1e-6):
            raise UserError(f"{option} {value:g} is outside the sigma range [{lo:g}, {hi:g}] {what}; "
                            "--sigma-min/--sigma-max can only narrow it")


def check_timestep_range(schedule, sigma_min: Optional[float], sigma_max: Optional[float]) -> None:
    """A VP (discrete-timestep) network cannot be queried beyond its first and last timestep's sigma."""
    if getattr(schedule, "alphas_cumprod", None) is None:
        return  # VE/EDM networks take any sigma: the override declares their range
    sigmas = schedule.discrete_sigmas
    check_within(sigma_min, sigma_max, float(sigmas[0]), float(sigmas[-1]),
                 f"of the {schedule.kind} schedule's timesteps")


def is_empirical_spec(spec: str) -> bool:
    """True for "empirical" and "empirical:<options>"."""
    return spec == EMPIRICAL or spec.startswith(EMPIRICAL + ":")


def load_empirical(spec: str, train: Optional[torch.Tensor], device: str | torch.device) -> Denoiser:
    """The closed-form denoiser of `train` a spec names: EmpiricalDenoiser, kernel-smoothed with kernel=h."""
    from memaudit.empirical import EmpiricalDenoiser, parse_empirical_spec
    from memaudit.smoothing.kernel import DEFAULT_SAMPLES, KernelSmoothedDenoiser

    if train is None:
        raise UserError("the empirical model needs training data")
    options = parse_empirical_spec(spec)
    h, samples = options.pop("kernel", None), options.pop("samples", None)
    if samples is not None and h is None:
        raise UserError(f"{spec!r}: samples=S applies to the kernel-smoothed model: add kernel=h")
    model = EmpiricalDenoiser(train, **options).to(device)
    return KernelSmoothedDenoiser(model, h, samples or DEFAULT_SAMPLES).to(device) if h else model


def detect_format(path: Path) -> str:
    """The name of the first format in FORMATS that `path` is in, or a UserError saying what it is instead."""
    if not path.exists():
        raise UserError(f"model not found: {path} (expected a checkpoint folder or file, or 'empirical')")
    if path.is_file() and path.name == native.WEIGHTS_NAME and native.is_native(path.parent):
        raise UserError(f"{path} is the weights file of the memaudit checkpoint {path.parent}: pass the folder "
                        f"{path.parent}")
    for name, fmt in FORMATS.items():
        if fmt.detect(path):
            return name
    inside = sorted(p.name for p in path.iterdir() if p.is_dir() and native.is_native(p))
    hint = f"; it holds memaudit checkpoints: pass one of them, e.g. {path / inside[0]}" if inside else ""
    raise UserError(f"{path}: unknown model folder: neither a memaudit checkpoint (config.json with "
                    f"format {native.FORMAT!r}) nor a diffusers UNet folder (config.json with _class_name){hint}")


def check_torch_file(path: Path) -> None:
    """UserError unless the file starts like a torch.save file: a zip archive or a binary pickle.

    Text, JSON and other files are named as such, instead of being unpickled (and blamed on pickle safety).
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise UserError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    if head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return
    if not head:
        what = "the file is empty"
    elif head.lstrip()[:1] in (b"{", b"["):
        what = "it is a JSON file; for a config.json give the folder that holds it"
    else:
        what = "neither a zip archive nor a pickle"
    raise UserError(f"{path}: not a readable torch checkpoint ({what}); MODEL is a checkpoint folder (memaudit or "
                    "diffusers), a TorchScript or torch.save file, or a .safetensors state dict")


def load_file_network(path: Path, factory: Optional[str], trust_pickle: bool,
                      factory_args: Optional[dict] = None) -> nn.Module:
    """A state-dict file loaded into the --factory network, or (with trust_pickle) a whole pickled module, also
    one a training snapshot holds under a usual key (EDM's network-snapshot pickles: 'ema')."""
    if factory is not None:
        return statedict.load_factory_network(path, factory, trust_pickle=trust_pickle, args=factory_args)
    if not statedict.is_safetensors(path):
        obj = safe_torch_load(path, trust_pickle=trust_pickle)
        if isinstance(obj, dict):
            obj = next((obj[k] for k in statedict.STATE_DICT_KEYS if isinstance(obj.get(k), nn.Module)), obj)
        if isinstance(obj, nn.Module):
            return obj
    raise UserError(f"{path} holds weights, not a network: pass --factory package.module:function "
                    "(or file.py:function) that builds the network")


def wrap_network(net: nn.Module, path: Path, fmt: str, *, param: Optional[str], schedule: Optional[str],
                 sigma_min: Optional[float], sigma_max: Optional[float], round_timesteps: bool,
                 num_classes: Optional[int] = None) -> NetworkDenoiser:
    """NetworkDenoiser(net, param, schedule) for formats that do not record how the network was trained; with
    num_classes (--num-classes), the network is called net(x_in, noise_in, class_labels)."""
    if param is None or schedule is None:
        raise UserError(f"{path} is a {fmt} model that does not record how it was trained: pass "
                        f"--param {'|'.join(PARAMETERISATIONS)} and --schedule {'|'.join(SCHEDULES)}")
    sched = make_schedule(schedule, sigma_min, sigma_max)
    sched.round_timesteps = bool(round_timesteps)
    return NetworkDenoiser(net, param, sched, num_classes=num_classes)


def load_native_checked(path: Path, device: str | torch.device, *, factory: Optional[str],
                        param: Optional[str], schedule: Optional[str], sigma_min: Optional[float],
                        sigma_max: Optional[float], round_timesteps: bool) -> NetworkDenoiser:
    """load_native, refusing --param/--schedule that contradict its config; sigma range and rounding apply."""
    with statedict.confirmed_factory(factory):
        denoiser = native.load_native(path, device)
    for option, given, recorded in (("--param", param, denoiser.param),
                                    ("--schedule", schedule, denoiser.schedule.kind)):
        if given is not None and given != recorded:
            raise UserError(f"{path} is a memaudit checkpoint trained with {option} {recorded}; drop {option} {given}")
    if sigma_min is not None or sigma_max is not None:
        check_within(sigma_min, sigma_max, denoiser.sigma_min, denoiser.sigma_max, f"recorded in {path}")
        set_sigma_range(denoiser.schedule, sigma_min, sigma_max)
    denoiser.schedule.round_timesteps = denoiser.schedule.round_timesteps or bool(round_timesteps)
    return denoiser


def _reject(value: Optional[str], option: str, path: Path, fmt: str) -> None:
    if value is not None:
        raise UserError(f"{option} does not apply to {path}: it is a {fmt} model")


def check_model_on_data(denoiser: Denoiser, image_shape: Sequence[int], batch: int = 2) -> None:
    """Forward passes on a tiny (batch, C, H, W) batch at sigma_min, the mid sigma and sigma_max.

    UserError("image shape mismatch: ...") if the model cannot take such images; UserError on NaN/inf output at
    any of the three noise levels (a model finite at the mid sigma may still overflow at the ends).
    """
    check_shape(denoiser, image_shape)
    lo, hi = float(denoiser.sigma_min), float(denoiser.sigma_max)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand((batch, *image_shape), generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    shape = fmt_shape(image_shape)
    classes = num_classes(denoiser)  # a class-conditional model is checked on its first and last class
    labels = None if classes is None else torch.tensor([0, classes - 1] * batch)[:batch].to(denoiser.device)
    for sigma in ((lo * hi) ** 0.5, lo, hi):
        x = (x0 + sigma * noise).to(denoiser.device, _float_dtype(denoiser))
        try:
            with torch.no_grad():
                out = denoiser(x, sigma, class_labels=labels)
        except UserError as exc:
            raise UserError(f"the model fails on {shape} (CxHxW) images: {first_lines(exc)}") from None
        except (TypeError, IndexError) as exc:  # a network called with or without class labels it does not expect
            raise UserError(f"the model fails on {shape} (CxHxW) images: {first_lines(exc, with_type=True)}; "
                            + classes_hint(classes)) from None
        except RuntimeError as exc:
            if "argument" in str(exc):  # TorchScript's wrong number of arguments
                raise UserError(f"the model fails on {shape} (CxHxW) images: {first_lines(exc)}; "
                                + classes_hint(classes)) from None
            raise UserError(f"image shape mismatch: the model fails on {shape} (CxHxW) images: "
                            f"{first_lines(exc)}") from None
        if not torch.isfinite(out).all():
            raise UserError(f"the model returns NaN/inf on {shape} images at sigma={sigma:.3g}; "
                            + non_finite_hint(denoiser))


def classes_hint(classes: Optional[int]) -> str:
    """What to check when a network fails on the class labels it was, or was not, given."""
    if classes is None:
        return "if the network is class-conditional, net(x_in, noise_in, class_labels), pass --num-classes N"
    return (f"it was called net(x_in, noise_in, class_labels) for {classes} classes: check --num-classes "
            f"{classes} (drop it for an unconditional network)")


def non_finite_hint(denoiser: Denoiser) -> str:
    """What to check when a model returns NaN/inf: the empirical model's options, or a checkpoint's settings."""
    if getattr(denoiser, "points", None) is not None and not hasattr(denoiser, "net"):
        return "the empirical model's options (T, h) make its softmax overflow; use values nearer 1"
    return "check the checkpoint and its --param/--schedule, or narrow the range with --sigma-min/--sigma-max"


def _float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating-point parameter or buffer (float32 if none)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32
