"""The kNN graph of a training set: for each image mu_i, its K nearest training images (itself first), found once
with faiss in pixel space or a feature space (memaudit.features), as the seed paper's smoothing target needs
("top-K nearest training samples to mu", Zhou et al. 2026 Sec. 4.2; its released code searches ResNet-18
features). The target then mixes the pixel images of those neighbours."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from memaudit.errors import SettingError
from memaudit.features import FeatureSpace, embed
from memaudit.neighbors import NeighborIndex


def knn_graph(train: Tensor, k: int, features: Optional[FeatureSpace] = None) -> Tensor:
    """(M, K) long: row i = the K nearest training images to image i, i first (ties and duplicates of i after it)."""
    if k < 1:
        raise SettingError("k", k, ">= 1")
    k = min(int(k), train.shape[0])
    points = embed(train, features)
    _, idx = NeighborIndex(points).search(points, k)
    return with_self_first(idx)


def with_self_first(idx: Tensor) -> Tensor:
    """Each row i with i moved to the front (an exact duplicate of i may have come first in the search)."""
    rows = torch.arange(idx.shape[0])[:, None]
    is_self = idx == rows
    missing = ~is_self.any(1)
    idx = idx.clone()
    idx[missing, -1] = rows[missing, 0]  # i fell outside its own K (more than K exact copies): put it in
    is_self = idx == rows
    order = torch.argsort((~is_self).int(), dim=1, stable=True)
    return torch.gather(idx, 1, order)
