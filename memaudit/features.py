"""Feature spaces: one table, name -> a module mapping images (B, C, H, W) in [-1, 1] to features (B, F).

The NN ratio, the near-duplicate clusters, the kNN graph of the smoothing loss and the Frechet distance all take a
feature space from here (k-diffusion's evaluation.py and torch-fidelity's registry.py are the model). A spec is a
name, or name:ARGUMENT for the spaces that load a file:

  pixels             the flattened image itself (the default)
  inception          clean-fid's Inception-v3 pool3 (2048-d), when clean-fid and its weights are on disk
  torchscript:PATH   any TorchScript embedding network a user exports (e.g. SSCD as it is distributed)
  resnet18:PATH      a torchvision-layout ResNet-18 state dict (512-d, global-average-pooled, L2-normalised), as
                     the seed paper's feature-space kNN uses; no torchvision needed

Nothing is downloaded: a space that needs weights takes a local file.
"""

from __future__ import annotations

import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from memaudit.data import to_uint8
from memaudit.storage import ImageStore
from memaudit.errors import UserError, first_lines


@dataclass
class FeatureSpace:
    """A named map from images in [-1, 1] to float32 CPU features (B, F); pixel space when `fn` is None."""

    name: str
    fn: Optional[Callable[[Tensor], Tensor]] = None

    @property
    def is_pixels(self) -> bool:
        return self.fn is None

    def __call__(self, x: Tensor) -> Tensor:
        if self.fn is None:
            return x.detach().reshape(x.shape[0], -1).to("cpu", torch.float32)
        return self.fn(x)


PIXELS = FeatureSpace("pixels")


def embed(images: Tensor, features: Optional[FeatureSpace], batch_size: int = 256) -> Tensor:
    """Features of `images` as a float32 CPU tensor (N, F), computed in batches (pixels when features is None)."""
    features = features or PIXELS
    if isinstance(images, ImageStore):  # chunk by chunk (pixels of a uint8 store: converted, a copy)
        return torch.cat([features(images.images(slice(a, min(a + batch_size, len(images)))))
                          for a in range(0, len(images), batch_size)])
    if features.is_pixels:
        return features(images)
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            out.append(features(images[start:start + batch_size]).detach().to("cpu", torch.float32))
    return torch.cat(out)


def _checked(name: str, module: Callable[[Tensor], Tensor], device) -> Callable[[Tensor], Tensor]:
    """Wrap a (B, C, H, W) -> (B, F) module: inputs moved to `device`, one-line errors, outputs float32 CPU."""
    def features(x: Tensor) -> Tensor:
        try:
            with torch.no_grad():
                out = module(x.to(device))
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"feature space {name} failed on input {tuple(x.shape)}: "
                            f"{first_lines(exc, with_type=True)}") from None
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise UserError(f"feature space {name} must return (B, F) features, got {shape} for batch {x.shape[0]}")
        return out.detach().float().cpu()

    return features


def pixels(argument: Optional[str], device) -> FeatureSpace:
    return PIXELS


def torchscript(path: Optional[str], device) -> FeatureSpace:
    """A TorchScript module x (B,C,H,W) in [-1,1] -> (B,F), loaded with torch.jit.load."""
    if not path:
        raise UserError("the torchscript feature space needs a file: torchscript:PATH")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.9 deprecates TorchScript loading
            module = torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:  # torch raises RuntimeError/ValueError/OSError for missing or non-TorchScript files
        raise UserError(f"cannot load feature extractor {path} as TorchScript: "
                        f"{first_lines(exc, with_type=True)}") from None
    return FeatureSpace(f"torchscript:{path}", _checked(str(path), module, device))


INCEPTION_FILE = "inception-2015-12-05.pt"


def _import_cleanfid():
    """cleanfid.fid, or None if it (or its torchvision dependency) cannot be imported."""
    try:
        from cleanfid import fid
    except Exception:  # ImportError, or torchvision failing to load against this torch
        return None
    return fid


def cleanfid_available() -> bool:
    """True if clean-fid can be imported."""
    return _import_cleanfid() is not None


def inception_cache_path() -> Path:
    """Where clean-fid looks for its Inception weights: /tmp on POSIX, ./ on Windows."""
    return Path("./" if platform.system() == "Windows" else "/tmp") / INCEPTION_FILE


def inception_features(device) -> Callable[[Tensor], Tensor]:
    """clean-fid's Inception pool3 features (B, 2048) for images in [-1, 1], resized the clean-fid way.

    UserError when clean-fid cannot be imported or its weights are not already on disk (no download).
    """
    if _import_cleanfid() is None:
        raise UserError("the inception feature space needs clean-fid (pip install 'memaudit[fid]')")
    weights = inception_cache_path()
    if not weights.is_file():
        raise UserError(f"clean-fid's Inception weights are not at {weights}: copy {INCEPTION_FILE} there (nothing "
                        "is downloaded)")
    from cleanfid.features import build_feature_extractor
    from cleanfid.resize import build_resizer

    model = build_feature_extractor("clean", device=torch.device(device))
    resize = build_resizer("clean")

    def features(x: Tensor) -> Tensor:
        arrays = [resize(np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a) for a in to_uint8(x)]
        batch = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2)).float().to(device)
        with torch.no_grad():
            return model(batch).detach().float().cpu().reshape(x.shape[0], -1)

    return features


def inception(argument: Optional[str], device) -> FeatureSpace:
    """clean-fid's Inception pool3 features (B, 2048), images resized the clean-fid way (no download)."""
    return FeatureSpace("inception", inception_features(device))


def resnet18(path: Optional[str], device) -> FeatureSpace:
    """ResNet-18 trunk features (512-d, L2-normalised) from a local torchvision-layout state dict."""
    from memaudit.resnet import resnet18_features

    if not path:
        raise UserError("the resnet18 feature space needs a weights file: resnet18:PATH (a torchvision state dict)")
    return FeatureSpace(f"resnet18:{path}", _checked("resnet18", resnet18_features(path, device), device))


# name -> factory(argument, device); the table --features chooses from.
FEATURE_SPACES: dict[str, Callable[[Optional[str], torch.device], FeatureSpace]] = {
    "pixels": pixels,
    "inception": inception,
    "torchscript": torchscript,
    "resnet18": resnet18,
}


def feature_space(spec: Optional[str], device, image_shape: Optional[tuple] = None) -> FeatureSpace:
    """The feature space a spec names ('pixels', 'inception', 'torchscript:PATH', 'resnet18:PATH'; a bare path is
    a TorchScript file), checked once on a probe batch of `image_shape` when given."""
    if not spec or spec == "pixels":
        return PIXELS
    name, sep, argument = spec.partition(":")
    if name not in FEATURE_SPACES:
        if sep and len(name) == 1:  # a Windows drive letter: a path
            name, argument = "torchscript", spec
        elif not sep:
            name, argument = "torchscript", spec
        else:
            raise UserError(f"unknown feature space {name!r}; choose from {', '.join(FEATURE_SPACES)} "
                            "(torchscript and resnet18 take :PATH)")
    space = FEATURE_SPACES[name](argument or None, torch.device(device))
    if image_shape is not None and not space.is_pixels:
        space(torch.zeros((2, *image_shape)))
    return space


def describe() -> str:
    """One line for --help: the names and their forms."""
    return "pixels (default), inception, torchscript:PATH, resnet18:PATH"
