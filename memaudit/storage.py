"""One copy of the training set, read chunk by chunk as float32: x = u / 127.5 - 1 for 8-bit images kept as uint8.

A scan reads the training images through an ImageStore: the empirical denoiser's GEMMs, the neighbour search
(memaudit.torch_index) and the metrics' gathers all take float32 rows from it, so no second copy is made.  A set
whose float32 copy fits in the float budget (MEMAUDIT_FLOAT_BUDGET bytes, 128 MiB by default, halved:
the neighbour index takes one more) is held as float32, as it always was; a larger 8-bit set stays uint8 (4x
smaller, e.g. a memory-mapped .npy) and each chunk is converted when read, with the same float32 operations the
loader uses, so its values are bit-identical to the float32 copy's.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from memaudit.errors import UserError

DEFAULT_FLOAT_BUDGET = 128 << 20  # a float32 path holds ~5 copies (index, DiffMemorize, tiles): +1 GB at most
CHUNK_BYTES = 64 * 2**20  # a float32 chunk of training rows never takes more than this
BYTE_SCALE = 127.5  # x = u / 127.5 - 1: memaudit.data's reading of uint8 [0, 255]


_SHARED: dict = {}  # device -> the float32 conversion buffer ImageStore.shared_buffer lends


def rows_per_chunk(dim: int, cap: int, bytes_per_value: int = 4) -> int:
    """Training rows per chunk: at most `cap`, and at most CHUNK_BYTES of them (256x256x3 images: 85 rows)."""
    return int(max(1, min(cap, CHUNK_BYTES // max(1, bytes_per_value * dim))))


def owned_cpu(tensor: Tensor) -> Tensor:
    """`tensor` on the CPU in a storage of its own: a slice's .cpu() keeps its whole base alive, and pickling
    it (torch.distributed's object collectives) sends the whole base."""
    tensor = tensor.detach().cpu()
    if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def float_budget() -> int:
    """Bytes a scan may spend on float32 copies of the training set: MEMAUDIT_FLOAT_BUDGET (a finite number >= 0,
    e.g. 134217728 or 1e9), DEFAULT_FLOAT_BUDGET (128 MiB) when it is unset or empty; a UserError otherwise."""
    text = os.environ.get("MEMAUDIT_FLOAT_BUDGET", "").strip()
    if not text:
        return DEFAULT_FLOAT_BUDGET
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (np.isfinite(value) and value >= 0):
        raise UserError(f"MEMAUDIT_FLOAT_BUDGET must be a finite number of bytes >= 0 (e.g. 134217728 or 1e9), "
                        f"not {text!r}")
    return int(value)


class ImageStore:
    """Training images (N, C, H, W): float32 in [-1, 1], or uint8 bytes u read as u / 127.5 - 1."""

    def __init__(self, raw: Tensor):
        if raw.dtype not in (torch.uint8, torch.float32) or raw.ndim != 4:
            raise ValueError("an ImageStore holds (N, C, H, W) uint8 or float32 images")
        self.raw = raw

    @classmethod
    def of(cls, images: "Tensor | ImageStore") -> "ImageStore":
        """A store over float images (no copy when they are float32), or the store itself."""
        return images if isinstance(images, ImageStore) else cls(images.float())

    @property
    def is_bytes(self) -> bool:
        return self.raw.dtype == torch.uint8

    @property
    def shape(self) -> torch.Size:
        return self.raw.shape

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.raw.shape[1:])

    @property
    def dim(self) -> int:
        return int(np.prod(self.raw.shape[1:]))

    @property
    def device(self) -> torch.device:
        return self.raw.device

    @property
    def nbytes(self) -> int:
        return self.raw.numel() * self.raw.element_size()

    def __len__(self) -> int:
        return self.raw.shape[0]

    def to(self, device) -> "ImageStore":
        return ImageStore(self.raw.to(device))

    def _float(self, raw: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """float32 values of a slice of raw (a view when raw is float32), contiguous whatever raw's layout: a
        channels-last uint8 slice is converted straight into them, with no contiguous uint8 copy (a chunk-sized
        heap block per call, which fragmented the heap). Into `out` when given (a float32 buffer of at least
        raw's size, reused: a fresh 50 MB tensor per chunk costs more in page faults than the conversion)."""
        if not self.is_bytes:
            return raw
        dest = out.reshape(-1)[:raw.numel()].view(raw.shape) if out is not None else \
            torch.empty(raw.shape, dtype=torch.float32, device=raw.device)
        return dest.copy_(raw).div_(BYTE_SCALE).sub_(1.0)

    def rows(self, start: int, stop: int, out: Optional[Tensor] = None) -> Tensor:
        """Images start:stop flattened to float32 rows (stop - start, d); `out`: a reusable buffer (the caller
        must be done with the previous rows written there)."""
        block = self.raw[start:stop]
        return self._float(block, out).reshape(block.shape[0], -1)  # a float32 store: a view if contiguous

    def shared_buffer(self, rows: int) -> Optional[Tensor]:
        """A float32 buffer for `rows` rows, one per device shared by every caller (the tile indexes of a scan
        each kept their own: 16 chunk-sized buffers); None for a float32 store. Only for rows consumed before
        the next call of any user."""
        if not self.is_bytes:
            return None
        need = rows * self.dim
        held = _SHARED.get(self.device)
        if held is None or held.numel() < need:
            _SHARED[self.device] = held = torch.empty(need, dtype=torch.float32, device=self.device)
        return held

    def images(self, idx) -> Tensor:
        """float32 images (k, C, H, W) at the indices idx (a tensor, list or slice)."""
        if isinstance(idx, Tensor):
            idx = idx.to(self.raw.device)
        return self._float(self.raw[idx].contiguous())

    def __getitem__(self, idx) -> Tensor:
        """float32 images at an index, slice or index tensor (what code written for a float tensor asks)."""
        if isinstance(idx, int):
            return self.images(slice(idx, idx + 1))[0]
        return self.images(idx)

    def gather_rows(self, idx: Tensor) -> Tensor:
        """float32 rows at indices of any shape: idx.shape + (d,)."""
        flat = self.images(idx.reshape(-1))
        return flat.reshape(*idx.shape, -1)

    def chunks(self, size: int) -> Iterator[tuple[int, int, Tensor]]:
        for start in range(0, len(self), size):
            stop = min(start + size, len(self))
            yield start, stop, self.rows(start, stop)

    def sq_norms(self, size: int = 4096) -> Tensor:
        """||x_i||^2 per image (N,), float32, summed in float64 chunk by chunk."""
        return torch.cat([(rows.double() ** 2).sum(1).float() for _, _, rows in self.chunks(size)])

    def digest_update(self, digest) -> None:
        """Feed the stored bytes (with dtype and shape) to a hashlib digest, chunk by chunk."""
        digest.update(f"{self.raw.dtype}:{tuple(self.raw.shape)};".encode())
        rows = rows_per_chunk(self.dim, 4096, self.raw.element_size())
        for start in range(0, len(self), rows):
            digest.update(self.raw[start:start + rows].contiguous().cpu().numpy())  # its buffer: no bytes copy

    def float(self) -> Tensor:
        """All images as one float32 tensor (a copy for a uint8 store: only for small sets)."""
        return self._float(self.raw.contiguous()) if self.is_bytes else self.raw


def keep_as_bytes(array: np.ndarray, nchw_shape, budget: Optional[int] = None) -> bool:
    """Whether an 8-bit array stays uint8: its float32 copy (plus the neighbour index's) exceeds the budget."""
    budget = float_budget() if budget is None else budget
    return array.dtype == np.uint8 and 2 * 4 * int(np.prod(nchw_shape)) > budget
