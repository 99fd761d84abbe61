"""Class-conditional denoisers: D(x, sigma, c) for class labels c in [0, num_classes), one class at a time.

A conditional denoiser sets `num_classes` (an int; None or absent = unconditional) and takes
`denoise(x, sigma, class_labels=None)` with class_labels a (B,) long tensor. ClassBound(D, c) is the plain
Denoiser x, sigma -> D(x, sigma, c), so samplers and metrics keep the one D(x, sigma) interface.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from memaudit.denoiser import Denoiser
from memaudit.errors import UserError


def num_classes(denoiser: Any) -> Optional[int]:
    """The number of classes a denoiser is conditioned on, or None when it is unconditional."""
    n = getattr(denoiser, "num_classes", None)
    return int(n) if n is not None else None


def describe_conditioning(denoiser: Any) -> str:
    """'class-conditional, N classes' or 'none (unconditional)', as `memaudit inspect` prints it."""
    n = num_classes(denoiser)
    return f"class-conditional, {n} classes" if n is not None else "none (unconditional)"


def check_labels(class_labels: Optional[Tensor], n: Optional[int], batch: int) -> Optional[Tensor]:
    """The labels as a (batch,) long tensor, checked against the model's conditioning (UserError otherwise)."""
    if n is None:
        if class_labels is not None:
            raise UserError("class labels were given to an unconditional model")
        return None
    if class_labels is None:
        raise UserError(f"the model is class-conditional ({n} classes) and needs class labels: give the data "
                        "labels (class subfolders of an image folder, or a 'labels' array in the .npz)")
    labels = torch.as_tensor(class_labels).long().reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(batch)
    if labels.shape[0] != batch:
        raise UserError(f"{labels.shape[0]} class labels for a batch of {batch}")
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < n):
        raise UserError(f"class label {int(labels.max())} is outside the model's {n} classes (0..{n - 1})")
    return labels


class ClassBound(Denoiser):
    """D_c(x, sigma) = D(x, sigma, c): a conditional denoiser with its class fixed to `label`."""

    def __init__(self, denoiser: Denoiser, label: int):
        super().__init__()
        n = num_classes(denoiser)
        if n is None:
            raise UserError("ClassBound needs a class-conditional model")
        if not 0 <= int(label) < n:
            raise UserError(f"class {label} is outside the model's {n} classes (0..{n - 1})")
        self.inner = denoiser
        self.label = int(label)
        self.image_shape = denoiser.image_shape

    @property
    def sigma_min(self) -> float:
        return self.inner.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.inner.sigma_max

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        labels = torch.full((x.shape[0],), self.label, dtype=torch.long, device=x.device)
        return self.inner.denoise(x, sigma, class_labels=labels)
