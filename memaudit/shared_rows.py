"""Row-wise work of the metrics, in fixed blocks of rows that torchrun ranks share (memaudit.distributed).

A metric's per-sample computation (the samples' nearest training images, the top-k entropy and the empirical
denoiser along the recorded trajectories) is cut into blocks of `block_rows(batch_size)` rows; block b is
computed by rank b mod N and the results are gathered on rank 0 in block order. One process computes the same
blocks itself, so every row is computed with the same shapes, and the report is the same, for any N.
Adding row work is a function (state, *row_tensors, *args) -> Tensor or tuple of Tensors, one row per input row,
and a line in ROW_WORK; `state` is the scan's ScanContext on rank 0 and a RowState on the other ranks (both
carry `empirical`, `features` and `index`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from memaudit import distributed
from memaudit.storage import owned_cpu

ROW_BLOCK = 64  # rows per block at most; the scan's --batch-size when smaller


def block_rows(batch_size: int) -> int:
    """Rows per block of a scan with this --batch-size."""
    return max(1, min(ROW_BLOCK, int(batch_size)))


def neighbours(state, samples: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Distances and indices of each sample's k nearest training images, in the scan's feature space."""
    from memaudit.features import embed

    return state.index.search(embed(samples, state.features), k)


def topk_entropy(state, x: Tensor, sigma: float, k: int, labels) -> Tensor:
    """memaudit.metrics.entropy.topk_entropy of each row (nats)."""
    from memaudit.metrics.entropy import topk_entropy as entropy

    return entropy(state.empirical, x, sigma, k, torch.as_tensor(labels) if labels is not None else None)


def empirical_cosine(state, x: Tensor, denoised: Tensor, sigma: float) -> Tensor:
    """memaudit.metrics.score_cosine.recorded_cosine_deviation of each row."""
    from memaudit.metrics.score_cosine import recorded_cosine_deviation

    return recorded_cosine_deviation(state.empirical, x, denoised, sigma)


ROW_WORK: dict[str, Callable[..., Any]] = {
    "neighbours": neighbours,
    "topk_entropy": topk_entropy,
    "empirical_cosine": empirical_cosine,
}


def map_rows(state, name: str, rows: Sequence[Tensor], args: tuple = (), batch_size: int = ROW_BLOCK,
             local: bool = False):
    """ROW_WORK[name](state, *rows_of_a_block, *args) over every block of `rows` (tensors with the same first
    dimension), the results concatenated in row order (a Tensor, or a tuple of them). Under torchrun the blocks
    are shared among the ranks unless `local` (work only rank 0 can do, e.g. an approximate index it built)."""
    size = block_rows(batch_size)
    n = int(rows[0].shape[0])
    blocks = [tuple(r[start:start + size] for r in rows) for start in range(0, n, size)]
    if distributed.active() and not local and len(blocks) > 1:  # sent as CPU tensors (gloo, pickled)
        blocks = [tuple(owned_cpu(r) for r in block) for block in blocks]  # not views: pickled whole
        results = distributed.share_rows(name, args, blocks, lambda nm, bl, ar: compute_blocks(state, nm, bl, ar))
    else:
        results = compute_blocks(state, name, blocks, args)
    return concatenate(results)


def compute_blocks(state, name: str, blocks: list, args: tuple) -> list:
    """Each block's result, moved to the CPU (what the ranks send to rank 0)."""
    work = ROW_WORK[name]
    return [_cpu(work(state, *block, *args)) for block in blocks]


def concatenate(results: list):
    if not results:
        raise ValueError("no rows to work on")
    if isinstance(results[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*results))
    return torch.cat(results)


def _cpu(result):
    return tuple(owned_cpu(r) for r in result) if isinstance(result, tuple) else owned_cpu(result)


@dataclass
class RowState:
    """What a torchrun worker holds to answer rank 0's row work: the empirical denoiser of the training set, and
    the scan's feature space and exact neighbour index, built on the first search."""

    empirical: Any
    train: Tensor
    features_spec: Optional[str]
    index_spec: str
    device: torch.device

    @cached_property
    def features(self):
        from memaudit.features import feature_space

        return feature_space(self.features_spec, self.device, tuple(self.train.shape[1:]))

    @cached_property
    def index(self):
        from memaudit.metrics.nn_ratio import training_index

        return training_index(self.train, self.features, index=self.index_spec)

    def answer(self, name: str, blocks: list, args: tuple) -> list:
        """distributed.RowWork: this rank's results on its blocks."""
        blocks = [tuple(r.to(self.device) for r in block) for block in blocks]
        return compute_blocks(self, name, blocks, args)
