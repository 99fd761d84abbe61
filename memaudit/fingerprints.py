"""Content fingerprints that key resumable work: a run resumes only on the same data and the same weights."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn


def data_fingerprint(data: Tensor) -> str:
    """sha256 of a tensor's bytes (first 16 hex digits); of a uint8 ImageStore, its bytes, dtype and shape."""
    from memaudit.storage import ImageStore

    if isinstance(data, ImageStore):
        digest = hashlib.sha256()
        data.digest_update(digest)
        return digest.hexdigest()[:16]
    return hashlib.sha256(data.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, bytes; first 16 hex digits).

    It keys the work folder, so samples of a checkpoint retrained in place are never resumed.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
