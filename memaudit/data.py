"""Training images from folders (PNG/JPEG, recursive) or .npy/.npz arrays -> float tensors in [-1, 1].

Value conventions: uint8 arrays and image files are in [0, 255]; float arrays in [0, 1] are mapped with
x * 2 - 1, float arrays already in [-1, 1] are kept, other floats in [0, 255] are divided by 127.5 and
shifted. Layouts: (N, H, W), (N, H, W, C) and (N, C, H, W) with C in {1, 3}.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from memaudit.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
ARRAY_KEYS = ("images", "x", "data", "arr_0")


def load_images(path: str | Path, resize: Optional[int] = None, channels: Optional[int] = None,
                limit: Optional[int] = None) -> Tensor:
    """Load a dataset as a float32 tensor (N, C, H, W) in [-1, 1].

    resize: square side length to resize every image to (bilinear/antialiased); channels: 1 or 3 to force.
    """
    path = Path(path)
    if channels not in (None, 1, 3):
        raise UserError(f"--channels must be 1 or 3, not {channels}")
    if resize is not None and resize < 1:
        raise UserError(f"--resize must be a positive side length, not {resize}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, not {limit}")
    if not path.exists():
        raise UserError(f"data not found: {path}")
    if path.is_dir():
        images = _load_folder(path, resize, channels, limit)
    elif path.suffix.lower() in (".npy", ".npz"):
        images = _load_array_file(path, resize, channels, limit)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        images = _stack_pil([_open_image(path)], resize, channels)
    else:
        raise UserError(f"unsupported data file {path}: use a folder of images or a .npy/.npz array")
    if not torch.isfinite(images).all():
        raise UserError(f"{path} contains NaN or infinite values")
    return images


def _load_folder(folder: Path, resize, channels, limit) -> Tensor:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        arrays = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".npy", ".npz"))
        hint = f"; it holds arrays: pass one of them, e.g. {folder / arrays[0]}" if arrays else ""
        raise UserError(f"no images found in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}){hint}")
    if limit is not None:
        files = files[:limit]
    return _stack_pil([_open_image(f) for f in files], resize, channels)


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {exc.__class__.__name__}") from None


def _stack_pil(images: list[Image.Image], resize, channels) -> Tensor:
    if channels is None:
        channels = 1 if all(img.mode in ("1", "L", "I", "I;16", "F") for img in images) else 3
    mode = "L" if channels == 1 else "RGB"
    arrays = [np.asarray(img.convert(mode), dtype=np.uint8) for img in images]
    if resize is not None:  # one image at a time (sizes may differ), the same way arrays are resized
        return torch.cat([array_to_images(a[None], resize=resize) for a in arrays])
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        example = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:3])
        raise UserError(f"images have different sizes ({example}); pass --resize N to resize them all")
    return array_to_images(np.stack(arrays))


def _load_array_file(path: Path, resize, channels, limit) -> Tensor:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"cannot read array file {path}: {exc}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            array = _pick_npz_array(loaded, path)
    else:
        array = loaded
    if limit is not None:
        array = array[:limit]
    return array_to_images(array, resize=resize, channels=channels, name=str(path))


def _pick_npz_array(npz, path: Path) -> np.ndarray:
    keys = list(npz.keys())
    for key in ARRAY_KEYS:
        if key in keys:
            return npz[key]
    if len(keys) == 1:
        return npz[keys[0]]
    raise UserError(f"{path} holds arrays {keys}; name the images array one of {', '.join(ARRAY_KEYS)}")


def array_to_images(array: np.ndarray, resize: Optional[int] = None, channels: Optional[int] = None,
                    name: str = "array") -> Tensor:
    """Convert an image array (any supported layout and value range) to (N, C, H, W) in [-1, 1]."""
    array = np.asarray(array)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise UserError(f"{name}: expected a numeric image array, got dtype {array.dtype}")
    nchw = _to_nchw(array, name)
    if nchw.shape[0] == 0:
        raise UserError(f"{name} holds no images")
    if min(nchw.shape[2:]) == 0:
        raise UserError(f"{name}: images have zero size {nchw.shape[2]}x{nchw.shape[3]}")
    values = _to_unit_range(nchw, name)
    images = _to_tensor(values)
    if channels is not None and images.shape[1] != channels:
        images = images.mean(1, keepdim=True) if channels == 1 else images.expand(-1, 3, -1, -1).contiguous()
    if resize is not None and tuple(images.shape[-2:]) != (resize, resize):
        images = resize_images(images, resize)
    return images


def resize_images(images: Tensor, size: int) -> Tensor:
    """Resize (N, C, H, W) to size x size: bilinear with antialiasing, clamped to [-1, 1]."""
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False).clamp(-1, 1)


def _to_nchw(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 3:
        return array[:, None]
    if array.ndim == 4 and array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3):
        return array
    if array.ndim == 4 and array.shape[-1] in (1, 3):
        return array.transpose(0, 3, 1, 2)
    raise UserError(f"{name}: cannot read image layout {array.shape}; use (N,H,W), (N,H,W,C) or (N,C,H,W), C in 1,3")


def _to_unit_range(array: np.ndarray, name: str) -> np.ndarray:
    """Map values to [-1, 1] by the module's value conventions."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 127.5 - 1.0
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are rejected just below
        values = array.astype(np.float32)
    if not np.isfinite(values).all():
        raise UserError(f"{name} contains NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0.0 and hi <= 1.0:
        return values * 2.0 - 1.0
    if lo >= -1.0 and hi <= 1.0:
        return values
    if lo >= 0.0 and hi <= 255.0:
        return values / 127.5 - 1.0
    raise UserError(f"{name}: values span [{lo:g}, {hi:g}]; expected [0, 1], [-1, 1] or [0, 255]")


def _to_tensor(values: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), rounding like clean-fid's quantisation."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


DIGITS_NPZ = Path(__file__).resolve().parents[1] / "examples" / "digits" / "digits.npz"


def digits_dataset(limit: Optional[int] = None) -> np.ndarray:
    """scikit-learn's 8x8 handwritten digits (1,797 real images, shipped offline) as uint8 (N, 8, 8).

    Read from the repository's examples/digits/digits.npz (the same array), so scikit-learn is not a
    dependency; without the repository it comes from scikit-learn, when installed.
    """
    if DIGITS_NPZ.is_file():
        with np.load(DIGITS_NPZ, allow_pickle=False) as npz:
            array = npz["images"]
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise UserError(f"the digits dataset needs {DIGITS_NPZ} (a memaudit checkout) or scikit-learn "
                            "(pip install scikit-learn)") from None
        array = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16
    return array[:limit] if limit is not None else array
