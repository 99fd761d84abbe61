"""Nearest-neighbour distance ratio d1/d2 (Yoon et al. 2023, Gu et al. 2023): memorized if < 1/3.

d1, d2 = L2 distances from a sample to its nearest and second-nearest training images, in pixel space or in
a feature space (memaudit.features).  An exact duplicate of a training image has d1 = 0 and ratio 0.  With the
training set's near-duplicate clusters (memaudit.duplicates), d2 is the distance to the nearest image of
another cluster, so a copy of an image that the training set holds twice still counts as a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from memaudit.duplicates import Duplicates, distinct_second
from memaudit.errors import UserError
from memaudit.features import FeatureSpace, embed
from memaudit.intervals import fraction_fields
from memaudit.metrics.base import (RUN, Column, Histogram, Metric, Note, PairGrid, RunData, ScanContext,
                                   sampler_key)
from memaudit.indexes import build_index
from memaudit.neighbors import NeighborIndex
from memaudit.storage import ImageStore
from memaudit.numbers import finite, finite_or_none, floats, fmt

NN_RATIO_THRESHOLD = 1.0 / 3.0
HISTOGRAM_BINS = 20
WORST_PAIRS = 16


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


def training_index(train: Tensor, features: Optional[FeatureSpace] = None, batch_size: int = 256,
                   index: str = "exact") -> NeighborIndex:
    """The neighbour index (memaudit.indexes: `index` names its kind) of the (embedded) training images, to reuse
    across nn_ratios calls."""
    if train.shape[0] < 2:
        raise UserError("the NN ratio needs at least 2 training images")
    if isinstance(train, ImageStore) and train.is_bytes and (features is None or features.is_pixels):
        return bytes_index(train, index)
    return build_index(embed(train, features, batch_size), index)


def bytes_index(train: ImageStore, index: str) -> NeighborIndex:
    """The index of a uint8 training store: exact, torch GEMMs over its chunks (no float copy); ivf, faiss over
    a byte copy (memaudit.ivf.ByteIVFIndex); the low-precision torch index, which would copy it at 16 bits, is
    refused with what to do."""
    from memaudit.indexes import parse_index
    from memaudit.ivf import DEFAULT_NPROBE, ByteIVFIndex
    from memaudit.torch_index import TorchIndex

    name, options = parse_index(index)
    if name == "exact" or (name == "torch" and options.get("dtype", "fp32") == "fp32"):
        return TorchIndex(train, device=train.device)
    if name == "ivf":
        return ByteIVFIndex(train.to("cpu"), nlist=options.get("nlist"), nprobe=options.get("nprobe", DEFAULT_NPROBE))
    raise _low_precision_refused(train, index)


def _low_precision_refused(train: ImageStore, index: str) -> UserError:
    return UserError(f"--index {index} copies the training set at 16 bits, and this one is held as uint8 to fit "
                     f"in memory ({train.nbytes / 2**30:.2f} GiB as bytes): use --index exact or ivf, or raise "
                     "MEMAUDIT_FLOAT_BUDGET (bytes) if a float32 copy fits")


def check_index(train, index: str) -> None:
    """The refusals training_index would make for `index` over `train`, without building it (for --dry-run):
    IVF cell counts out of range, a low-precision torch index over a uint8 store."""
    from memaudit.indexes import parse_index
    from memaudit.ivf import DEFAULT_NPROBE, checked_cells

    name, options = parse_index(index)
    if name == "ivf":
        checked_cells(int(train.shape[0]), options.get("nlist"), options.get("nprobe", DEFAULT_NPROBE))
    if name == "torch" and options.get("dtype", "fp32") != "fp32" and isinstance(train, ImageStore) \
            and train.is_bytes:
        raise _low_precision_refused(train, index)


def neighbours_needed(duplicates: Optional[Duplicates]) -> int:
    """How many neighbours the duplicate-aware ratio searches: enough to leave the largest cluster."""
    return 2 if duplicates is None else max(2, duplicates.max_size + 1)


def ratios(dist: Tensor, idx: Tensor, duplicates: Optional[Duplicates]) -> NNResult:
    """NNResult from sorted neighbour lists (at least neighbours_needed(duplicates) of them)."""
    d1, d2_plain = dist[:, 0], dist[:, 1]
    d2 = d2_plain if duplicates is None else distinct_second(dist, idx, duplicates.labels)[0]
    return NNResult(ratio=_ratio(d1, d2), d1=d1, d2=d2, nearest=idx[:, 0], ratio_plain=_ratio(d1, d2_plain),
                    d2_plain=d2_plain)


def nn_ratios(samples: Tensor, train: Tensor, features: Optional[FeatureSpace] = None,
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
    k = min(index.num_points, neighbours_needed(duplicates))
    dist, idx = index.search(embed(samples, features, batch_size), k)
    return ratios(dist, idx, duplicates)


def _ratio(d1: Tensor, d2: Tensor) -> Tensor:
    """d1 / d2, 0 where d2 = 0 (then d1 = 0 too: an exact copy)."""
    return torch.where(d2 > 0, d1 / torch.where(d2 > 0, d2, torch.ones_like(d2)), torch.zeros_like(d1))


def memorized(ratio: np.ndarray, threshold: float) -> Optional[float]:
    """Fraction of ratios below the threshold, non-finite ones counted as memorized (fail closed)."""
    if not len(ratio):
        return None
    return float(memorized_count(ratio, threshold) / len(ratio))


def memorized_count(ratio: np.ndarray, threshold: float) -> int:
    """How many ratios lie below the threshold, non-finite ones counted as memorized (fail closed)."""
    ratio = np.asarray(ratio, dtype=np.float64)
    return int(((ratio < threshold) | ~np.isfinite(ratio)).sum())


def section(ratio, d1, d2, nearest, threshold: float = NN_RATIO_THRESHOLD, bins: int = HISTOGRAM_BINS,
            worst: int = WORST_PAIRS, ratio_plain=None) -> dict:
    """The per-run "nn_ratio" section from per-sample arrays (length N each).

    ratio = d1 / d2 (nearest / second-nearest distinct training image); a sample is memorized when
    ratio < threshold. A non-finite ratio (NaN, inf) is never "not memorized": it counts as memorized.
    The histogram has `bins` equal bins over [0, 1]; "worst" lists the `worst` sample indices with the
    smallest ratios, ascending (ties by index). `ratio_plain` (d2 = second-nearest image, duplicates
    or not) gives memorized_fraction_plain. Each fraction has its 95 % Wilson interval (`_lower`, `_upper`)
    and its count (`_count`) beside it (memaudit.intervals).
    """
    r = np.asarray(ratio, dtype=np.float64).reshape(-1)
    d1 = np.asarray(d1, dtype=np.float64).reshape(-1)
    d2 = np.asarray(d2, dtype=np.float64).reshape(-1)
    nearest = np.asarray(nearest).reshape(-1)
    if not (len(r) == len(d1) == len(d2) == len(nearest)):
        raise ValueError("nn_ratio section: ratio, d1, d2 and nearest must have the same length")
    ok = np.isfinite(r)
    rf = r[ok]
    counts, edges = np.histogram(np.clip(rf, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    order = sorted(np.flatnonzero(ok).tolist(), key=lambda i: (r[i], i))
    plain = r if ratio_plain is None else np.asarray(ratio_plain, dtype=np.float64).reshape(-1)
    return {
        "memorized_fraction": memorized(r, threshold),
        "memorized_fraction_plain": memorized(plain, threshold),
        **interval_fields("memorized_fraction", r, threshold),
        **interval_fields("memorized_fraction_plain", plain, threshold),
        "num_samples": int(len(r)),
        "non_finite": int((~ok).sum()),
        "threshold": float(threshold),
        "mean": finite_or_none(rf.mean()) if len(rf) else None,
        "median": finite_or_none(np.median(rf)) if len(rf) else None,
        "min": finite_or_none(rf.min()) if len(rf) else None,
        "histogram": {"bin_edges": floats(edges), "counts": [int(c) for c in counts]},
        "samples": [
            {"index": i, "ratio": finite_or_none(r[i]), "d1": finite_or_none(d1[i]),
             "d2": finite_or_none(d2[i]), "nearest": int(nearest[i])}
            for i in range(len(r))
        ],
        "worst": order[:worst],
    }


def interval_fields(name: str, ratio: np.ndarray, threshold: float) -> dict:
    """The `_lower`, `_upper` and `_count` fields of the fraction `name` of ratios below `threshold`."""
    fields = fraction_fields(name, memorized_count(ratio, threshold), len(ratio))
    return {k: v for k, v in fields.items() if k != name}


def worst_pairs(nn: Mapping[str, Any], limit: int) -> list[dict]:
    """The section's worst samples (at most `limit`), each its per-sample entry."""
    by_index = {s["index"]: s for s in nn.get("samples") or []}
    return [by_index[i] for i in (nn.get("worst") or [])[:limit] if i in by_index]


class NNRatio(Metric):
    name = "nn_ratio"
    scope = RUN
    title = "Nearest-neighbour ratio"
    summary_keys = {
        "memorized_fraction": "max over runs of `nn_ratio.memorized_fraction`",
        "memorized_fraction_lower": "max over runs of `nn_ratio.memorized_fraction_lower` (95 % Wilson interval)",
        "memorized_fraction_upper": "max over runs of `nn_ratio.memorized_fraction_upper` (95 % Wilson interval; "
                                    "gate on it to bound the rate, e.g. `memorized_fraction_upper>0.01`)",
        "memorized_fraction_plain": "max over runs of `nn_ratio.memorized_fraction_plain` (d2 = second-nearest "
                                    "image, duplicates or not)",
        "min_nn_ratio": "min over runs of `nn_ratio.min`",
        "mean_nn_ratio": "mean ratio over all samples of all runs",
    }
    run_keys = {"memorized_fraction_{sampler}": "that run's `nn_ratio.memorized_fraction` (one key per run; the "
                                               "sampler name is lower-cased and characters other than `a-z 0-9 _` "
                                               "become `_`)"}
    columns = (Column("memorized fraction", lambda s: s.get("memorized_fraction"), percent=True),
               Column("mean NN ratio", lambda s: s.get("mean")),
               Column("min NN ratio", lambda s: s.get("min")))

    def compute(self, ctx: ScanContext, run: Optional[RunData] = None) -> dict:
        dist, idx = run.neighbours(ctx, neighbours_needed(ctx.duplicates))
        nn = ratios(dist, idx, ctx.duplicates)
        return section(nn.ratio, nn.d1, nn.d2, nn.nearest, threshold=ctx.config.threshold, ratio_plain=nn.ratio_plain)

    def cost(self, w, sampler=None):
        """One exact search of the samples (2 M d FLOPs a row)."""
        return w.search_rows(w.num_samples)

    def summarize(self, sections: Mapping[str, Mapping]) -> dict:
        out: dict[str, Optional[float]] = {key: None for key in self.summary_keys}
        fractions, mins, weighted = [], [], []
        for name in sorted(sections):
            nn = sections[name] or {}
            frac = finite_or_none(nn.get("memorized_fraction"))
            out[sampler_key("memorized_fraction_{sampler}", name)] = frac
            if frac is not None:
                fractions.append(frac)
            if finite_or_none(nn.get("min")) is not None:
                mins.append(float(nn["min"]))
            mean = finite_or_none(nn.get("mean"))
            if mean is not None:
                weighted.append((mean, max(len(finite(s.get("ratio") for s in nn.get("samples") or [])), 1)))
        out["memorized_fraction"] = max(fractions) if fractions else None
        for key in ("memorized_fraction_lower", "memorized_fraction_upper", "memorized_fraction_plain"):
            values = finite(nn.get(key) for nn in sections.values() if nn)
            out[key] = max(values) if values else None
        out["min_nn_ratio"] = min(mins) if mins else None
        if weighted:
            out["mean_nn_ratio"] = sum(m * w for m, w in weighted) / sum(w for _, w in weighted)
        return out

    def validate(self, nn: Any, c, where: str) -> None:
        c.dict(nn, where, ("memorized_fraction", "threshold", "mean", "median", "min", "histogram", "samples",
                           "worst"))
        c.fraction(nn["memorized_fraction"], f"{where}.memorized_fraction")
        for key in ("memorized_fraction_plain", "memorized_fraction_lower", "memorized_fraction_upper",
                    "memorized_fraction_plain_lower", "memorized_fraction_plain_upper"):
            if key in nn:
                c.fraction(nn[key], f"{where}.{key}")
        lo, hi, frac = (nn.get(k) for k in ("memorized_fraction_lower", "memorized_fraction_upper",
                                           "memorized_fraction"))
        if None not in (lo, hi, frac) and not lo - 1e-12 <= frac <= hi + 1e-12:
            c.fail(f"{where}.memorized_fraction", f"= {frac} lies outside its interval [{lo}, {hi}]")
        c.num(nn["threshold"], f"{where}.threshold")
        for key in ("mean", "median", "min"):
            c.num(nn[key], f"{where}.{key}", nullable=True)
        hist = c.dict(nn["histogram"], f"{where}.histogram", ("bin_edges", "counts"))
        edges = c.nums(hist["bin_edges"], f"{where}.histogram.bin_edges")
        counts = c.list(hist["counts"], f"{where}.histogram.counts")
        if len(edges) != len(counts) + 1:
            c.fail(f"{where}.histogram", f"needs len(bin_edges) == len(counts) + 1, got {len(edges)} and "
                                         f"{len(counts)}")
        for i, n in enumerate(counts):
            c.int(n, f"{where}.histogram.counts[{i}]", minimum=0)
        indices = set()
        for i, s in enumerate(c.list(nn["samples"], f"{where}.samples")):
            sw = f"{where}.samples[{i}]"
            c.dict(s, sw, ("index", "ratio", "d1", "d2", "nearest"))
            indices.add(c.int(s["index"], f"{sw}.index", minimum=0))
            for key in ("ratio", "d1", "d2"):
                c.num(s[key], f"{sw}.{key}", nullable=True)
            c.int(s["nearest"], f"{sw}.nearest", minimum=0)
        for i, idx in enumerate(c.list(nn["worst"], f"{where}.worst")):
            c.int(idx, f"{where}.worst[{i}]", minimum=0)
            if idx not in indices:
                c.fail(f"{where}.worst[{i}]", f"names sample {idx}, which is not in {where}.samples")

    def lines(self, report: Mapping) -> list[str]:
        threshold = next((s.get("threshold") for s in self.sections(report).values()), None)
        if threshold is None:
            return []
        return [f"memorized = nearest/second-nearest training distance ratio < {fmt(threshold)}"]

    def evidence(self, run: str, nn: Mapping) -> list:
        out: list = [Note(f"memorized fraction {fmt(nn.get('memorized_fraction'))} (95 % Wilson interval "
                          f"[{fmt(nn.get('memorized_fraction_lower'))}, {fmt(nn.get('memorized_fraction_upper'))}]"
                          f", threshold {fmt(nn.get('threshold'))})")]
        hist = nn.get("histogram") or {}
        if hist.get("counts"):
            out.append(Histogram(f"NN ratio histogram ({run})", hist["bin_edges"], hist["counts"], nn.get("threshold")))
        pairs = worst_pairs(nn, WORST_PAIRS)
        if pairs:
            out.append(PairGrid("Worst pairs: sample | nearest training image", [p["index"] for p in pairs],
                                [p["nearest"] for p in pairs], ["row", "sample", "NN ratio", "nearest training image",
                                                                "d1", "d2"],
                                [(k + 1, p["index"], fmt(p.get("ratio")), p["nearest"], fmt(p.get("d1")),
                                  fmt(p.get("d2"))) for k, p in enumerate(pairs)], file="worst"))
        return out


METRIC = NNRatio()
