"""Kernel score smoothing (Gabriel et al., arXiv 2505.22841; Chen, "On the interpolation effect of score
smoothing", arXiv 2502.19499): the empirical score convolved with a Gaussian kernel in x,

    s_h(x, sigma) = E_{e ~ N(0, h^2 I)} s*(x + e, sigma),   so   D_h(x, sigma) = E_e D*(x + e, sigma),

estimated by Monte Carlo over a fixed, seeded set of S perturbations (antithetic pairs e, -e), so D_h is a
deterministic function. Along a data manifold it interpolates between training points (the average of the
nearest points of x + e over a kernel's worth of e); across the manifold it still contracts onto it, since every
training point lies on it. Unlike a larger noise level (sigma sqrt T), the smoothing is in x, not in sigma.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memaudit.denoiser import Denoiser
from memaudit.errors import SettingError

DEFAULT_SAMPLES = 16
MAX_BATCH = 4096  # perturbed rows evaluated at once


def check_samples(samples: int, setting: str = "samples") -> None:
    """The Monte Carlo sample count must be even and >= 2: antithetic pairs e, -e keep the mean at 0."""
    if samples < 2 or samples % 2:
        raise SettingError(setting, samples, "an even number >= 2 (antithetic pairs e, -e keep the mean at 0)")


def kernel_perturbations(shape: tuple, h: float, samples: int, seed: int = 0) -> Tensor:
    """(S, *shape): h times standard normal draws in antithetic pairs (e_1, -e_1, e_2, -e_2, ...), seeded."""
    if not (h >= 0 and h < float("inf")):
        raise SettingError("kernel", h, "a finite bandwidth h >= 0")
    check_samples(samples)
    half = torch.randn(((samples + 1) // 2, *shape), generator=torch.Generator().manual_seed(seed))
    return (h * torch.stack([half, -half], dim=1).reshape(-1, *shape))[:samples]


class KernelSmoothedDenoiser(Denoiser):
    """D_h(x, sigma) = (1/S) sum_s D(x + e_s, sigma) over a fixed set of kernel perturbations e_s of a base
    denoiser (the empirical one for the closed-form kernel-smoothed model)."""

    def __init__(self, base: Denoiser, h: float, samples: int = DEFAULT_SAMPLES, seed: int = 0):
        super().__init__()
        if base.image_shape is None:
            raise SettingError("image_shape", None, "known for kernel smoothing")
        self.base, self.h = base, float(h)
        self.image_shape = tuple(base.image_shape)
        self.sigma_min, self.sigma_max = base.sigma_min, base.sigma_max
        self.register_buffer("perturbations", kernel_perturbations(self.image_shape, h, samples, seed),
                             persistent=False)

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        e = self.perturbations.to(x.device, x.dtype)
        s = e.shape[0]
        per = max(1, MAX_BATCH // s)
        out = []
        for start in range(0, x.shape[0], per):
            xb, sb = x[start:start + per], sigma[start:start + per]
            y = (xb[:, None] + e[None]).reshape(-1, *xb.shape[1:])
            d = self.base(y, sb.repeat_interleave(s))
            out.append(d.reshape(xb.shape[0], s, *xb.shape[1:]).mean(1))
        return torch.cat(out)
