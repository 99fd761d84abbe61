"""TorchScript checkpoints: a scripted/traced network net(x_in, noise_in) saved with torch.jit.save.

A TorchScript archive holds TorchScript code (a restricted language, not arbitrary Python) and tensors;
torch.jit.load reads its pickles with TorchScript's own restricted unpickler. The file does not say how
the network was trained, so the user names its parameterisation (--param) and schedule (--schedule).
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

from memaudit.errors import UserError, first_lines

NATIVE_FILE = "network.pt"


def is_torchscript(path: str | Path) -> bool:
    """True if the file is a zip archive with TorchScript's code/ folder or constants.pkl."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.count("/") >= 1 and (n.split("/")[1] in ("code", "constants.pkl")) for n in names)


class TorchScriptNet(nn.Module):
    """nn.Module shell around a loaded ScriptModule, carrying the archive bytes for native saving."""

    def __init__(self, module: torch.jit.ScriptModule, data: bytes, file: str = NATIVE_FILE):
        super().__init__()
        self.module = module
        self.architecture = {"name": "torchscript", "kwargs": {"file": file}}
        self.native_files = {file: data}

    def forward(self, x_in: Tensor, noise_in: Tensor) -> Tensor:
        return self.module(x_in, noise_in)


def load_torchscript(path: str | Path, device: str | torch.device = "cpu", file: str = NATIVE_FILE
                     ) -> TorchScriptNet:
    """torch.jit.load the archive onto `device`; `file` is its name inside a native checkpoint."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; loading still works
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # torch raises RuntimeError/ValueError with multi-line messages
        raise UserError(f"{path}: not a loadable TorchScript file ({first_lines(exc)})") from None
    return TorchScriptNet(module, data, file)


def network_from_native(kwargs: dict, folder: Path) -> TorchScriptNet:
    """Native ARCHITECTURES builder: the archive named in kwargs["file"], a plain file inside the folder."""
    name = kwargs.get("file", NATIVE_FILE)
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise UserError(f"{folder}: torchscript architecture names a bad file {name!r}")
    return load_torchscript(folder / name, file=name)
