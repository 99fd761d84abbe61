"""The neighbour-index table: how the training set is searched (`scan --index KIND[:key=value,...]`).

exact  faiss IndexFlatL2: every training image is compared (the default; exact distances)
ivf    faiss IVF-Flat: k-means cells, `nprobe` of `nlist` scanned (nlist=4 sqrt(M), nprobe=32 by default); for
       millions of images. Its recall against exact search is measured on the samples and reported
       (memaudit.metrics.index_recall); a recall under the scan's --min-recall fails the scan.
torch  chunked torch GEMMs on the scan's device (a GPU with --device cuda), exact in fp32; torch:dtype=bf16 (or
       fp16) runs the GEMMs at low precision and re-checks k + 16 candidates in float32: approximate, so its
       recall is measured and gated like ivf's.
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


def _torch(points: Tensor, dtype: str = "fp32") -> NeighborIndex:
    from memaudit.torch_index import TorchIndex

    return TorchIndex(points, device=points.device, dtype=dtype)


INDEXES: dict[str, IndexKind] = {
    "exact": IndexKind("faiss IndexFlatL2: exact search (default)", _exact, {}),
    "ivf": IndexKind("faiss IVF-Flat: scans nprobe of nlist k-means cells (ivf:nlist=N,nprobe=P); recall measured",
                     _ivf, {"nlist": int, "nprobe": int}),
    "torch": IndexKind("torch GEMMs on the scan's device, exact in fp32; torch:dtype=bf16|fp16 re-checks "
                       "candidates in float32 (recall measured)", _torch, {"dtype": str}),
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
            allowed = ", ".join(f"{k}=N" if t is int else f"{k}=VALUE" for k, t in kind.options.items()) \
                or "no options"
            raise UserError(f"--index {spec!r}: bad option {item!r}; {name} takes {allowed}")
        try:
            options[key] = kind.options[key](value)
        except ValueError:
            raise UserError(f"--index {spec!r}: {key} must be an integer, not {value!r}") from None
        if key == "dtype" and options[key] not in ("fp32", "bf16", "fp16"):
            raise UserError(f"--index {spec!r}: dtype must be fp32, bf16 or fp16, not {value!r}")
    return name, options


def is_approximate(spec: str) -> bool:
    """Whether the index `spec` names may miss neighbours (so its recall is measured and gated)."""
    name, options = parse_index(spec)
    return name == "ivf" or (name == "torch" and options.get("dtype", "fp32") != "fp32")


def build_index(points: Tensor, spec: str = "exact") -> NeighborIndex:
    """The index `spec` names, over points (M, ...)."""
    name, options = parse_index(spec)
    return INDEXES[name].build(points, **options)
