"""Safe reading of torch pickle files: tensors and plain containers only, unless the user trusts the file.

torch.load(weights_only=True) unpickles only tensors, numbers, strings and containers; any other global
(a class, os.system, ...) is refused before it is called. A full pickle (arbitrary objects, nn.Module)
is unpickled only with an explicit trust_pickle=True (CLI: --trust-pickle), since unpickling runs code; a trusted
file that is not a torch.save archive is read as a plain pickle (EDM's network snapshots).
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from memaudit.errors import UserError


def safe_torch_load(path: str | Path, *, trust_pickle: bool = False, map_location: str = "cpu") -> Any:
    """torch.load(path) with weights_only=True, or a full unpickle only if trust_pickle; UserError on failure."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location=map_location, weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if trust_pickle:
            return _plain_pickle(path, exc)
        raise UserError(
            f"{path}: refused to unpickle it: it holds Python objects beyond tensors ({_reason(exc)}); "
            "unpickling can run arbitrary code, so pass --trust-pickle only if you trust its source"
        ) from None
    except FileNotFoundError:
        raise UserError(f"model file not found: {path}") from None
    except Exception as exc:  # torch raises RuntimeError, KeyError, EOFError, ... on non-torch files
        if trust_pickle:
            return _plain_pickle(path, exc)
        plain = "magic number" in str(exc) and _starts_like_pickle(path)
        raise UserError(f"{path}: not a readable torch checkpoint ({_reason(exc)})" + (
            "; it is a plain pickle, which can run arbitrary code: pass --trust-pickle only if you trust its source"
            if plain else "")) from None


def torch_pickle_bytes(path: str | Path) -> bytes:
    """The raw pickle of a torch.save zip archive (its data.pkl), not unpickled, so a format can be detected from
    the names it holds; b"" for anything that is not such an archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            return archive.read(names[0]) if names else b""
    except (OSError, zipfile.BadZipFile, KeyError):
        return b""


def _starts_like_pickle(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _plain_pickle(path: Path, torch_error: BaseException) -> Any:
    """A trusted file that torch.load cannot read may be a plain pickle (EDM's network-snapshot-*.pkl)."""
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except Exception as exc:  # the file's own code runs here: any failure is reported on one line
        raise UserError(f"{path}: cannot unpickle: {_reason(torch_error)}; as a plain pickle: {_reason(exc)}"
                        ) from None


def _reason(exc: BaseException) -> str:
    """The most informative single line of an exception message (torch's refusals span many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line.rstrip(".")
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}"[:300].rstrip(": ")
