"""Per-training-image attribution: which training images the samples reproduce, and how often.

A sample reproduces training image i when its (duplicate-aware) NN ratio d1/d2 < threshold and i is its nearest
training image (the nn_ratio rule, Yoon et al. 2023 / Gu et al. 2023); near-duplicates count as one image (their
cluster, named by its first member, memaudit.duplicates). Entries are sorted by risk: copies (descending), then
the closest copy's ratio, then the index. What a data owner or a legal reviewer asks first (anchors-mission §4.1).
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from memaudit.metrics.base import RUN, Column, Metric, Note, PairGrid, RunData, ScanContext
from memaudit.metrics.nn_ratio import neighbours_needed, ratios
from memaudit.numbers import finite, finite_or_none, fmt

SHOWN = 16  # entries drawn in the grid
SAMPLES_PER_ENTRY = 8  # nearest samples listed per training image


def attribute(ratio: np.ndarray, nearest: np.ndarray, labels: np.ndarray, threshold: float) -> list[dict]:
    """Entries {train_index, cluster_size, count, samples (closest first), min_ratio, nearest_train} per reproduced
    training image (cluster), sorted by count descending, then min ratio, then index."""
    ratio = np.asarray(ratio, dtype=np.float64)
    copied = (ratio < threshold) | ~np.isfinite(ratio)
    sizes = np.bincount(labels)
    groups: dict[int, list[int]] = {}
    for i in np.flatnonzero(copied).tolist():
        groups.setdefault(int(labels[nearest[i]]), []).append(i)
    entries = []
    for label, members in groups.items():
        members.sort(key=lambda i: (ratio[i] if np.isfinite(ratio[i]) else -1.0, i))
        entries.append({"train_index": label, "cluster_size": int(sizes[label]), "count": len(members),
                        "samples": members[:SAMPLES_PER_ENTRY], "min_ratio": finite_or_none(ratio[members[0]]),
                        "nearest_train": int(nearest[members[0]])})
    entries.sort(key=lambda e: (-e["count"], e["min_ratio"] if e["min_ratio"] is not None else -1.0,
                                e["train_index"]))
    return entries


class Attribution(Metric):
    name = "attribution"
    scope = RUN
    title = "Reproduced training images"
    summary_keys = {
        "distinct_reproduced": "max over runs of `attribution.distinct_reproduced`: distinct training images (near-"
                               "duplicate clusters) that some sample copies (NN ratio below the threshold)",
        "max_copies_per_image": "max over runs of the copies of the most copied training image",
    }
    columns = (Column("training images reproduced", lambda s: s.get("distinct_reproduced"), digits=6),)

    def compute(self, ctx: ScanContext, run: Optional[RunData] = None) -> dict:
        dist, idx = run.neighbours(ctx, neighbours_needed(ctx.duplicates))
        nn = ratios(dist, idx, ctx.duplicates)
        labels = ctx.duplicates.labels if ctx.duplicates is not None else np.arange(ctx.index.num_points)
        entries = attribute(nn.ratio.numpy(), nn.nearest.numpy(), labels, float(ctx.config.threshold))
        return {"threshold": float(ctx.config.threshold), "num_samples": int(len(nn.ratio)),
                "num_training_images": int(ctx.index.num_points), "distinct_reproduced": len(entries),
                "copying_samples": int(sum(e["count"] for e in entries)), "images": entries}

    def summarize(self, sections: Mapping[str, Mapping]) -> dict:
        distinct = finite(s.get("distinct_reproduced") for s in sections.values() if s)
        most = finite(max((e["count"] for e in s.get("images") or []), default=0) for s in sections.values() if s)
        return {"distinct_reproduced": max(distinct) if distinct else None,
                "max_copies_per_image": max(most) if most else None}

    def validate(self, section, c, where: str) -> None:
        c.dict(section, where, ("threshold", "num_samples", "distinct_reproduced", "copying_samples", "images"))
        c.int(section["distinct_reproduced"], f"{where}.distinct_reproduced", minimum=0)
        images = c.list(section["images"], f"{where}.images")
        if len(images) != section["distinct_reproduced"]:
            c.fail(f"{where}.distinct_reproduced", f"is {section['distinct_reproduced']} but images lists {len(images)}")
        for i, e in enumerate(images):
            ew = f"{where}.images[{i}]"
            c.dict(e, ew, ("train_index", "cluster_size", "count", "samples", "min_ratio", "nearest_train"))
            c.int(e["train_index"], f"{ew}.train_index", minimum=0)
            c.int(e["count"], f"{ew}.count", minimum=1)
            for j, s in enumerate(c.list(e["samples"], f"{ew}.samples")):
                c.int(s, f"{ew}.samples[{j}]", minimum=0)

    def evidence(self, run: str, section: Mapping) -> list:
        images = section.get("images") or []
        out: list = [Note(f"{section.get('copying_samples', 0)} of {section.get('num_samples')} samples copy "
                          f"{section.get('distinct_reproduced', 0)} distinct training images (of "
                          f"{section.get('num_training_images')})")]
        shown = images[:SHOWN]
        if shown:
            out.append(PairGrid("Reproduced training images, most copied first: closest sample | training image",
                                [e["samples"][0] for e in shown], [e["nearest_train"] for e in shown],
                                ["rank", "training image", "copies", "near-duplicates", "closest samples",
                                 "closest NN ratio"],
                                [(k + 1, e["train_index"], e["count"], e["cluster_size"],
                                  ", ".join(map(str, e["samples"])), fmt(e["min_ratio"])) for k, e in enumerate(shown)],
                                file="attribution"))
        return out


METRIC = Attribution()
