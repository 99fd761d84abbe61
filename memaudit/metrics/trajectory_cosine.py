"""Score-cosine deviation along the sampling trajectories: 1 - cos(D(x,s) - x, D*(x,s) - x) at the points the
sampler visits, from the model's own recorded D(x) (see memaudit.metrics.score_cosine for the quantity)."""

from __future__ import annotations

from typing import Mapping, Optional

from memaudit.metrics.base import RUN, Metric, Plot, RunData, ScanContext, Series
from memaudit.metrics.score_cosine import COSINE_PLOT, COSINE_YLABEL, cosine_on_trajectories, validate_curve


class TrajectoryCosine(Metric):
    name = "trajectory_cosine"
    scope = RUN
    title = "Score-cosine deviation along the trajectories"
    needs_trajectories = True

    def compute(self, ctx: ScanContext, run: Optional[RunData] = None) -> dict:
        return cosine_on_trajectories(ctx.empirical, run.trajectories,
                                      lambda x, d, sigma: ctx.map_rows("empirical_cosine", (x, d), (float(sigma),)))

    def validate(self, section, c, where: str) -> None:
        validate_curve(section, c, where)

    def cost(self, w, sampler=None):
        """D* (two GEMMs) at every recorded step."""
        return w.empirical_rows(w.record * w.steps)

    def plots(self, report: Mapping) -> list[Plot]:
        sections = self.sections(report)
        series = [Series(f"{name} trajectory", sections[name]["sigmas"], sections[name]["mean"], run=name)
                  for name in sorted(sections)]
        return [Plot(COSINE_PLOT, COSINE_YLABEL, series, include_y=(0.0,))] if series else []


METRIC = TrajectoryCosine()
