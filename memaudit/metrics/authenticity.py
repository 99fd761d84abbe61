"""Alaa et al.'s authenticity (ICML 2022, "How Faithful is your Synthetic Data?"), duplicate-aware.

A sample g with nearest training image r is authentic when it is farther from r than r is from its own nearest
training neighbour: ||g - r|| > ||r - NN(r)||. The fraction authentic is reported (with its 95 % Wilson interval);
a copying model scores near 0. NN(r) is the nearest training image outside r's near-duplicate cluster (a
duplicated r would otherwise make every sample authentic). In the scan's feature space. It costs one search per
sample's nearest training image (not of the whole training set against itself: linear in M).
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch

from memaudit.duplicates import distinct_second
from memaudit.features import embed
from memaudit.storage import ImageStore
from memaudit.intervals import fraction_fields
from memaudit.metrics.base import RUN, Column, Metric, RunData, ScanContext
from memaudit.metrics.nn_ratio import neighbours_needed
from memaudit.numbers import finite


def train_neighbour_distance(ctx: ScanContext, rows) -> np.ndarray:
    """Per training image, the distance to its nearest training image of another cluster: a length-M array,
    filled in for `rows` (the samples' nearest images) and whatever earlier calls asked for, NaN elsewhere. Only
    the rows asked for are searched (S queries, not the whole set against itself), once per scan."""
    if "train_nn" not in ctx.cache:
        ctx.cache["train_nn"] = np.full(ctx.index.num_points, np.nan)
    out = ctx.cache["train_nn"]
    todo = np.unique(np.asarray(rows, dtype=np.int64))
    todo = todo[np.isnan(out[todo])]
    if len(todo):
        k = min(ctx.index.num_points, neighbours_needed(ctx.duplicates) + 1)
        images = ctx.train[torch.from_numpy(todo)]
        bytes_pixels = isinstance(ctx.train, ImageStore) and ctx.train.is_bytes and ctx.features.is_pixels
        dist, idx = ctx.index.search(images if bytes_pixels else embed(images, ctx.features), k)
        labels = ctx.duplicates.labels if ctx.duplicates is not None else np.arange(ctx.index.num_points)
        out[todo] = distinct_second(dist, idx, labels)[0].numpy().astype(np.float64)
    return out


def authentic(d1: np.ndarray, nearest: np.ndarray, train_nn: np.ndarray) -> np.ndarray:
    """Boolean per sample: d(g, r) > d(r, NN(r)) with r = nearest[g]."""
    return np.asarray(d1, dtype=np.float64) > train_nn[np.asarray(nearest)]


class Authenticity(Metric):
    name = "authenticity"
    scope = RUN
    title = "Authenticity (Alaa et al. 2022)"
    summary_keys = {
        "authenticity": "min over runs of `authenticity.authenticity`: samples farther from their nearest training "
                        "image than it is from its own nearest training neighbour",
        "authenticity_lower": "min over runs of `authenticity.authenticity_lower` (95 % Wilson interval)",
    }
    columns = (Column("authenticity", lambda s: s.get("authenticity"), percent=True),)

    def compute(self, ctx: ScanContext, run: Optional[RunData] = None) -> dict:
        dist, idx = run.neighbours(ctx, 1)
        flags = authentic(dist[:, 0].numpy(), idx[:, 0].numpy(), train_neighbour_distance(ctx, idx[:, 0].numpy()))
        return {"num_samples": int(len(flags)), **fraction_fields("authenticity", int(flags.sum()), len(flags)),
                "authentic": [bool(v) for v in flags]}

    def cost(self, w, sampler=None):
        """The samples' nearest neighbours and their nearest training images' own (at most one per sample)."""
        return w.search_rows(2 * w.num_samples)

    def summarize(self, sections: Mapping[str, Mapping]) -> dict:
        out = {}
        for key in self.summary_keys:
            values = finite(s.get(key) for s in sections.values() if s)
            out[key] = min(values) if values else None
        return out

    def validate(self, section, c, where: str) -> None:
        c.dict(section, where, ("num_samples", "authenticity", "authenticity_lower", "authenticity_upper",
                                "authentic"))
        for key in ("authenticity", "authenticity_lower", "authenticity_upper"):
            c.fraction(section[key], f"{where}.{key}")
        for i, v in enumerate(c.list(section["authentic"], f"{where}.authentic")):
            c.bool(v, f"{where}.authentic[{i}]")


METRIC = Authenticity()
