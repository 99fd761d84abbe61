"""The training set's latents z_i = s (E(x_i) - b), encoded once and cached for later scans.

Cache file: <root>/latents/latents-<key>.safetensors, key = sha256 of the data fingerprint, the autoencoder's
weights fingerprint, its scaling/shift factors, its kind and the device (memaudit.fingerprints); written atomically
(memaudit.atomic), read without unpickling (safetensors), and trusted only when its recorded key, row count and
values (finite) check out; otherwise the training set is encoded again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from memaudit.atomic import atomic_path
from memaudit.fingerprints import data_fingerprint, model_fingerprint

CACHE_DIR = "latents"


@dataclass
class EncodedTrain:
    """The training latents (CPU), whether they came from the cache, and where the cache file is."""

    latents: Tensor
    reused: bool
    path: Optional[Path]
    data: str  # the data fingerprint they were encoded from

    def info(self) -> dict:
        """The report's data.latents entry."""
        return {"shape": list(self.latents.shape[1:]), "cache": "reused" if self.reused else "encoded",
                "cache_file": str(self.path) if self.path is not None else None,
                "std": float(self.latents.double().std())}


def cache_key(autoencoder, data: str) -> str:
    """sha256 of what the latents depend on (first 24 hex digits)."""
    parts = {"data": data, "vae": model_fingerprint(autoencoder.vae), "scale": autoencoder.scale,
             "shift": autoencoder.shift, "kind": autoencoder.kind, "device": str(autoencoder.device)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def train_latents(autoencoder, train: Tensor, root: Optional[Path],
                  note: Callable[[str], None] = lambda line: None) -> EncodedTrain:
    """The latents of `train`, read from the cache under `root` when a sound one exists, else encoded (and
    cached when `root` is given)."""
    data = data_fingerprint(train)
    if root is None:
        return EncodedTrain(autoencoder.encode(train).cpu(), False, None, data)
    key = cache_key(autoencoder, data)
    path = Path(root) / CACHE_DIR / f"latents-{key}.safetensors"
    cached = _read(path, key, train.shape[0], note)
    if cached is not None:
        return EncodedTrain(cached, True, path, data)
    latents = autoencoder.encode(train).cpu().contiguous()
    _write(path, key, latents, note)
    return EncodedTrain(latents, False, path, data)


def _read(path: Path, key: str, rows: int, note: Callable[[str], None]) -> Optional[Tensor]:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") != key:
                raise ValueError("its recorded key differs")
            latents = fh.get_tensor("latents")
    except Exception as exc:  # a damaged or foreign file: encode again
        note(f"not using the cached latents {path}: {exc}; encoding the training set again")
        return None
    if latents.ndim != 4 or latents.shape[0] != rows or not torch.isfinite(latents).all():
        note(f"not using the cached latents {path}: wrong shape or non-finite values; encoding again")
        return None
    return latents.float()


def _write(path: Path, key: str, latents: Tensor, note: Callable[[str], None]) -> None:
    from safetensors.torch import save_file

    from memaudit.errors import UserError

    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"latents": latents}, str(tmp), metadata={"key": key})
    except (OSError, UserError) as exc:  # the scan goes on; the next one encodes again
        note(f"note: cannot cache the training latents at {path}: {exc}")
