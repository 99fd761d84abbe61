"""Latent diffusion models: a denoiser over autoencoder latents plus the diffusers AutoencoderKL or VQModel.

Latents z = s (E(x) - b) with E the encoder (AutoencoderKL: the posterior mean, deterministic; VQModel: the
pre-quantisation latents), s = scaling_factor and b = shift_factor (0 unless the config sets it); decoding is
x = G(z / s + b) (a VQModel quantises first, as diffusers' decode does). D in latent space is the inner
denoiser's own D(z, sigma), e.g. UNet + scheduler exactly as memaudit.models.diffusers_loader reads them.
A latent model folder is a diffusers pipeline folder with unet/, scheduler/ and vae/ (or LDMPipeline's vqvae/);
`--vae PATH` adds an autoencoder to any other model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from memaudit.denoiser import Denoiser, check_shape, fmt_shape
from memaudit.errors import UserError, first_lines
from memaudit.models.diffusers_loader import CONFIG_NAME, find_unet, import_diffusers, read_json

VAE_DIRS = ("vae", "vqvae")
VAE_CLASSES = ("AutoencoderKL", "VQModel")
ENCODE_BATCH = 64
DELEGATED = ("param", "schedule", "x0_limit", "net", "wrapper", "fixed_noise_input", "points")


class Autoencoder(nn.Module):
    """z = s (E(x) - b) and x = G(z / s + b), batched, without gradients, on the VAE's device."""

    def __init__(self, vae: nn.Module, kind: str, scale: float, shift: float, path: str, scale_source: str):
        super().__init__()
        self.vae, self.kind, self.path = vae, kind, path
        self.scale, self.shift, self.scale_source = float(scale), float(shift), scale_source

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def _encode(self, x: Tensor) -> Tensor:
        out = self.vae.encode(x)
        h = out.latent_dist.mean if self.kind == "AutoencoderKL" else out.latents
        return (h - self.shift) * self.scale

    def _decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z / self.scale + self.shift).sample

    def encode(self, images: Tensor, batch_size: int = ENCODE_BATCH) -> Tensor:
        """Latents of (N, C, H, W) images in [-1, 1], on the images' device."""
        return self._batched(self._encode, images, batch_size)

    def decode(self, latents: Tensor, batch_size: int = ENCODE_BATCH) -> Tensor:
        """Decoded images of (N, c, h, w) latents, on the latents' device."""
        return self._batched(self._decode, latents, batch_size)

    def _batched(self, fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int) -> Tensor:
        out = []
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                out.append(fn(x[start:start + batch_size].to(self.device, torch.float32)).to(x.device))
        return torch.cat(out)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """The latent shape of one (C, H, W) image: a UserError naming --channels/--resize/--vae if it does not fit."""
        try:
            z = self.encode(torch.zeros(1, *image_shape, device=self.device))
        except RuntimeError as exc:
            raise UserError(f"the autoencoder {self.path} cannot encode {fmt_shape(image_shape)} (CxHxW) images "
                            f"({first_lines(exc)}): pass --channels {self.in_channels} or the right --vae") from None
        return tuple(z.shape[1:])

    def decoded_shape(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """The image shape the decoder makes of one (c, h, w) latent; a UserError naming --vae if it cannot."""
        try:
            x = self.decode(torch.zeros(1, *latent_shape, device=self.device))
        except RuntimeError as exc:
            raise UserError(f"the autoencoder {self.path} cannot decode {fmt_shape(latent_shape)} latents "
                            f"({first_lines(exc)}): pass --vae with the autoencoder the model was trained "
                            "with") from None
        return tuple(x.shape[1:])

    @property
    def in_channels(self) -> int:
        return int(self.vae.config.in_channels)


class LatentModel(Denoiser):
    """D(z, sigma) of the inner denoiser over latents z, with the autoencoder that maps them to images."""

    def __init__(self, denoiser: Denoiser, autoencoder: Autoencoder):
        super().__init__()
        self.denoiser, self.autoencoder = denoiser, autoencoder
        self.encoded = None  # the training set's latents when built with them (empirical models)

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.denoiser(x, sigma)

    @property
    def sigma_min(self) -> float:
        return self.denoiser.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.denoiser.sigma_max

    @property
    def image_shape(self):
        return self.denoiser.image_shape

    @image_shape.setter
    def image_shape(self, shape) -> None:
        self.denoiser.image_shape = shape

    def encode(self, images: Tensor) -> Tensor:
        return self.autoencoder.encode(images)

    def decode(self, latents: Tensor) -> Tensor:
        return self.autoencoder.decode(latents)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in DELEGATED:
                return getattr(self._modules["denoiser"], name)
            raise


def is_latent(model: Any) -> bool:
    return isinstance(model, LatentModel)


def find_vae(folder: Path) -> Optional[Path]:
    """The autoencoder folder of a pipeline: vae/ or vqvae/ with a config.json naming its class."""
    for name in VAE_DIRS:
        config = read_json(folder / name / CONFIG_NAME)
        if config is not None and "_class_name" in config:
            return folder / name
    return None


def is_latent_folder(path: Path) -> bool:
    """A pipeline folder with a unet/ and a vae/ (or vqvae/)."""
    return path.is_dir() and find_unet(path) is not None and find_vae(path) is not None


def vae_folder(path: Path) -> Path:
    """--vae PATH: the autoencoder folder itself or a pipeline folder holding vae/ or vqvae/."""
    if not path.exists():
        raise UserError(f"--vae {path}: not found")
    config = read_json(path / CONFIG_NAME)
    if config is not None and "_class_name" in config:
        return path
    found = find_vae(path) if path.is_dir() else None
    if found is None:
        raise UserError(f"--vae {path}: no diffusers autoencoder config.json (AutoencoderKL or VQModel) here or "
                        f"in {' or '.join(d + '/' for d in VAE_DIRS)}")
    return found


def load_autoencoder(path: Path, latent_scale: Optional[float], device: str | torch.device) -> Autoencoder:
    """AutoencoderKL or VQModel.from_pretrained (safetensors, or .bin weights-only) with its scaling factor.

    The factor is the config's scaling_factor, or --latent-scale; a config that does not record one (diffusers
    would assume Stable Diffusion's 0.18215) is refused unless --latent-scale gives it."""
    config = read_json(path / CONFIG_NAME) or {}
    kind = config.get("_class_name")
    if kind not in VAE_CLASSES:
        raise UserError(f"{path}: {kind!r} is not a supported autoencoder; memaudit reads {', '.join(VAE_CLASSES)}")
    if config.get("latents_mean") is not None or config.get("latents_std") is not None:
        raise UserError(f"{path}: per-channel latents_mean/latents_std are not supported yet")
    if latent_scale is None and config.get("scaling_factor") is None:
        raise UserError(f"{path / CONFIG_NAME} does not record scaling_factor (diffusers would guess 0.18215): "
                        "pass --latent-scale S, the factor the diffusion model's latents were scaled by")
    if latent_scale is not None and not (latent_scale > 0 and latent_scale < float("inf")):
        raise UserError(f"--latent-scale must be > 0 and finite, not {latent_scale}")
    try:
        vae = getattr(import_diffusers(), kind).from_pretrained(str(path), local_files_only=True,
                                                                 low_cpu_mem_usage=False)
    except Exception as exc:
        raise UserError(f"{path}: cannot load the {kind}: {first_lines(exc, with_type=True)}") from None
    scale = latent_scale if latent_scale is not None else float(config["scaling_factor"])
    shift = float(config.get("shift_factor") or 0.0)
    source = "--latent-scale" if latent_scale is not None else "config"
    return Autoencoder(vae.to(device).eval(), kind, scale, shift, str(path), source)


def load_latent_folder(path: Path, options: Any) -> LatentModel:
    """A pipeline folder: the UNet + scheduler as memaudit.models.diffusers_loader reads them, and vae/ (or
    --vae, which replaces it)."""
    from memaudit.models import diffusers_loader

    if options.factory is not None:
        raise UserError(f"--factory does not apply to {path}: it is a latent diffusers pipeline")
    inner = diffusers_loader.load_diffusers(path, device=options.device, **options.network())
    inner.source = {"format": "diffusers", "path": str(find_unet(path))}
    vae = vae_folder(Path(options.vae)) if options.vae is not None else find_vae(path)
    return LatentModel(inner, load_autoencoder(vae, options.latent_scale, options.device))


def check_on_data(model: LatentModel, image_shape: Sequence[int]) -> tuple[int, int, int]:
    """The latent shape of the data, checked: the encoder takes the images, the denoiser its latents and the
    decoder gives images of the data's shape again; a UserError naming the flag to change otherwise."""
    from memaudit.models.load import check_model_on_data

    ae = model.autoencoder
    latent = ae.latent_shape(image_shape)
    if model.image_shape is not None and tuple(model.image_shape) != latent:
        raise UserError(f"the autoencoder {ae.path} makes {fmt_shape(latent)} latents of {fmt_shape(image_shape)} "
                        f"images but the model takes {fmt_shape(model.image_shape)}: pass --vae with the "
                        "autoencoder it was trained with (or --resize to the size it was trained at)")
    decoded = ae.decoded_shape(latent)
    if decoded != tuple(image_shape):
        raise UserError(f"the autoencoder {ae.path} decodes {fmt_shape(image_shape)} images to "
                        f"{fmt_shape(decoded)}: pass --channels/--resize to match it, or the right --vae")
    if model.image_shape is None:
        model.image_shape = latent
    check_shape(model, latent)
    check_model_on_data(model, latent)
    return latent


def check_not_bare_unet(spec: str, model: Denoiser, image_shape: Sequence[int]) -> None:
    """UserError when a pipeline's unet/ was passed alone and its latent shape does not fit the data."""
    parent = Path(spec).expanduser().parent
    shape = model.image_shape
    if shape is not None and tuple(shape) != tuple(image_shape) and find_vae(parent) is not None:
        raise UserError(f"{spec} is the UNet of a latent pipeline (it takes {fmt_shape(shape)} latents, the data "
                        f"are {fmt_shape(image_shape)} images): pass the pipeline folder {parent}, or --vae "
                        f"{find_vae(parent)}")


def describe(model: LatentModel) -> dict:
    """The latent settings a scan assumes: vae kind and path, scaling (and shift) factor, latent and decoded
    shape."""
    ae = model.autoencoder
    latent = model.image_shape
    return {"vae": ae.kind, "vae_path": ae.path, "scaling_factor": ae.scale, "scaling_factor_from": ae.scale_source,
            "shift_factor": ae.shift, "latent_shape": list(latent) if latent is not None else None,
            "decoded_shape": list(ae.decoded_shape(latent)) if latent is not None else None,
            "vae_parameters": sum(p.numel() for p in ae.parameters())}
