"""The neighbour-index table: how the training set is searched (`scan --index KIND[:key=value,...]`).

exact  faiss IndexFlatL2: every training image is compared (the default; exact distances)
ivf    faiss IVF-Flat: k-means cells, `nprobe` of `nlist` scanned (nlist=4 sqrt(M), nprobe=32 by default); for
       millions of images. Its recall against exact search is measured on the samples and reported
       (memaudit.metrics.index_recall); a recall under the scan's --min-recall fails the scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from memaudit.errors import UserError
from memaudit.neighbors import NeighborIndex


@dataclass(frozen=True)
class IndexKind:
    summary: str
    build: Callable[..., NeighborIndex]
    options: dict  # option name -> type


def _exact(points: Tensor) -> NeighborIndex:
    return NeighborIndex(points)


def _ivf(points: Tensor, nlist=None, nprobe=None) -> NeighborIndex:
    from memaudit.ivf import DEFAULT_NPROBE, IVFIndex

    return IVFIndex(points, nlist=nlist, nprobe=nprobe if nprobe is not None else DEFAULT_NPROBE)


INDEXES: dict[str, IndexKind] = {
    "exact": IndexKind("faiss IndexFlatL2: exact search (default)", _exact, {}),
    "ivf": IndexKind("faiss IVF-Flat: scans nprobe of nlist k-means cells (ivf:nlist=N,nprobe=P); recall measured",
                     _ivf, {"nlist": int, "nprobe": int}),
}


def parse_index(spec: str) -> tuple[str, dict]:
    """'ivf:nlist=1024,nprobe=64' -> ('ivf', {'nlist': 1024, 'nprobe': 64}); UserError naming --index otherwise."""
    name, _, args = str(spec).partition(":")
    name = name.strip().lower()
    if name not in INDEXES:
        raise UserError(f"--index {spec!r}: unknown index; choose from {', '.join(INDEXES)}")
    kind, options = INDEXES[name], {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or key not in kind.options:
            allowed = ", ".join(f"{k}=N" for k in kind.options) or "no options"
            raise UserError(f"--index {spec!r}: bad option {item!r}; {name} takes {allowed}")
        try:
            options[key] = kind.options[key](value)
        except ValueError:
            raise UserError(f"--index {spec!r}: {key} must be an integer, not {value!r}") from None
    return name, options


def build_index(points: Tensor, spec: str = "exact") -> NeighborIndex:
    """The index `spec` names, over points (M, ...)."""
    name, options = parse_index(spec)
    return INDEXES[name].build(points, **options)
