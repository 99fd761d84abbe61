"""A decoded image folder, cached once on disk under a hash of its files' contents (memaudit.data uses it).

Layout: <cache dir>/<key>.npy (the pixels) and <key>.json (a sidecar); the cache folder is created mode 0700.
key = sha256 over CACHE_VERSION, the load options that shape the pixels (resize, channels, value range, limit,
and the Pillow / torch versions that decode and resize them) and, for every file in load order, its path
relative to the folder, its size and the sha256 of its bytes: any edited, added, removed or renamed file, or
another option, gives another key.  An entry holds the pixels in one of two kinds:

- "bytes": uint8 (N, H, W, C), 8-bit images at their own size (the common case; read back memory-mapped);
- "float": float32 (N, C, H, W) in [-1, 1], what a resized or 16-bit folder loads as (a uint8 copy of those
  values would not be the same dataset).

Nothing read back is trusted: the sidecar must parse, name this version and key, and record the .npy's shape,
dtype and sha256; the .npy must load without pickles and match all three.  Anything else is a miss (the folder
is decoded afresh and the entry rewritten).  Both files are written atomically, the .npy first, so an
interrupted write leaves at most a .npy without a sidecar, which is never used.  A cache folder that cannot be
written costs the cache, never the load.  Entries are not evicted: delete the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from memaudit.atomic import atomic_path
from memaudit.errors import UserError, first_lines

CACHE_VERSION = 1
KINDS = {"bytes": np.uint8, "float": np.float32}
OFF = ("off", "none", "0", "false", "no")
READ_BYTES = 1 << 20
DIGEST_BYTES = 16 << 20


def cache_dir(setting: "str | os.PathLike | None" = None) -> Optional[Path]:
    """The image cache folder, or None when caching is off: `setting` (--cache-dir), else MEMAUDIT_IMAGE_CACHE,
    else $MEMAUDIT_CACHE/images, else $XDG_CACHE_HOME (or ~/.cache)/memaudit/images; 'off' at any of these
    (MEMAUDIT_CACHE=off included) turns it off."""
    for value in (setting, os.environ.get("MEMAUDIT_IMAGE_CACHE")):
        if value is not None and str(value) != "":
            return None if str(value).strip().lower() in OFF else Path(value).expanduser()
    shared = os.environ.get("MEMAUDIT_CACHE")
    if shared:
        return None if shared.strip().lower() in OFF else Path(shared).expanduser() / "images"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "memaudit" / "images"


def file_digest(path: Path) -> Optional[tuple[int, str]]:
    """(size, sha256 hex) of a file's bytes, or None when it cannot be read (the decoder then says why)."""
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as fh:
            while block := fh.read(READ_BYTES):
                digest.update(block)
                size += len(block)
    except OSError:
        return None
    return size, digest.hexdigest()


def content_key(folder: Path, files: Sequence[Path], digests: Sequence[Optional[tuple[int, str]]],
                options: dict) -> Optional[str]:
    """The entry's key (sha256 hex) for `files` of `folder` with their file_digest()s, or None (no caching)
    when some file could not be read."""
    if any(d is None for d in digests):
        return None
    key = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "options": options}, sort_keys=True).encode())
    for path, (size, sha) in zip(files, digests):
        key.update(json.dumps([path.relative_to(folder).as_posix(), size, sha]).encode() + b"\n")
    return key.hexdigest()


def array_digest(array: np.ndarray) -> str:
    """sha256 hex of an array's bytes in C order, read in 16 MiB blocks (a memory map is paged, not copied)."""
    flat, digest = array.reshape(-1), hashlib.sha256()
    step = max(1, DIGEST_BYTES // max(1, array.itemsize))
    for start in range(0, flat.size, step):
        digest.update(np.ascontiguousarray(flat[start:start + step]).view(np.uint8))
    return digest.hexdigest()


def _paths(directory: Path, key: str) -> tuple[Path, Path]:
    return directory / f"{key}.npy", directory / f"{key}.json"


def load(directory: Optional[Path], key: Optional[str]) -> tuple[Optional[tuple[np.ndarray, dict]], str]:
    """((pixels, sidecar), "") for a valid entry (bytes memory-mapped, float read into memory), else
    (None, why it was not used: "" for no entry)."""
    if directory is None or key is None:
        return None, ""
    npy, meta_path = _paths(directory, key)
    if not meta_path.exists():
        return None, ""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        pixels = np.load(npy, allow_pickle=False, mmap_mode="r")
        problem = _inconsistency(meta, key, pixels)
    except Exception as exc:  # noqa: BLE001 - a damaged entry of any kind is a miss, never a crash
        return None, first_lines(exc, with_type=True)
    if problem:
        return None, problem
    return (pixels if meta["kind"] == "bytes" else np.array(pixels), meta), ""


def _inconsistency(meta, key: str, pixels: np.ndarray) -> str:
    """What makes an entry unusable ("" when nothing does)."""
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION or meta.get("key") != key:
        return "its sidecar is not this entry's"
    kind = meta.get("kind")
    if kind not in KINDS or pixels.dtype != KINDS[kind] or str(pixels.dtype) != meta.get("dtype"):
        return f"it holds {pixels.dtype}, not what its sidecar records"
    if pixels.ndim != 4 or list(pixels.shape) != meta.get("shape") or not isinstance(meta.get("reading"), str):
        return f"its shape {pixels.shape} is not what its sidecar records"
    if array_digest(pixels) != meta.get("sha256"):
        return "its pixels do not match their recorded sha256"
    return ""


def store(directory: Optional[Path], key: Optional[str], pixels: np.ndarray, kind: str, reading: str) -> str:
    """Write the entry (the .npy, then its sidecar, each atomically); "" on success or when caching is off,
    else why it could not be written (the load goes on without it)."""
    if directory is None or key is None:
        return ""
    npy, meta_path = _paths(directory, key)
    meta = {"version": CACHE_VERSION, "key": key, "kind": kind, "dtype": str(pixels.dtype),
            "shape": list(pixels.shape), "sha256": array_digest(pixels), "reading": reading}
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with atomic_path(npy) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(pixels), allow_pickle=False)
        with atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps(meta), encoding="utf-8")
    except (OSError, UserError) as exc:
        return str(exc) if isinstance(exc, UserError) else f"cannot write {directory}: {exc.strerror or exc}"
    return ""
