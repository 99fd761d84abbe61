"""Tiled distances for partial copies (Carlini et al. 2023, "Extracting Training Data from Diffusion Models").

The image is cut into a g x g grid of tiles (g = min(4, H // 4, W // 4), at least 1: Carlini's 4 x 4 grid of
128-pixel tiles on 512 x 512 images; 2 x 2 on 8 x 8 digits). Two numbers per sample, in pixels ([-1, 1]):

  * Carlini's tiled L2 (his Sec. 4.2.1), reported as defined: max over tiles p of the normalized L2
    ||x_p - y_p|| / sqrt(|p|) to the sample's nearest training image y (nearest in the scan's feature space).
    Small only when EVERY tile matches, so it confirms whole copies; it cannot see a partial one.
  * The partial-copy ratio this metric gates on (memaudit's, not Carlini's): min over tiles p of the tile's
    duplicate-aware NN ratio r_p = d1_p / d2_p, d_j = L2 from tile p of the sample to tile p of the j-th nearest
    training image (d2 to the nearest image of another near-duplicate cluster). A sample is a partial copy when
    min_p r_p < threshold (1/3, the NN-ratio rule applied per tile). A tile that several distinct training images
    share exactly (d2_p = 0, e.g. blank background) is no evidence: r_p = 1 there.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from memaudit.duplicates import distinct_second
from memaudit.intervals import fraction_fields
from memaudit.metrics.base import RUN, Column, Metric, Note, PairGrid, RunData, ScanContext
from memaudit.metrics.nn_ratio import WORST_PAIRS, memorized_count, neighbours_needed
from memaudit.neighbors import NeighborIndex
from memaudit.storage import ImageStore
from memaudit.numbers import finite, finite_or_none, fmt

KEY = "tiled_memorized_fraction"


def tile_grid(height: int, width: int) -> int:
    """Tiles per side: min(4, H // 4, W // 4), at least 1."""
    return max(1, min(4, height // 4, width // 4))


def tile_bounds(size: int, grid: int) -> list[tuple[int, int]]:
    """`grid` contiguous [start, stop) ranges covering 0..size (sizes differ by at most one pixel)."""
    edges = [round(i * size / grid) for i in range(grid + 1)]
    return list(zip(edges[:-1], edges[1:]))


def tiles(images: Tensor, grid: int) -> list[Tensor]:
    """The g*g tiles of (N, C, H, W) images, row-major, each flattened to (N, C*h*w)."""
    h, w = images.shape[-2:]
    return [images[..., y0:y1, x0:x1].reshape(images.shape[0], -1)
            for y0, y1 in tile_bounds(h, grid) for x0, x1 in tile_bounds(w, grid)]


def carlini_tiled_l2(samples: Tensor, nearest: Tensor, grid: int) -> Tensor:
    """max_p ||x_p - y_p|| / sqrt(|p|) per pair (sample, its nearest training image), float64."""
    per_tile = [(a.double() - b.double()).norm(dim=1) / max(a.shape[1], 1) ** 0.5
                for a, b in zip(tiles(samples, grid), tiles(nearest, grid))]
    return torch.stack(per_tile, 1).max(1).values


def tile_indexes(ctx: ScanContext, grid: int) -> list[NeighborIndex]:
    """One neighbour index per tile position of the training images (built once per scan)."""
    key = ("tiled_l2", grid)
    if key not in ctx.cache:
        ctx.cache[key] = (tile_stores(ctx.train, grid) if isinstance(ctx.train, ImageStore) and ctx.train.is_bytes
                          else [NeighborIndex(t) for t in tiles(ctx.train.detach().cpu().float(), grid)])
    return ctx.cache[key]


def tile_stores(train: ImageStore, grid: int) -> list:
    """Per tile position, an exact index over that tile of a uint8 store (a view of its bytes: no copy)."""
    from memaudit.torch_index import TorchIndex

    h, w = train.shape[-2:]
    return [TorchIndex(ImageStore(train.raw[:, :, y0:y1, x0:x1]), device=train.device)
            for y0, y1 in tile_bounds(h, grid) for x0, x1 in tile_bounds(w, grid)]


def tile_ratios(samples: Tensor, indexes: list[NeighborIndex], grid: int, labels: np.ndarray,
                k: int) -> tuple[Tensor, Tensor]:
    """(N, g*g) duplicate-aware NN ratios per tile (1 where d2 = 0) and the nearest training image per tile."""
    ratios, nearest = [], []
    for index, part in zip(indexes, tiles(samples.detach().cpu().float(), grid)):
        dist, idx = index.search(part, min(k, index.num_points))
        d2, _ = distinct_second(dist, idx, labels)
        d1 = dist[:, 0].double()
        d2 = d2.double()
        ratios.append(torch.where(d2 > 0, d1 / torch.where(d2 > 0, d2, torch.ones_like(d2)), torch.ones_like(d1)))
        nearest.append(idx[:, 0])
    return torch.stack(ratios, 1), torch.stack(nearest, 1)


class TiledL2(Metric):
    name = "tiled_l2"
    scope = RUN
    title = "Tiled distances: partial copies (after Carlini et al. 2023)"
    summary_keys = {
        KEY: "max over runs of `tiled_l2.memorized_fraction`: samples with a tile whose NN ratio d1/d2 < the "
             "threshold (a partial copy)",
        f"{KEY}_upper": "max over runs of `tiled_l2.memorized_fraction_upper` (95 % Wilson interval)",
        "carlini_tiled_l2_min": "min over runs and samples of Carlini's tiled L2 (max over tiles of the normalized "
                                "L2 to the nearest training image; pixels in [-1, 1])",
    }
    columns = (Column("partial copies (tiles)", lambda s: s.get("memorized_fraction"), percent=True),)

    def compute(self, ctx: ScanContext, run: Optional[RunData] = None) -> dict:
        samples = run.samples.detach().cpu().float()
        grid = tile_grid(*samples.shape[-2:])
        labels = ctx.duplicates.labels if ctx.duplicates is not None else np.arange(ctx.train.shape[0])
        ratio, nearest = tile_ratios(samples, tile_indexes(ctx, grid), grid, labels,
                                     neighbours_needed(ctx.duplicates))
        best = ratio.argmin(1)
        rows = torch.arange(len(samples))
        score = ratio[rows, best].numpy()
        train_nn = run.neighbours(ctx, 1)[1][:, 0]
        carlini = carlini_tiled_l2(samples, ctx.train[train_nn].detach().cpu().float(), grid).numpy()
        threshold = float(ctx.config.threshold)
        n = len(score)
        order = sorted(range(n), key=lambda i: (score[i] if np.isfinite(score[i]) else -1.0, i))
        return {"grid": grid, "threshold": threshold, "num_samples": n,
                **fraction_fields("memorized_fraction", memorized_count(score, threshold), n),
                "carlini_min": finite_or_none(carlini.min()) if n else None,
                "samples": [{"index": i, "tile_ratio": finite_or_none(score[i]), "tile": int(best[i]),
                             "tile_nearest": int(nearest[i, best[i]]), "carlini_tiled_l2": finite_or_none(carlini[i]),
                             "nearest": int(train_nn[i])} for i in range(n)],
                "worst": order[:WORST_PAIRS]}

    def cost(self, w, sampler=None):
        """One search per tile position: the tiles together are d wide, so about one full search."""
        return w.search_rows(w.num_samples)

    def summarize(self, sections: Mapping[str, Mapping]) -> dict:
        def pick(field, how):
            values = finite(s.get(field) for s in sections.values() if s)
            return how(values) if values else None
        return {KEY: pick("memorized_fraction", max), f"{KEY}_upper": pick("memorized_fraction_upper", max),
                "carlini_tiled_l2_min": pick("carlini_min", min)}

    def validate(self, section, c, where: str) -> None:
        c.dict(section, where, ("grid", "threshold", "num_samples", "memorized_fraction", "memorized_fraction_lower",
                                "memorized_fraction_upper", "carlini_min", "samples", "worst"))
        grid = c.int(section["grid"], f"{where}.grid", minimum=1)
        for key in ("memorized_fraction", "memorized_fraction_lower", "memorized_fraction_upper"):
            c.fraction(section[key], f"{where}.{key}")
        c.num(section["carlini_min"], f"{where}.carlini_min", nullable=True)
        for i, s in enumerate(c.list(section["samples"], f"{where}.samples")):
            sw = f"{where}.samples[{i}]"
            c.dict(s, sw, ("index", "tile_ratio", "tile", "tile_nearest", "carlini_tiled_l2", "nearest"))
            c.num(s["tile_ratio"], f"{sw}.tile_ratio", nullable=True)
            if not 0 <= c.int(s["tile"], f"{sw}.tile", minimum=0) < grid * grid:
                c.fail(f"{sw}.tile", f"must be below {grid * grid} (a {grid} x {grid} grid)")

    def evidence(self, run: str, section: Mapping) -> list:
        by_index = {s["index"]: s for s in section.get("samples") or []}
        worst = [by_index[i] for i in section.get("worst") or [] if i in by_index][:8]
        out: list = [Note(f"partial copies ({section.get('grid')} x {section.get('grid')} tiles, a tile's NN ratio < "
                          f"{fmt(section.get('threshold'))}): {fmt(section.get('memorized_fraction'))} "
                          f"[{fmt(section.get('memorized_fraction_lower'))}, "
                          f"{fmt(section.get('memorized_fraction_upper'))}]; Carlini's tiled L2 (max over tiles) "
                          f"min {fmt(section.get('carlini_min'))}")]
        if worst:
            out.append(PairGrid("Partial copies: sample | training image of its closest tile",
                                [w["index"] for w in worst], [w["tile_nearest"] for w in worst],
                                ["sample", "tile", "tile NN ratio", "training image", "Carlini tiled L2"],
                                [(w["index"], w["tile"], fmt(w["tile_ratio"]), w["tile_nearest"],
                                  fmt(w["carlini_tiled_l2"])) for w in worst], file="tiles"))
        return out


METRIC = TiledL2()
