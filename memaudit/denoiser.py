"""The one denoiser interface every part of memaudit speaks to (EDM convention, Karras et al. 2022).

D(x, sigma) -> x0_hat, with x = x0 + sigma * n, x in [-1, 1] scale, shape (B, C, H, W), sigma shape (B,).
Score: s(x, sigma) = (D(x, sigma) - x) / sigma**2.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn


class Denoiser(nn.Module):
    """Base class: subclasses implement `denoise(x, sigma)` for sigma of shape (B,).

    Attributes: sigma_min, sigma_max (valid noise range), image_shape (C, H, W) or None if any shape works.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    image_shape: Optional[tuple[int, int, int]] = None

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Optional[Tensor] = None) -> Tensor:
        """D(x, sigma): broadcast a scalar sigma to shape (B,) and call `denoise` (with the class labels of a
        class-conditional denoiser, memaudit.conditioning)."""
        if class_labels is not None:
            return self.denoise(x, as_sigma(sigma, x), class_labels=class_labels)
        return self.denoise(x, as_sigma(sigma, x))

    @property
    def device(self) -> torch.device:
        for tensor in list(self.parameters()) + list(self.buffers()):
            return tensor.device
        return torch.device("cpu")


def as_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Return sigma as a float tensor of shape (B,) on x's device."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(x.shape[0])


def expand_like(sigma: Tensor, x: Tensor) -> Tensor:
    """Reshape a (B,) tensor to (B, 1, 1, ...) so it broadcasts against x."""
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def clip_sigma_range(denoiser: Denoiser, lo: float, hi: float) -> tuple[float, float]:
    """Intersect [lo, hi] with the denoiser's valid sigma range."""
    return max(lo, float(denoiser.sigma_min)), min(hi, float(denoiser.sigma_max))


def check_shape(denoiser: Denoiser, shape: Sequence[int]) -> None:
    """Raise UserError if data of image shape (C, H, W) does not fit the denoiser."""
    from memaudit.errors import UserError

    expected = denoiser.image_shape
    if expected is not None and tuple(shape) != tuple(expected):
        if tuple(shape[1:]) == tuple(expected[1:]) and expected[0] in (1, 3):
            fix = f"pass --channels {expected[0]}"
        elif shape[0] == expected[0] and expected[1] == expected[2]:
            fix = f"pass --resize {expected[1]}"
        else:
            fix = f"pass --channels {expected[0]} --resize {expected[1]}" if expected[1] == expected[2] \
                else "use matching data"
        raise UserError(
            f"image shape mismatch: the model expects {fmt_shape(expected)} (CxHxW) but the data is "
            f"{fmt_shape(shape)}; {fix}"
        )


def fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)
