"""Nearest-neighbour distance ratio d1/d2 (Yoon et al. 2023, Gu et al. 2023): memorized if < 1/3.

d1, d2 = L2 distances from a sample to its nearest and second-nearest training images, in pixel space or in
the space of a feature extractor.  An exact duplicate of a training image has d1 = 0 and ratio 0.  With the
training set's near-duplicate clusters (memaudit.duplicates), d2 is the distance to the nearest image of
another cluster, so a copy of an image that the training set holds twice still counts as a copy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from memaudit.duplicates import Duplicates, distinct_second
from memaudit.errors import UserError, first_lines
from memaudit.neighbors import NeighborIndex

Features = Callable[[Tensor], Tensor]


@dataclass
class NNResult:
    """Per-sample ratio d1/d2, distances d1, d2 and the index of the nearest training image (CPU tensors).

    ratio/d2 are duplicate-aware when clusters were given (d2 to the nearest other cluster); ratio_plain/d2_plain
    use the second-nearest image whatever its cluster (equal to ratio/d2 when there are no duplicates)."""

    ratio: Tensor  # (N,)
    d1: Tensor  # (N,)
    d2: Tensor  # (N,)
    nearest: Tensor  # (N,) long
    ratio_plain: Optional[Tensor] = None
    d2_plain: Optional[Tensor] = None


def embed(images: Tensor, features: Optional[Features], batch_size: int = 256) -> Tensor:
    """Flattened pixels, or features(x) computed in batches, as a float32 CPU tensor (N, F)."""
    if features is None:
        return images.detach().reshape(images.shape[0], -1).to("cpu", torch.float32)
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            out.append(features(images[start:start + batch_size]).detach().to("cpu", torch.float32))
    return torch.cat(out)


def training_index(train: Tensor, features: Optional[Features] = None, batch_size: int = 256) -> NeighborIndex:
    """The neighbour index of the (embedded) training images, to reuse across nn_ratios calls."""
    if train.shape[0] < 2:
        raise UserError("the NN ratio needs at least 2 training images")
    return NeighborIndex(embed(train, features, batch_size))


def nn_ratios(samples: Tensor, train: Tensor, features: Optional[Features] = None,
              batch_size: int = 256, index: Optional[NeighborIndex] = None,
              duplicates: Optional[Duplicates] = None) -> NNResult:
    """ratio_n = d1_n / d2_n with d_j the L2 distance to the j-th nearest training image (0 if d1 = d2 = 0);
    with `duplicates`, d2 is the distance to the nearest image outside the nearest one's cluster.

    `index` (from training_index(train, features)) saves re-embedding and re-indexing the training set."""
    if train.shape[0] < 2:
        raise UserError("the NN ratio needs at least 2 training images")
    if samples.shape[0] == 0:
        raise UserError("the NN ratio needs at least 1 sample")
    index = index if index is not None else training_index(train, features, batch_size)
    k = 2 if duplicates is None else min(index.num_points, max(2, duplicates.max_size + 1))
    dist, idx = index.search(embed(samples, features, batch_size), k)
    d1, d2_plain = dist[:, 0], dist[:, 1]
    d2 = d2_plain if duplicates is None else distinct_second(dist, idx, duplicates.labels)[0]
    return NNResult(ratio=_ratio(d1, d2), d1=d1, d2=d2, nearest=idx[:, 0], ratio_plain=_ratio(d1, d2_plain),
                    d2_plain=d2_plain)


def _ratio(d1: Tensor, d2: Tensor) -> Tensor:
    """d1 / d2, 0 where d2 = 0 (then d1 = 0 too: an exact copy)."""
    return torch.where(d2 > 0, d1 / torch.where(d2 > 0, d2, torch.ones_like(d2)), torch.zeros_like(d1))


def memorized_fraction(ratio: Tensor, threshold: float = 1 / 3) -> float:
    """Fraction of samples with d1/d2 < threshold (0 for no samples)."""
    return float((ratio < threshold).double().mean()) if ratio.numel() else 0.0


def histogram(ratio: Tensor, bins: int = 20, upper: float = 1.0) -> dict:
    """Counts of the ratio in `bins` equal bins over [0, upper]; values above `upper` go to the last bin."""
    values = np.clip(ratio.detach().cpu().double().numpy(), 0.0, upper)
    counts, edges = np.histogram(values, bins=bins, range=(0.0, upper))
    return {"bin_edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def worst_pairs(result: NNResult, n: int) -> list[int]:
    """Indices of the n samples with the smallest ratio, ascending ratio, ties broken by sample index."""
    order = torch.sort(result.ratio.detach().cpu(), stable=True).indices
    return [int(i) for i in order[:max(n, 0)]]


def load_feature_extractor(path: str, device, probe_shape: Optional[tuple[int, ...]] = None) -> Features:
    """A TorchScript module x (B,C,H,W) in [-1,1] -> (B,F), loaded with torch.jit.load; outputs on the CPU."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.9 deprecates TorchScript loading
            module = torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:  # torch raises RuntimeError/ValueError/OSError for missing or non-TorchScript files
        raise UserError(f"cannot load feature extractor {path} as TorchScript: {first_lines(exc, with_type=True)}") from None

    def features(x: Tensor) -> Tensor:
        try:
            with torch.no_grad():
                out = module(x.to(device))
        except Exception as exc:
            raise UserError(f"feature extractor {path} failed on input {tuple(x.shape)}: {first_lines(exc, with_type=True)}") from None
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise UserError(f"feature extractor {path} must return (B, F) features, got {shape} for batch {x.shape[0]}")
        return out.detach().float().cpu()

    if probe_shape is not None:
        features(torch.zeros((2, *probe_shape)))
    return features
