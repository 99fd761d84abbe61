"""The recall of an approximate neighbour index (scan --index ivf) against exact search, on the scan's own samples.

For up to RECALL_QUERIES samples of each run: the k neighbours the index returns (nprobe cells) and the exact k
(every cell scanned, memaudit.ivf.IVFIndex.exhaustive).  recall_at_1: share of queries whose nearest training
image was found (its distance matched to 1e-6); recall_at_k: mean share of the exact top k found; agreement:
share whose memorized / not-memorized verdict (duplicate-aware NN ratio < threshold) is the same both ways.
A missed neighbour can only raise d1, so an approximate index undercounts copies: the scan fails when
recall_at_1 is below --min-recall (an automatic gate `index_recall<MIN`).
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from memaudit.cost import Work
from memaudit.features import embed
from memaudit.metrics.base import SCAN, Metric, RunData, ScanContext
from memaudit.metrics.nn_ratio import neighbours_needed, ratios
from memaudit.numbers import finite, fmt

RECALL_QUERIES = 256
MATCH_RTOL = 1e-6


def recall_of(index, queries, k: int, duplicates, threshold: float) -> dict:
    """recall_at_1, recall_at_k, verdict agreement of index.search against index.exhaustive() on `queries`."""
    approx_d, approx_i = index.search(queries, k)
    with index.exhaustive():
        exact_d, exact_i = index.search(queries, k)
    found = approx_d[:, 0].double() <= exact_d[:, 0].double() * (1 + MATCH_RTOL) + 1e-12
    overlap = [len(set(a.tolist()) & set(e.tolist())) / k for a, e in zip(approx_i, exact_i)]
    memorized = [np.asarray(ratios(d, i, duplicates).ratio) < threshold
                 for d, i in ((approx_d, approx_i), (exact_d, exact_i))]
    return {"queries": int(queries.shape[0]), "k": int(k), "recall_at_1": float(found.double().mean()),
            "recall_at_k": float(np.mean(overlap)), "agreement": float(np.mean(memorized[0] == memorized[1])),
            "memorized_fraction_approx": float(memorized[0].mean()),
            "memorized_fraction_exact": float(memorized[1].mean())}


class IndexRecall(Metric):
    name = "index_recall"
    scope = SCAN
    title = "Approximate index recall"
    summary_keys = {"index_recall": "min over runs of `index_recall.runs.<sampler>.recall_at_1` (only with an "
                                    "approximate --index: ivf, torch:dtype=bf16|fp16; the scan adds the gate "
                                    "`index_recall<--min-recall`)"}

    def compute(self, ctx: ScanContext, run: Optional[RunData] = None) -> Optional[dict]:
        if not getattr(ctx.index, "approximate", False):
            return None  # exact search: nothing to measure
        k = min(ctx.index.num_points, neighbours_needed(ctx.duplicates))
        runs = {name: recall_of(ctx.index, embed(r.samples[:RECALL_QUERIES], ctx.features), k, ctx.duplicates,
                                ctx.config.threshold) for name, r in ctx.runs.items()}
        return {"index": ctx.index.describe(), "runs": runs}

    def cost(self, w, sampler=None):
        """Exhaustive (exact) search of up to RECALL_QUERIES samples per run, with --index ivf."""
        return (w.search_rows(min(w.num_samples, RECALL_QUERIES) * len(w.samplers)) if w.extra.get("approximate")
                else Work())

    def summarize(self, section: Optional[Mapping]) -> dict:
        values = finite(r.get("recall_at_1") for r in ((section or {}).get("runs") or {}).values())
        return {"index_recall": min(values) if values else None}

    def validate(self, section, c, where: str) -> None:
        section = c.dict(section, where, ("index", "runs"))
        for name, r in c.dict(section["runs"], f"{where}.runs").items():
            for key in ("recall_at_1", "recall_at_k", "agreement", "memorized_fraction_approx",
                        "memorized_fraction_exact"):
                c.fraction(r[key], f"{where}.runs.{name}.{key}")

    def lines(self, report: Mapping) -> list[str]:
        section = self.sections(report)
        if not section:
            return []
        ix = section["index"]
        how = (f"nprobe {ix['nprobe']} of {ix['nlist']} cells" if "nlist" in ix else
               f"{ix.get('dtype')} GEMMs, candidates re-checked in float32")
        parts = [f"{name}: recall@1 {fmt(r['recall_at_1'])}, verdicts agree {fmt(r['agreement'])} "
                 f"({r['queries']} samples)" for name, r in section["runs"].items()]
        return [f"index {ix['kind']} ({how}) vs exact search: " + "; ".join(parts)]


METRIC = IndexRecall()
