"""Training images from folders (PNG/JPEG, recursive) or .npy/.npz arrays -> float tensors in [-1, 1].

Value ranges are never guessed from a narrow span: uint8 arrays and 8-bit image files are [0, 255], uint16 and
16-bit image files [0, 65535], bool [0, 1]; float arrays are read as [0, 1] when every value lies in it, as
[-1, 1] when they dip below 0 but stay within it, as [0, 255] when their maximum is above 127 and at most 255;
anything else (say floats 0..16) is refused unless `value_range` (CLI: --value-range LO,HI) says what the
extremes mean.  The reading is recorded (Dataset.value_range) so the report can show it.  Layouts: (N, H, W),
(N, H, W, C) and (N, C, H, W) with C in {1, 3}; a lone (H, W, 3|4) image without its N axis is refused, and an
array in either byte order reads as its native-order copy.  Image files over Pillow's decompression-bomb limit
(PIL.Image.MAX_IMAGE_PIXELS) are refused.
Class labels (for class-conditional models) come from a folder's immediate subfolders (sorted names -> 0, 1, ...,
as torchvision's ImageFolder numbers them) or a .npz's integer `labels` array of length N; they are carried in
Dataset.labels, and Dataset.labels_problem says why there are none (only a conditional scan needs them).
"""

from __future__ import annotations

import os
import re
import sys
import threading
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from memaudit import imagecache
from memaudit.errors import SettingError, UserError, first_lines, printable
from memaudit.resources import check_fits
from memaudit.storage import ImageStore, float_budget, keep_as_bytes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
ARRAY_KEYS = ("images", "x", "data", "arr_0")
LABELS_KEY = "labels"
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Memory a dataset of B bytes (float32) takes while a scan runs: the tensor, the neighbour index, and temporaries.
WORKING_COPIES = 3
# Threads that decode a folder's images (Pillow releases the GIL while it decodes); 1 = one by one.
DECODE_WORKERS = min(8, os.cpu_count() or 1)
VALUE_RANGE_FOR_ARRAYS = "--value-range applies to .npy/.npz arrays; image files carry their own bit depth"
PROGRESS_STEPS = 200  # a one-thread load calls its progress callback about this many times, and at the end
BATCH_ITEMS = 256  # images per task of a parallel load (at most; fewer when there are few)
# Held while an image file is opened with Pillow's decompression-bomb warning made an error: warnings filters are
# process-wide, so decoding threads must not change them at the same time.
_OPEN_LOCK = threading.Lock()

Progress = Callable[[int, int], None]  # progress(done, total): images decoded so far, of total


@dataclass
class Dataset:
    """Images (N, C, H, W) in [-1, 1] (a float32 tensor, or an ImageStore of uint8 bytes for an 8-bit set too
    large for float32: memaudit.storage) and how their values were read, e.g. 'uint8 [0, 255]'."""

    data: "Tensor | ImageStore"
    value_range: str
    labels: Optional[Tensor] = None  # (N,) long class ids, or None
    class_names: Optional[list[str]] = None  # name of each class id (folder names; str(id) for .npz labels)
    labels_problem: str = "the data has no class labels (class subfolders, or a 'labels' array in the .npz)"

    @property
    def store(self) -> ImageStore:
        """The images as a store (no copy): what a scan reads."""
        return ImageStore.of(self.data)

    @property
    def images(self) -> Tensor:
        """The images as one float32 tensor (a uint8 store is converted: a copy)."""
        return self.data.float() if isinstance(self.data, ImageStore) else self.data


def parse_value_range(text: Optional[str]) -> Optional[tuple[float, float]]:
    """'LO,HI' -> (lo, hi) with lo < hi finite; None stays None."""
    if text is None:
        return None
    parts = text.replace(" ", "").split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise UserError(f"--value-range must be LO,HI (two numbers, e.g. 0,255), not {text!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise UserError(f"--value-range needs finite LO < HI, not {text!r}")
    return lo, hi


def load_images(path: str | Path, resize: Optional[int] = None, channels: Optional[int] = None,
                limit: Optional[int] = None, value_range: Optional[tuple[float, float]] = None) -> Tensor:
    """load_dataset(...).images: a float32 tensor (N, C, H, W) in [-1, 1]."""
    return load_dataset(path, resize, channels, limit, value_range).images


def load_dataset(path: str | Path, resize: Optional[int] = None, channels: Optional[int] = None,
                 limit: Optional[int] = None, value_range: Optional[tuple[float, float]] = None,
                 progress: Optional[Progress] = None, cache_dir: "str | Path | None" = None,
                 note: Optional[Callable[[str], None]] = None) -> Dataset:
    """Load a dataset; resize: square side to resize every image to (bilinear, antialiased); channels: 1 or 3.
    A folder is decoded by DECODE_WORKERS threads, in file order (progress(done, total) follows it), and its
    pixels cached once under a hash of its files' contents: cache_dir (None: the default, 'off': no cache;
    memaudit.imagecache.cache_dir); note(line) hears why a cache entry was not used or written."""
    path = Path(path)
    if channels not in (None, 1, 3):
        raise SettingError("channels", channels, "1 or 3")
    if resize is not None and resize < 1:
        raise SettingError("resize", resize, "a positive side length")
    if limit is not None and limit < 1:
        raise SettingError("limit", limit, ">= 1")
    if not path.exists():
        raise UserError(f"data not found: {path}")
    if path.is_dir():
        dataset = _load_folder(path, resize, channels, limit, value_range, progress, cache_dir, note)
    elif path.suffix.lower() in (".npy", ".npz"):
        dataset = _load_array_file(path, resize, channels, limit, value_range)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        dataset = _stack_pil([_open_image(path)], resize, channels, value_range)
    else:
        raise UserError(f"unsupported data file {path}: use a folder of images or a .npy/.npz array")
    if not isinstance(dataset.data, ImageStore) and not torch.isfinite(dataset.data).all():
        raise UserError(f"{path} contains NaN or infinite values")  # (uint8 bytes are always finite)
    return dataset


def check_memory(count: int, shape: Sequence[int], name: str, resize: Optional[int], channels: Optional[int]) -> None:
    """UserError before loading when `count` images of `shape` (C, H, W) will not fit in memory during a scan."""
    c, h, w = shape
    if channels is not None:
        c = channels
    if resize is not None:
        h = w = resize
    size = count * c * h * w
    as_bytes = 2 * 4 * size > float_budget() and resize is None and channels is None
    needed = size + float_budget() if as_bytes else WORKING_COPIES * 4.0 * size
    held = "held as uint8, converted chunk by chunk" if as_bytes else "held as float32 with its neighbour index"
    check_fits(needed, f"{name} ({count} images of {c}x{h}x{w}, {held})", "use --limit N to audit a subset")


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _load_folder(folder: Path, resize, channels, limit, value_range, progress: Optional[Progress],
                 cache_dir, note) -> Dataset:
    """The folder's images, from the image cache when it holds them (memaudit.imagecache), else decoded (and
    then cached)."""
    files = image_files(folder)
    if not files:
        arrays = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".npy", ".npz"))
        hint = f"; it holds arrays: pass one of them, e.g. {folder / arrays[0]}" if arrays else ""
        raise UserError(f"no images found in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}){hint}")
    if limit is not None:
        files = files[:limit]
    if value_range is not None:
        raise UserError(VALUE_RANGE_FOR_ARRAYS)
    where = imagecache.cache_dir(cache_dir)
    key = _cache_key(folder, files, resize, channels, limit, value_range) if where is not None else None
    hit, problem = imagecache.load(where, key)
    if problem:
        _say(note, f"note: ignoring the image cache entry {where / key}: {problem}; decoding {folder} afresh")
    if hit is not None:
        pixels, meta = hit
        shape = pixels.shape[1:] if meta["kind"] == "float" else (pixels.shape[3], *pixels.shape[1:3])
        check_memory(len(pixels), shape, str(folder), resize, channels)
        if progress is not None:
            progress(len(files), len(files))
    else:
        pixels, kind, reading = _decode_folder(folder, files, resize, channels, value_range, progress)
        meta = {"kind": kind, "reading": reading}
        problem = imagecache.store(where, key, pixels, kind, reading)
        if problem:
            _say(note, f"warning: image cache not written ({problem}); {folder} will be decoded again next time")
    return with_labels(pixels_dataset(pixels, meta["kind"], meta["reading"]), *folder_labels(folder, files))


def _decode_folder(folder: Path, files: list[Path], resize, channels, value_range,
                   progress: Optional[Progress]) -> tuple[np.ndarray, str, str]:
    """_pil_pixels of the files, decoded on DECODE_WORKERS threads after a memory check on the first."""
    first = _open_image(files[0])
    check_memory(len(files), (len(first.getbands()), first.height, first.width), str(folder), resize, channels)
    images = [first] + ordered_map(_open_image, files[1:], progress, done=1, total=len(files))
    return _pil_pixels(images, resize, channels, value_range)


def _cache_key(folder: Path, files: list[Path], resize, channels, limit, value_range) -> Optional[str]:
    """The image cache key of the folder's files with these load options (file hashes on DECODE_WORKERS
    threads: hashlib releases the GIL), or None when a file cannot be read."""
    import PIL

    options = {"resize": resize, "channels": channels, "limit": limit, "value_range": value_range,
               "pillow": PIL.__version__, "torch": torch.__version__.split("+")[0]}
    return imagecache.content_key(folder, files, ordered_map(imagecache.file_digest, files), options)


def _say(note: Optional[Callable[[str], None]], line: str) -> None:
    """Give a line to `note`, or print it as one plain line on stderr when there is none (as --quiet gives)."""
    if note is not None:
        note(line)
    else:
        print(printable(line), file=sys.stderr, flush=True)


def ordered_map(fn: Callable, items: Sequence, progress: Optional[Progress] = None, done: int = 0,
                total: Optional[int] = None) -> list:
    """[fn(x) for x in items] on DECODE_WORKERS threads, results in item order; the first error in item order
    is raised (as a serial loop would) and the work not started is cancelled.  Items go to the threads in
    batches (a task per item costs more than decoding a small PNG); progress(done + i, total) is called after
    each batch, in order, and after the last item."""
    total = done + len(items) if total is None else total
    workers = min(DECODE_WORKERS, len(items))
    if progress is not None and not items:
        progress(done, total)
    if workers <= 1:
        return _serial_map(fn, items, progress, done, total)
    step = min(BATCH_ITEMS, max(1, len(items) // (4 * workers)))
    batches = [items[i:i + step] for i in range(0, len(items), step)]
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="memaudit-load")
    try:
        pending = [pool.submit(lambda batch: [fn(x) for x in batch], batch) for batch in batches]
        results = []
        for future in pending:
            results.extend(future.result())
            if progress is not None:
                progress(done + len(results), total)
        return results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _serial_map(fn: Callable, items: Sequence, progress: Optional[Progress], done: int, total: int) -> list:
    """ordered_map on the calling thread (progress about PROGRESS_STEPS times)."""
    every, results = max(1, total // PROGRESS_STEPS), []
    for i, x in enumerate(items):
        results.append(fn(x))
        if progress is not None and ((done + i + 1) % every == 0 or i + 1 == len(items)):
            progress(done + i + 1, total)
    return results


def with_labels(dataset: Dataset, labels: Optional[Tensor], names: Optional[list[str]], problem: str) -> Dataset:
    """The dataset with its class labels (or the reason it has none)."""
    dataset.labels, dataset.class_names = labels, names
    if problem:
        dataset.labels_problem = problem
    return dataset


def folder_labels(folder: Path, files: list[Path]) -> tuple[Optional[Tensor], Optional[list[str]], str]:
    """(labels, class names, problem): each file's class is its immediate subfolder of `folder`, classes
    numbered in sorted name order; no labels when every image lies in the folder itself or some do."""
    parts = [f.relative_to(folder).parts for f in files]
    loose = [f for f, p in zip(files, parts) if len(p) == 1]
    if len(loose) == len(files):
        return None, None, ""
    if loose:
        return None, None, (f"{folder} mixes class subfolders with images directly in it (e.g. {loose[0].name}): "
                            "for class labels put every image in its class's subfolder")
    names = sorted({p[0] for p in parts})
    ids = {name: i for i, name in enumerate(names)}
    return torch.tensor([ids[p[0]] for p in parts], dtype=torch.long), names, ""


def _open_image(path: Path) -> Image.Image:
    """The decoded image file; a UserError when it cannot be read or has more pixels than Pillow's
    decompression-bomb limit (Image.MAX_IMAGE_PIXELS: above it Pillow warns, above twice it refuses)."""
    try:
        with _open_checked(path) as img:
            img.load()
            return img.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(_bomb_message(path, exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {first_lines(exc, with_type=True)}") from None


def _open_checked(path: Path) -> Image.Image:
    """Image.open(path) (reads the header only) with a DecompressionBombWarning raised as an error."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(path)


def _bomb_message(path: Path, exc: Exception) -> str:
    """The one-line error for an image over Pillow's decompression-bomb limit: its pixel count and why."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1)):,} pixels" if found else first_lines(exc)
    return (f"cannot read image {path}: it has {size}, over Pillow's decompression-bomb limit of "
            f"{Image.MAX_IMAGE_PIXELS:,} pixels (PIL.Image.MAX_IMAGE_PIXELS, a guard against files that decode "
            "to exhaust memory); downscale the file")


def _pil_array(img: Image.Image, channels: int) -> np.ndarray:
    """An image as uint8 (H, W, C), or as float32 in [0, 1] for 16-bit and float modes (scaled, never clipped)."""
    if img.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise UserError(f"a {img.mode} image holds values outside [0, 65535]")
        gray = (values / 65535.0).astype(np.float32)[..., None]
        return gray if channels == 1 else np.repeat(gray, 3, axis=2)
    if img.mode == "F":
        gray = np.asarray(img, dtype=np.float32)
        if gray.min() < 0 or gray.max() > 1:
            raise UserError(f"a floating-point (mode F) image holds values outside [0, 1]; convert it to 8 or 16 bits")
        gray = gray[..., None]
        return gray if channels == 1 else np.repeat(gray, 3, axis=2)
    arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _stack_pil(images: list[Image.Image], resize, channels, value_range) -> Dataset:
    return pixels_dataset(*_pil_pixels(images, resize, channels, value_range))


def _pil_pixels(images: list[Image.Image], resize, channels, value_range) -> tuple[np.ndarray, str, str]:
    """(pixels, kind, reading): kind "bytes" = uint8 (N, H, W, C) of 8-bit images at their own size, "float" =
    the float32 (N, C, H, W) values in [-1, 1] of resized or 16-bit images (memaudit.imagecache caches both)."""
    if value_range is not None:
        raise UserError(VALUE_RANGE_FOR_ARRAYS)
    if channels is None:
        channels = 1 if all(img.mode in ("1", "L", "F") + SIXTEEN_BIT_MODES for img in images) else 3
    arrays = [_pil_array(img, channels) for img in images]
    wide = any(a.dtype != np.uint8 for a in arrays)
    if wide:
        arrays = [a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a for a in arrays]
    reading = "16-bit images [0, 65535] and 8-bit [0, 255]" if wide else "8-bit images [0, 255]"
    unit = (0.0, 1.0) if wide else None
    if resize is not None:  # one image at a time (sizes may differ), the same way arrays are resized
        return torch.cat([array_to_images(a[None], resize=resize, value_range=unit) for a in arrays]).numpy(), \
            "float", reading
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        example = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:3])
        raise UserError(f"images have different sizes ({example}); pass --resize N to resize them all")
    if wide:
        return array_to_images(np.stack(arrays), value_range=unit).numpy(), "float", reading
    return np.stack(arrays), "bytes", reading


def pixels_dataset(pixels: np.ndarray, kind: str, reading: str) -> Dataset:
    """The Dataset of _pil_pixels' output (or a cached copy of it): 8-bit bytes as a float32 tensor, or as a
    uint8 ImageStore over them when their float32 copy exceeds the float budget (memaudit.storage)."""
    if kind == "float":
        return Dataset(torch.from_numpy(pixels), reading)
    dataset = array_to_dataset(pixels)
    dataset.value_range = reading
    return dataset


def _check_magic(path: Path) -> None:
    """UserError naming what the file is when it does not start like a .npy / .npz file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise UserError(f"cannot read array file {path}: {exc.strerror or exc}") from None
    if head.startswith(NPY_MAGIC) or head.startswith(ZIP_MAGIC):
        return
    kind = "it is empty" if not head else ("it looks like text" if all(32 <= b < 127 or b in (9, 10, 13)
                                                                       for b in head) else "unknown format")
    expected = "NumPy's .npy header" if path.suffix.lower() == ".npy" else "a zip archive (.npz)"
    raise UserError(f"{path} is not a NumPy array file: it does not start with {expected} ({kind})")


def _array_header(path: Path) -> Optional[tuple[int, ...]]:
    """The array's shape from its file header (no data read), or None if it cannot be told."""
    try:
        if path.suffix.lower() == ".npy":
            return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(".npy")]
            keys = [n[:-4] for n in names if n[:-4] != LABELS_KEY]
            key = next((k for k in ARRAY_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                return None
            with archive.open(key + ".npy") as fh:
                version = np.lib.format.read_magic(fh)
                read = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
                shape, _, _ = read(fh)
                return tuple(shape)
    except Exception:  # noqa: BLE001 - the full read below reports what is wrong
        return None


def _load_array_file(path: Path, resize, channels, limit, value_range) -> Dataset:
    _check_magic(path)
    shape = _array_header(path)
    if shape is not None and len(shape) in (3, 4) and shape[0] > 0:
        count = min(shape[0], limit) if limit is not None else shape[0]
        layout = (1, *shape[1:]) if len(shape) == 3 else (shape[1:] if shape[1] in (1, 3) else
                                                           (shape[3], shape[1], shape[2]))
        check_memory(count, layout, str(path), resize, channels)
    labels = None
    try:  # a .npy is memory-mapped: an 8-bit set too large for float32 stays on disk until read
        loaded = np.load(path, allow_pickle=False, mmap_mode="r" if path.suffix.lower() == ".npy" else None)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                array = _pick_npz_array(loaded, path)
                labels = loaded[LABELS_KEY] if LABELS_KEY in loaded.files else None
        else:
            array = loaded
    except UserError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, zlib.error, EOFError, KeyError) as exc:
        reason = first_lines(exc, with_type=True)
        if any(word in reason.lower() for word in ("pickle", "object arrays", "python objects")):
            reason = "it holds Python objects (an object array), not numbers"
        raise UserError(f"cannot read array file {path}: {reason}") from None
    found = npz_labels(labels, len(array), path)
    if limit is not None:
        array = array[:limit]
        found = (found[0][:limit] if found[0] is not None else None, *found[1:])
    dataset = array_to_dataset(array, resize=resize, channels=channels, name=str(path), value_range=value_range)
    return with_labels(dataset, *found)


def npz_labels(labels: Optional[np.ndarray], count: int,
               path: Path) -> tuple[Optional[Tensor], Optional[list[str]], str]:
    """(labels, class names, problem) of a .npz's `labels` array: integers >= 0, one per image; ids are kept as
    they are (a model's class ids), named by their number."""
    if labels is None:
        return None, None, ""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != count:
        return None, None, (f"{path}: its labels array has shape {labels.shape}; it needs one label per image "
                            f"({count},)")
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.bool_)) or \
            (len(labels) and labels.min() < 0):
        return None, None, f"{path}: its labels must be integers >= 0 (class ids), not {labels.dtype} values"
    ids = torch.from_numpy(labels.astype(np.int64))
    return ids, [str(i) for i in range(int(ids.max()) + 1 if len(ids) else 0)], ""


def _pick_npz_array(npz, path: Path) -> np.ndarray:
    keys = [k for k in npz.keys() if k != LABELS_KEY]
    for key in ARRAY_KEYS:
        if key in keys:
            return npz[key]
    if len(keys) == 1:
        return npz[keys[0]]
    raise UserError(f"{path} holds arrays {keys}; name the images array one of {', '.join(ARRAY_KEYS)}")


def array_to_images(array: np.ndarray, resize: Optional[int] = None, channels: Optional[int] = None,
                    name: str = "array", value_range: Optional[tuple[float, float]] = None) -> Tensor:
    """Convert an image array (any supported layout and value range) to (N, C, H, W) in [-1, 1]."""
    return array_to_dataset(array, resize, channels, name, value_range).images


def array_to_dataset(array: np.ndarray, resize: Optional[int] = None, channels: Optional[int] = None,
                     name: str = "array", value_range: Optional[tuple[float, float]] = None) -> Dataset:
    """array_to_images, with the value range the array was read in."""
    array = np.asarray(array)
    if np.iscomplexobj(array):
        raise UserError(f"{name}: expected real image values, got a complex array ({array.dtype})")
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise UserError(f"{name}: expected a numeric image array, got dtype {array.dtype}")
    array = _native_byte_order(array)
    nchw = _to_nchw(array, name)
    if nchw.shape[0] == 0:
        raise UserError(f"{name} holds no images")
    if min(nchw.shape[2:]) == 0:
        raise UserError(f"{name}: images have zero size {nchw.shape[2]}x{nchw.shape[3]}")
    if value_range is None and channels in (None, nchw.shape[1]) and resize in (None, *(
            [nchw.shape[2]] if nchw.shape[2] == nchw.shape[3] else [])) and keep_as_bytes(nchw, nchw.shape):
        return Dataset(ImageStore(_byte_tensor(nchw)), "uint8 [0, 255]")
    values, reading = _to_unit_range(nchw, name, value_range)
    images = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    if channels is not None and images.shape[1] != channels:
        images = images.mean(1, keepdim=True) if channels == 1 else images.expand(-1, 3, -1, -1).contiguous()
    if resize is not None and tuple(images.shape[-2:]) != (resize, resize):
        images = resize_images(images, resize)
    return Dataset(images, reading)


def _byte_tensor(nchw: np.ndarray) -> Tensor:
    """A uint8 (N, C, H, W) tensor over the array's memory (a view: a memory-mapped .npy stays mapped)."""
    import warnings

    with warnings.catch_warnings():  # a read-only memory map: memaudit never writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(nchw)


def resize_images(images: Tensor, size: int) -> Tensor:
    """Resize (N, C, H, W) to size x size: bilinear with antialiasing, clamped to [-1, 1]."""
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False).clamp(-1, 1)


def _native_byte_order(array: np.ndarray) -> np.ndarray:
    """The array in the machine's byte order (a converted copy of a big-endian '>u2', '>f4', ... on a
    little-endian machine), so it is read exactly as its native copy: by dtype, value range and description."""
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _to_nchw(array: np.ndarray, name: str) -> np.ndarray:
    """The array as (N, C, H, W): from (N, H, W), (N, H, W, C) or (N, C, H, W), C in {1, 3}."""
    if array.ndim == 3:
        _refuse_one_hwc_image(array, name)
        return array[:, None]
    if array.ndim == 4 and array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3):
        return array
    if array.ndim == 4 and array.shape[-1] in (1, 3):
        return array.transpose(0, 3, 1, 2)
    raise UserError(f"{name}: cannot read image layout {array.shape}; use (N,H,W), (N,H,W,C) or (N,C,H,W), C in 1,3")


def _refuse_one_hwc_image(array: np.ndarray, name: str) -> None:
    """UserError for a 3-D array that looks like one (H, W, C) image saved without its image axis: a last axis of
    3 or 4 that differs from the one before it (N grayscale images of width 3 or 4 that are not square are not
    plausible; tiny square ones, e.g. (N, 4, 4), are read as (N, H, W))."""
    h, w, c = array.shape
    if c not in (3, 4) or w == c:
        return
    fix = "a[None]" if c == 3 else "a[None, ..., :3] (dropping the alpha channel)"
    raise UserError(f"{name}: shape {array.shape} looks like one (H, W, C) image, not {h} grayscale images of "
                    f"{w}x{c}; save it with a leading image axis, {fix}, as (1, {h}, {w}, 3)")


def _rescale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(values - lo) / (hi - lo) * 2 - 1 in float32, in place where possible."""
    out = values.astype(np.float32) if values.dtype != np.float32 else values.copy()
    out -= np.float32(lo)
    out *= np.float32(2.0 / (hi - lo))
    out -= np.float32(1.0)
    return out


def _to_unit_range(array: np.ndarray, name: str, value_range: Optional[tuple[float, float]]) -> tuple[np.ndarray, str]:
    """Map values to [-1, 1] by the module's value conventions; returns the values and how they were read."""
    if value_range is not None:
        lo, hi = value_range
        vmin, vmax = float(array.min()), float(array.max())
        if not (np.isfinite(vmin) and np.isfinite(vmax)):
            raise UserError(f"{name} contains NaN or infinite values")
        if vmin < lo or vmax > hi:
            raise UserError(f"{name}: values span [{vmin:g}, {vmax:g}], outside --value-range {lo:g},{hi:g}")
        return _rescale(array, lo, hi), f"{array.dtype} [{lo:g}, {hi:g}] (--value-range)"
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 127.5 - 1.0, "uint8 [0, 255]"
    if array.dtype == np.uint16:
        return _rescale(array, 0.0, 65535.0), "uint16 [0, 65535]"
    if array.dtype == bool:
        return _rescale(array.astype(np.float32), 0.0, 1.0), "bool [0, 1]"
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are rejected just below
        values = array.astype(np.float32)
    if not np.isfinite(values).all():
        raise UserError(f"{name} contains NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    integer = np.issubdtype(array.dtype, np.integer)
    if not integer and lo >= 0.0 and hi <= 1.0:
        return _rescale(values, 0.0, 1.0), f"{array.dtype} [0, 1]"
    if not integer and lo >= -1.0 and hi <= 1.0:
        return values, f"{array.dtype} [-1, 1]"
    if lo >= 0.0 and 127.0 < hi <= 255.0:
        return _rescale(values, 0.0, 255.0), f"{array.dtype} [0, 255]"
    known = ("integers are read as [0, 255] only when their maximum is above 127" if integer
             else "which is not [0, 1], [-1, 1] or [0, 255]")
    raise UserError(f"{name}: {array.dtype} values span [{lo:g}, {hi:g}], {known}; say what the extremes mean "
                    f"with --value-range LO,HI (e.g. --value-range 0,{hi:g})")


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), rounding like clean-fid's quantisation."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()
