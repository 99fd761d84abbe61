"""What a metric is: one object that owns its whole life cycle, listed once in memaudit.metrics.METRICS.

A metric computes its report section (one per sampler run, or one per scan), derives its gateable summary
numbers, checks its section when a report is validated, and declares how it is shown (table columns, summary
lines, plots, per-run evidence) in a small vocabulary the renderers in memaudit.report draw. Adding a metric is
a new module with one Metric subclass, a line in METRICS and its test (torch-fidelity's metric_*.py plus
registry.py are the model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from memaudit.validation import Check

RUN, SCAN = "run", "scan"


@dataclass(frozen=True)
class Column:
    """A column of the per-sampler table: header and the cell value from the run's section."""

    header: str
    value: Callable[[Mapping], Any]
    digits: int = 4
    percent: bool = False  # also show the value as a percentage


@dataclass(frozen=True)
class Series:
    """One line of a plot; `run` (a sampler name or None) picks its colour."""

    label: str
    x: Sequence[Any]
    y: Sequence[Any]
    run: Optional[str] = None
    dash: bool = False
    color: Optional[str] = None  # a fixed colour (else the run's, else the next of the palette)


@dataclass(frozen=True)
class Plot:
    """A line plot over sigma (log x axis); plots of several metrics with the same title are drawn as one."""

    title: str
    ylabel: str
    series: Sequence[Series]
    logy: bool = False
    include_y: Sequence[float] = ()


@dataclass(frozen=True)
class Histogram:
    title: str
    bin_edges: Sequence[float]
    counts: Sequence[int]
    threshold: Optional[float] = None
    xlabel: str = "NN ratio d1/d2"


@dataclass(frozen=True)
class PairGrid:
    """Sample | training image pairs of one run, with a table row per pair; drawn as <file>_<run>.png."""

    title: str
    sample_indices: Sequence[int]
    train_indices: Sequence[int]
    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]
    file: str = "pairs"


@dataclass(frozen=True)
class Note:
    """A sentence under a run's heading."""

    text: str


@dataclass
class RunData:
    """One sampler run as the metrics see it: its samples, trajectories (emptied once its run metrics are done:
    scan-level metrics do not read them) and a cache of neighbour searches."""

    sampler: str
    samples: Tensor
    trajectories: list
    _neighbours: dict = field(default_factory=dict)
    labels: Optional[Tensor] = None  # (N,) class of each sample of a class-conditional model (else None)

    def neighbours(self, ctx: "ScanContext", k: int) -> tuple[Tensor, Tensor]:
        """Distances and indices of each sample's k nearest training images (in the scan's feature space),
        searched once for the largest k any metric asks for."""
        k = min(k, ctx.index.num_points)
        if "k" not in self._neighbours or self._neighbours["k"] < k:
            from memaudit.indexes import is_approximate

            dist, idx = ctx.map_rows("neighbours", (self.samples,), (k,), local=is_approximate(ctx.config.index))
            self._neighbours = {"k": k, "dist": dist, "idx": idx}
        return self._neighbours["dist"][:, :k], self._neighbours["idx"][:, :k]


@dataclass
class ScanContext:
    """Everything a metric may read: the model, the empirical denoiser of the training set, the training set,
    the scan settings, the feature space and neighbour index, near-duplicate clusters, every run's samples,
    the noise levels of the scan-level metrics, a shared generator (drawn from in METRICS order), a progress
    task factory, the held-out real images (or None), a cache the metrics share, and for a class-conditional
    model the training images' class labels and class names (memaudit.conditioning)."""

    model: Any
    empirical: Any
    train: Tensor
    config: Any
    features: Any
    index: Any
    duplicates: Any
    runs: dict[str, RunData]
    sigmas: list[float]
    generator: torch.Generator
    task: Callable[[str, int], Callable[..., None]]
    holdout: Optional[Tensor] = None  # held-out real images (scan --holdout), in [-1, 1] like `train`
    cache: dict = field(default_factory=dict)  # per-scan results metrics share (e.g. indexes they build once)
    labels: Optional[Tensor] = None  # (M,) class of each training image, for a class-conditional scan
    class_names: Optional[list] = None

    def map_rows(self, name: str, rows: Sequence[Tensor], args: tuple = (), local: bool = False):
        """Row work memaudit.shared_rows.ROW_WORK[name] over `rows`, in the scan's blocks (shared among torchrun
        ranks unless `local`)."""
        from memaudit.shared_rows import map_rows

        return map_rows(self, name, rows, args, self.config.batch_size, local)


class Metric:
    """Base class; subclasses set the class attributes and override what they need."""

    name: str = ""  # its section name, and the name --skip takes
    scope: str = RUN  # RUN: one section per sampler under runs.<sampler>; SCAN: one top-level section
    title: str = ""
    needs_trajectories: bool = False
    summary_keys: Mapping[str, str] = {}  # gateable key -> how it is derived (docs/report-schema.md)
    run_keys: Mapping[str, str] = {}  # per-run keys with "{sampler}" in the name, e.g. memorized_fraction_{sampler}
    columns: Sequence[Column] = ()

    def compute(self, ctx: ScanContext, run: Optional[RunData] = None) -> Any:
        """The report section: of one run (scope RUN) or of the scan (scope SCAN)."""
        raise NotImplementedError

    def cost(self, workload: Any, sampler: Optional[str] = None) -> Any:
        """Its work for the --dry-run cost model (memaudit.cost.Work) in one run of `sampler` (scope RUN) or in
        the scan (SCAN); the default is negligible work."""
        from memaudit.cost import Work

        return Work()

    def summarize(self, sections: Any) -> dict[str, Optional[float]]:
        """Gateable numbers from the sections: {sampler: section} (scope RUN) or the section (scope SCAN);
        keys are those of summary_keys and run_keys with {sampler} filled in."""
        return {}

    def validate(self, section: Any, check: Check, where: str) -> None:
        """Raise ValueError (through `check`) at the first malformed field of the section."""

    def lines(self, report: Mapping) -> list[str]:
        """One-line statements for the terminal and the reports (e.g. 'FID proxy: 0.34 - ...')."""
        return []

    def plots(self, report: Mapping) -> list[Plot]:
        """Plots over sigma drawn from the report."""
        return []

    def evidence(self, run: str, section: Mapping) -> list:
        """Per-run figures (Histogram, PairGrid) drawn under that run's heading."""
        return []

    def sections(self, report: Mapping) -> dict:
        """This metric's sections in a report: {sampler: section} for RUN scope, the section (or None)."""
        if self.scope == RUN:
            return {name: run[self.name] for name, run in (report.get("runs") or {}).items()
                    if run and self.name in run}
        return report.get(self.name)


def sampler_key(template: str, sampler: str) -> str:
    """A per-run summary key: the template with {sampler} as the lower-cased name, [^a-z0-9_] -> '_'."""
    import re

    return template.format(sampler=re.sub(r"[^a-z0-9_]", "_", sampler.lower()))
