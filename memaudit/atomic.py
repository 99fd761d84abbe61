"""Atomic file and folder writes: write to a temporary sibling, then rename over the target."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Optional

from memaudit.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(path: Path, is_dir: bool) -> None:
    """Give a temp file/folder the permissions a normal open()/mkdir() would (mkstemp uses 0600/0700)."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _reason(exc: OSError) -> str:
    """Why a write failed, in a few words ("disk full" for ENOSPC)."""
    if exc.errno == errno.ENOSPC:
        return "disk full (no space left on device)"
    return exc.strerror or str(exc)


def _make_parent(target: Path) -> Path:
    """Create the folder `target` goes into; UserError naming the culprit when a path component is a file."""
    parent = target.parent if str(target.parent) else Path(".")
    for folder in (parent, *parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"cannot write {target}: {folder} is a file, not a folder")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write {target}: {_reason(exc)}") from None
    return parent


def check_writable(target: str | os.PathLike, folder: bool = False) -> None:
    """Fail early (UserError) when `target` (a file, or a folder with folder=True) clearly cannot be written.

    Checks that no path component is a file, that the kind matches an existing target, and that the nearest
    existing folder is writable. Creates nothing; the write itself may still fail (e.g. disk full).
    """
    target = Path(target)
    if target.exists() and target.is_dir() != folder:
        what = "a folder; give a file name" if target.is_dir() else "a file, not a folder"
        raise UserError(f"cannot write {target}: it is {what}")
    parent = target.parent if str(target.parent) else Path(".")
    for existing in (parent, *parent.parents):
        if existing.exists():
            break
    if not existing.is_dir():
        raise UserError(f"cannot write {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {target}: permission denied in {existing}")


def _resolve_link(target: Path) -> Path:
    """The file a symlink points to (so writing replaces that file and keeps the link), else target itself."""
    return Path(os.path.realpath(target)) if target.is_symlink() else target


def _special_kind(target: Path) -> Optional[str]:
    """'device'/'fifo' for a character device or FIFO (written directly), None for a regular or missing file;
    UserError for kinds that are never written (block devices, sockets)."""
    try:
        mode = target.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISCHR(mode):
        return "device"
    if stat.S_ISFIFO(mode):
        return "fifo"
    raise UserError(f"refusing to write {target}: it is a {'block device' if stat.S_ISBLK(mode) else 'socket'}, "
                    "not a file")


@contextlib.contextmanager
def _direct_write(target: Path) -> Iterator[Path]:
    """Yield a private temporary file; on success copy it into `target` (a device or FIFO, never renamed over)."""
    fd, tmp = tempfile.mkstemp(prefix="memaudit-", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except OSError as exc:
        raise UserError(f"cannot write {target}: {_reason(exc)}") from None
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `target`; on success it is renamed onto `target`.

    On any error the temporary file is removed and `target` is left exactly as it was.  A symlink is followed
    (the file it names is replaced, the link kept); a character device (/dev/null) or a FIFO is written
    directly, never renamed over.
    """
    target = _resolve_link(Path(target))
    if target.is_dir():
        raise UserError(f"cannot write {target}: it is a folder; give a file name")
    if _special_kind(target) is not None:
        with _direct_write(target) as tmp:
            yield tmp
        return
    parent = _make_parent(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
    except OSError as exc:
        raise UserError(f"cannot write {target}: {_reason(exc)}") from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _default_mode(tmp_path, is_dir=False)
        os.replace(tmp_path, target)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise UserError(f"cannot write {target}: {_reason(exc)}") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write `text` to `target` atomically (UTF-8)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` as a whole.

    An existing `target` is moved aside first and deleted only after the new folder is in place.
    """
    target = _resolve_link(Path(target))
    if target.exists() and not target.is_dir():
        raise UserError(f"cannot write the folder {target}: it is a file")
    parent = _make_parent(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise UserError(f"cannot write {target}: {_reason(exc)}") from None
    try:
        yield tmp
        _default_mode(tmp, is_dir=True)
        for child in tmp.rglob("*"):
            _default_mode(child, is_dir=child.is_dir())
        old = None
        if target.exists():
            old = parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:
                os.replace(old, target)  # put the previous folder back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {target}: {_reason(exc)}") from None
    except UserError as exc:  # from a nested atomic write: name the real folder, not the temporary one
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(str(exc).replace(str(tmp), str(target))) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _path_of(value) -> Optional[Path]:
    """The resolved path of a CLI path argument (None for None or a non-path spec such as 'empirical:T=2')."""
    if value is None or (isinstance(value, str) and (value == "empirical" or value.startswith("empirical:"))):
        return None
    return Path(os.path.realpath(Path(value).expanduser()))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_distinct_paths(inputs: Mapping[str, object], outputs: Mapping[str, object]) -> None:
    """UserError when an output would overwrite an input, land inside an input folder, replace a folder holding
    an input, or collide with another output (all paths resolved, symlinks followed)."""
    ins = {name: p for name, p in ((n, _path_of(v)) for n, v in inputs.items()) if p is not None}
    outs = {name: p for name, p in ((n, _path_of(v)) for n, v in outputs.items()) if p is not None}
    for out_name, out in outs.items():
        if _special_kind(out) is not None:
            continue  # /dev/null, a FIFO: written directly, never a file of the inputs
        for in_name, inp in ins.items():
            if _within(out, inp):
                where = "is" if out == inp else "lies inside"
                raise UserError(f"{out_name} {out} {where} {in_name} {inp}; it would overwrite or be read as "
                                f"{in_name.lower()}: write it elsewhere")
            if _within(inp, out):
                raise UserError(f"{out_name} {out} holds {in_name} {inp}, which writing it would delete: "
                                "write it elsewhere")
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if _within(outs[a], outs[b]) or _within(outs[b], outs[a]):
                raise UserError(f"{a} {outs[a]} and {b} {outs[b]} collide: give them separate paths")
