"""Limits a sampler puts on its x0 estimate (diffusers' clip_sample and thresholding), applied to D(x, sigma).

clip       D <- clamp(D, -r, r)                                                  (clip_sample, clip_sample_range r)
threshold  D <- clamp(D, -s, s) / s, s = clamp(quantile(|D|, p), 1, m) per image  (Imagen's dynamic thresholding,
           Saharia et al. 2022: thresholding, dynamic_thresholding_ratio p, sample_max_value m)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from memaudit.errors import UserError

KINDS = ("clip", "threshold")


@dataclass(frozen=True)
class X0Limit:
    """clip (to +-value) or threshold (ratio p, max value m) of the denoised estimate."""

    kind: str
    value: float
    ratio: Optional[float] = None

    def __call__(self, x0: Tensor) -> Tensor:
        if self.kind == "clip":
            return x0.clamp(-self.value, self.value)
        flat = x0.reshape(x0.shape[0], -1)
        s = torch.quantile(flat.abs().float() if flat.dtype not in (torch.float32, torch.float64) else flat.abs(),
                           self.ratio, dim=1).clamp(min=1, max=self.value).to(x0.dtype)[:, None]
        return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(x0.shape)

    def describe(self) -> str:
        if self.kind == "clip":
            return f"x0 clipped to [-{self.value:g}, {self.value:g}]"
        return f"x0 dynamically thresholded (quantile {self.ratio:g}, max {self.value:g})"

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def x0_limit_from_record(record: Any, source: str) -> Optional[X0Limit]:
    """The X0Limit a native config's "x0_limit" records ({"kind", "value"[, "ratio"]}), or None."""
    if record is None:
        return None
    try:
        limit = X0Limit(record["kind"], float(record["value"]),
                        None if record.get("ratio") is None else float(record["ratio"]))
    except (TypeError, KeyError, ValueError, AttributeError):
        limit = None
    if limit is None or limit.kind not in KINDS or not limit.value > 0 or (
            limit.kind == "threshold" and not (limit.ratio is not None and 0 < limit.ratio <= 1)):
        raise UserError(f"{source}: x0_limit must be {{\"kind\": \"clip\"|\"threshold\", \"value\": > 0"
                        f"[, \"ratio\": (0, 1]]}}, not {record!r}")
    return limit
