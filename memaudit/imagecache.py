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

Threat: whoever can write the cache folder (a CI cache restored from another branch or a fork's pull request)
could put other pixels in <key>.npy and their sha256 in the sidecar, and the scan would audit the wrong
training set (a memorizing model passes the gate).  So each sidecar carries an HMAC-SHA256 (`mac`) over its
fields (version, key, kind, dtype, shape, sha256, reading) under a secret kept out of the cache:
$MEMAUDIT_CACHE_SECRET when set (a CI keeps it in its secret store), else 32 random bytes in
$XDG_CONFIG_HOME (or ~/.config)/memaudit/cache.key, created 0600 (folder 0700) on first use.  A missing or
wrong MAC (tampered, or written under another secret) is a miss; no usable secret means no cache for that
load (a note says why), never a load from an unauthenticated entry.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from memaudit.atomic import atomic_path
from memaudit.errors import UserError, first_lines

CACHE_VERSION = 2  # 2: sidecars carry an HMAC (version 1 entries, without one, are never read)
KINDS = {"bytes": np.uint8, "float": np.float32}
OFF = ("off", "none", "0", "false", "no")
READ_BYTES = 1 << 20
DIGEST_BYTES = 16 << 20
SECRET_ENV = "MEMAUDIT_CACHE_SECRET"
KEY_BYTES = 32
MAC_FIELDS = ("version", "key", "kind", "dtype", "shape", "sha256", "reading")
MAC_CONTEXT = b"memaudit image cache entry\n"


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


def key_file() -> Path:
    """The per-user cache secret: $XDG_CONFIG_HOME (or ~/.config)/memaudit/cache.key."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser() / "memaudit" / "cache.key"


def cache_secret(directory: Optional[Path] = None) -> tuple[Optional[bytes], str]:
    """(the secret that authenticates cache entries, "") or (None, why there is none: caching is then off).

    $MEMAUDIT_CACHE_SECRET when set and non-empty, else the bytes of key_file(), created (32 random bytes, mode
    0600, its folder 0700) when it does not exist.  A key file inside the cache folder `directory` is refused:
    whoever writes the cache could then write the key too."""
    shared = os.environ.get(SECRET_ENV)
    if shared:
        return shared.encode("utf-8", "surrogateescape"), ""
    try:
        path = key_file()
    except (RuntimeError, KeyError) as exc:  # no home folder to find ~/.config in
        return None, f"no cache secret: set {SECRET_ENV} or XDG_CONFIG_HOME ({first_lines(exc)})"
    if directory is not None and _within(path, directory):
        return None, (f"no cache secret: the key file {path} lies inside the cache folder {directory} "
                      f"(set {SECRET_ENV} or XDG_CONFIG_HOME)")
    try:
        secret = _read_key(path)
        if secret is None:
            secret = _create_key(path)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        return None, f"no cache secret: cannot read or create {path}: {exc.strerror or first_lines(exc)}{where}"
    if len(secret) != KEY_BYTES:
        return None, (f"no cache secret: {path} holds {len(secret)} bytes, not a {KEY_BYTES}-byte key "
                      "(delete it to make a new one)")
    return secret, ""


def _within(inner: Path, outer: Path) -> bool:
    inner, outer = Path(os.path.realpath(inner)), Path(os.path.realpath(outer))
    return inner == outer or outer in inner.parents


def _read_key(path: Path) -> Optional[bytes]:
    """The key file's bytes (at most KEY_BYTES + 1 are read), or None when it does not exist."""
    try:
        with open(path, "rb") as fh:
            return fh.read(KEY_BYTES + 1)
    except FileNotFoundError:
        return None


def _create_key(path: Path) -> bytes:
    """Create the key file atomically (written in full to a private temporary file, then linked into place, so
    no reader sees a partial key); when another process created it first, its key is the one used."""
    folder = path.parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
        os.chmod(folder, 0o700)  # whatever the umask
    except FileExistsError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(os.urandom(KEY_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # never replaces a key another process created meanwhile
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            os.replace(tmp, path)  # a file system without hard links
    finally:
        Path(tmp).unlink(missing_ok=True)
    secret = _read_key(path)
    if secret is None:
        raise OSError(errno.ENOENT, "the key file vanished as it was created", str(path))
    return secret


def entry_mac(secret: bytes, meta: dict) -> str:
    """HMAC-SHA256 hex of a sidecar's MAC_FIELDS (canonical JSON) under `secret`."""
    fields = json.dumps({name: meta.get(name) for name in MAC_FIELDS}, sort_keys=True, separators=(",", ":"),
                        ensure_ascii=True)
    return hmac.new(secret, MAC_CONTEXT + fields.encode("ascii"), hashlib.sha256).hexdigest()


def _authentic(secret: bytes, meta: dict) -> bool:
    """Whether the sidecar's `mac` is entry_mac of its fields (compared in constant time)."""
    mac = meta.get("mac")
    if not isinstance(mac, str):
        return False
    return hmac.compare_digest(mac.encode("utf-8", "backslashreplace"), entry_mac(secret, meta).encode("ascii"))


def _paths(directory: Path, key: str) -> tuple[Path, Path]:
    return directory / f"{key}.npy", directory / f"{key}.json"


def load(directory: Optional[Path], key: Optional[str]) -> tuple[Optional[tuple[np.ndarray, dict]], str]:
    """((pixels, sidecar), "") for a valid, authenticated entry (bytes memory-mapped, float read into memory),
    else (None, why it was not used: "" for no entry)."""
    if directory is None or key is None:
        return None, ""
    npy, meta_path = _paths(directory, key)
    if not meta_path.exists():
        return None, ""
    secret, problem = cache_secret(directory)
    if secret is None:
        return None, problem
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION or meta.get("key") != key:
            return None, "its sidecar is not this entry's"
        if not _authentic(secret, meta):
            return None, ("its sidecar's MAC does not verify (tampered with, or written under another cache "
                          "secret)")
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
    """Write the entry (the .npy, then its authenticated sidecar, each atomically); "" on success or when
    caching is off, else why it could not be written (the load goes on without it)."""
    if directory is None or key is None:
        return ""
    secret, problem = cache_secret(directory)
    if secret is None:
        return problem
    npy, meta_path = _paths(directory, key)
    meta = {"version": CACHE_VERSION, "key": key, "kind": kind, "dtype": str(pixels.dtype),
            "shape": list(pixels.shape), "sha256": array_digest(pixels), "reading": reading}
    meta["mac"] = entry_mac(secret, meta)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with atomic_path(npy) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(pixels), allow_pickle=False)
        with atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps(meta), encoding="utf-8")
    except (OSError, UserError) as exc:
        return str(exc) if isinstance(exc, UserError) else f"cannot write {directory}: {exc.strerror or exc}"
    return ""
