"""The image transforms a copy may have gone through: horizontal flips and small integer shifts.

A model trained with x-flip augmentation can emit a mirrored copy; a copy may also sit a pixel or two off.
transforms(flips, shifts) lists the identity, the mirror image when `flips`, and every shift (dy, dx) with
|dy|, |dx| <= shifts (of each, when both), edges replicated (no wrap-around).
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor

Transform = tuple[str, Callable[[Tensor], Tensor]]


def shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """x (N, C, H, W) moved down by dy and right by dx pixels; the uncovered border repeats the edge pixels."""
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    py, px = abs(dy), abs(dx)
    padded = F.pad(x.float(), (px, px, py, py), mode="replicate").to(x.dtype)
    return padded[..., py - dy: py - dy + h, px - dx: px - dx + w]


def flip(x: Tensor) -> Tensor:
    """The horizontal mirror image (left-right)."""
    return x.flip(-1)


def transforms(flips: bool = False, shifts: int = 0) -> list[Transform]:
    """(name, function) of each transform searched: identity first, then flips and shifts."""
    moves = [(dy, dx) for dy in range(-shifts, shifts + 1) for dx in range(-shifts, shifts + 1)]
    moves.sort(key=lambda m: (m != (0, 0), abs(m[0]) + abs(m[1]), m))
    out: list[Transform] = []
    for mirrored in ((False, True) if flips else (False,)):
        for dy, dx in moves:
            name = "+".join(([] if not mirrored else ["flip"]) + ([f"shift({dy},{dx})"] if (dy, dx) != (0, 0) else []))
            out.append((name or "identity", _make(mirrored, dy, dx)))
    return out


def _make(mirrored: bool, dy: int, dx: int) -> Callable[[Tensor], Tensor]:
    return lambda x: shift(flip(x) if mirrored else x, dy, dx)
