"""Meehan et al.'s data-copying statistic C_T per sampler run (AISTATS 2020; computed as dgm-eval does, see
memaudit.copying): Z-scored Mann-Whitney U of the generated vs held-out NN-to-train distances in k-means cells
of the PCA-64 training features, weighted by the held-out share of each cell. C_T << 0 = copying (gate e.g.
`ct_score<-3`); ~0 for a model that generalizes. Needs `scan --holdout DATA2`; without it the section says so
and its gate fails."""

from __future__ import annotations

from typing import Mapping, Optional

from memaudit.copying import CELLS, MIN_CELL_SAMPLES, c_t
from memaudit.features import embed
from memaudit.metrics.base import RUN, Column, Metric, RunData, ScanContext
from memaudit.numbers import finite, finite_or_none


class CTScore(Metric):
    name = "ct_score"
    scope = RUN
    title = "Data-copying test C_T (Meehan et al. 2020)"
    summary_keys = {"ct_score": "min over runs of `ct_score.ct` (Meehan's C_T; << 0 = copying; needs --holdout)"}
    columns = (Column("C_T", lambda s: s.get("ct")),)

    def compute(self, ctx: ScanContext, run: Optional[RunData] = None) -> dict:
        if ctx.holdout is None:
            return {"computed": False, "ct": None, "reason": "needs held-out real images: pass --holdout DATA2"}
        if "train_emb" not in ctx.cache:
            ctx.cache["train_emb"] = embed(ctx.train, ctx.features).numpy()
        if "holdout_emb" not in ctx.cache:
            ctx.cache["holdout_emb"] = embed(ctx.holdout, ctx.features).numpy()
        result = c_t(ctx.cache["train_emb"], ctx.cache["holdout_emb"], embed(run.samples, ctx.features).numpy(),
                     seed=ctx.config.seed)
        reason = None if result.ct is not None else (f"no cell holds more than {MIN_CELL_SAMPLES} samples and held-out "
                                                     "images: draw more samples")
        return {"computed": result.ct is not None, "ct": finite_or_none(result.ct), "cells": result.cells,
                "num_cells": CELLS, "min_cell_samples": MIN_CELL_SAMPLES, **({"reason": reason} if reason else {})}

    def cost(self, w, sampler=None):
        """With held-out images: searches of the samples and the held-out set."""
        return w.search_rows(w.num_samples + w.holdout) if w.holdout else w.search_rows(0)

    def summarize(self, sections: Mapping[str, Mapping]) -> dict:
        values = finite(s.get("ct") for s in sections.values() if s)
        return {"ct_score": min(values) if values else None}

    def validate(self, section, c, where: str) -> None:
        c.dict(section, where, ("computed", "ct"))
        c.bool(section["computed"], f"{where}.computed")
        c.num(section["ct"], f"{where}.ct", nullable=True)
        if section["computed"] and section["ct"] is None:
            c.fail(f"{where}.ct", "is null although computed is true")


METRIC = CTScore()
