"""The DiffMemorize-compatible memorization ratio (Gu et al. 2023, sail-sg/DiffMemorize `mem_ratio.py`).

Computed exactly as their script does, whatever --features says: samples and training images quantized to uint8
pixels 0-255, distances L2 / sqrt(C H W), the two nearest training images (top-2, no duplicate handling), and

    memorized if d1 / d2 < 1/3 (their "calibrated KNN ratio"), plus their logged mean NN distance mean(d1).

(They repeat grayscale to 3 channels; that leaves both numbers unchanged.) A regression anchor, so that a
memaudit number can be set beside one published with DiffMemorize.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np
import torch

from memaudit.data import to_uint8
from memaudit.intervals import fraction_fields
from memaudit.metrics.base import RUN, Column, Metric, RunData, ScanContext
from memaudit.metrics.nn_ratio import _ratio, memorized_count
from memaudit.neighbors import NeighborIndex
from memaudit.storage import BYTE_SCALE, ImageStore
from memaudit.numbers import finite, finite_or_none

THRESHOLD = 1.0 / 3.0


def pixels_255(images) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> float32 (N, C*H*W) of the uint8 pixel values."""
    return torch.from_numpy(to_uint8(images).transpose(0, 3, 1, 2).reshape(images.shape[0], -1).astype(np.float32))


def byte_index(train) -> tuple:
    """(index, unit): an index of the training images' uint8 pixel values, and the factor that turns its
    distances into uint8 units. A uint8 store is searched where it is, in [-1, 1] units (x 127.5: its bytes are
    those values exactly), instead of a float32 copy of it."""
    if isinstance(train, ImageStore) and train.is_bytes:
        from memaudit.torch_index import TorchIndex

        return TorchIndex(train, device=train.device), BYTE_SCALE
    return NeighborIndex(pixels_255(train)), 1.0


class DiffMemorize(Metric):
    name = "diffmemorize"
    scope = RUN
    title = "DiffMemorize-compatible ratio (Gu et al. 2023)"
    summary_keys = {
        "diffmemorize_fraction": "max over runs of `diffmemorize.memorized_fraction`: DiffMemorize's number (uint8 "
                                 "pixels, L2 / sqrt(CHW), top-2, d1/d2 < 1/3)",
        "diffmemorize_fraction_upper": "its 95 % Wilson upper bound (max over runs)",
    }
    columns = (Column("DiffMemorize ratio", lambda s: s.get("memorized_fraction"), percent=True),)

    def compute(self, ctx: ScanContext, run: Optional[RunData] = None) -> dict:
        if "diffmemorize_index" not in ctx.cache:
            ctx.cache["diffmemorize_index"] = byte_index(ctx.train)
        index, unit = ctx.cache["diffmemorize_index"]
        queries = pixels_255(run.samples)
        dist, _ = index.search(queries / BYTE_SCALE - 1.0 if unit != 1.0 else queries, 2)
        dist = dist * unit
        scale = math.sqrt(index.dim)
        d1, d2 = dist[:, 0].double() / scale, dist[:, 1].double() / scale
        ratio = _ratio(d1, d2).numpy()
        n = len(ratio)
        return {"threshold": THRESHOLD, "num_samples": n, "feature_space": "uint8 pixels / sqrt(CHW)",
                **fraction_fields("memorized_fraction", memorized_count(ratio, THRESHOLD), n),
                "mean_nn_distance": finite_or_none(d1.mean()) if n else None,
                "ratios": [finite_or_none(v) for v in ratio.tolist()]}

    def cost(self, w, sampler=None):
        """One exact search of the samples in uint8 pixel units."""
        return w.search_rows(w.num_samples)

    def summarize(self, sections: Mapping[str, Mapping]) -> dict:
        out = {}
        for key, field in (("diffmemorize_fraction", "memorized_fraction"),
                           ("diffmemorize_fraction_upper", "memorized_fraction_upper")):
            values = finite(s.get(field) for s in sections.values() if s)
            out[key] = max(values) if values else None
        return out

    def validate(self, section, c, where: str) -> None:
        c.dict(section, where, ("threshold", "num_samples", "memorized_fraction", "memorized_fraction_lower",
                                "memorized_fraction_upper", "mean_nn_distance", "ratios"))
        for key in ("memorized_fraction", "memorized_fraction_lower", "memorized_fraction_upper"):
            c.fraction(section[key], f"{where}.{key}")
        c.num(section["mean_nn_distance"], f"{where}.mean_nn_distance", nullable=True)
        c.nums(section["ratios"], f"{where}.ratios")

    def lines(self, report: Mapping) -> list[str]:
        sections = self.sections(report)
        if not sections:
            return []
        parts = [f"{name} {s.get('memorized_fraction', 0):.4g} (mean NN distance {s.get('mean_nn_distance') or 0:.4g})"
                 for name, s in sorted(sections.items())]
        return ["DiffMemorize-compatible ratio (uint8 pixels, L2/sqrt(CHW), top-2, d1/d2 < 1/3; Gu et al. 2023): "
                + ", ".join(parts)]


METRIC = DiffMemorize()
