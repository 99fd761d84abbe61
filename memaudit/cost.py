"""The cost model behind `memaudit scan --dry-run`: predicted FLOPs, model evaluations, seconds and memory per phase.

Each phase's work is counted in two units: FLOPs of the dense algebra over the training set (one empirical
denoiser row D*(x) is two GEMM rows, 4 M d FLOPs; one exact neighbour-search row 2 M d), and rows through the
model (sampling, score cosine, the Jacobian).  Seconds = FLOPs / (this machine's measured GEMM rate) + model rows x
(the model's measured seconds per row); a closed-form (empirical) model's rows are FLOPs instead.  The metrics
state their own work (Metric.cost), the samplers their evaluations per step (Sampler.evals): adding either adds
its cost here.  What it leaves out (image decoding, clean-fid's Inception, Python overhead) is why it is a plan,
not a promise: it is checked against measured phase times in benchmarks/dry_run.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from memaudit.sampling import SAMPLERS

BENCH_SECONDS = 0.15  # how long each rate measurement runs
CHUNK = 4096  # training rows per empirical-denoiser chunk (memaudit.empirical.DEFAULT_CHUNK)


@dataclass
class Work:
    """FLOPs of dense algebra and rows through the model; adds up."""

    flops: float = 0.0
    model_rows: float = 0.0
    jacobian_rows: float = 0.0  # rows of one J^T J power-iteration product through a network
    eigh_flops: float = 0.0  # 6 n^3 per symmetric eigendecomposition (float64), which runs far below GEMM speed

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.model_rows + other.model_rows,
                    self.jacobian_rows + other.jacobian_rows, self.eigh_flops + other.eigh_flops)


@dataclass
class Workload:
    """The sizes a scan's cost depends on: training images M of dimension d, samples n per sampler, and the
    scan settings (steps, recorded trajectories, metric points and noise levels)."""

    num_train: int
    dim: int
    num_samples: int
    samplers: Sequence[str]
    steps: int
    record: int
    cosine_points: int
    jacobian_points: int
    jacobian_iters: int
    metric_sigmas: int
    topk: int
    batch_size: int
    empirical_model: bool
    holdout: int = 0
    match_transforms: int = 1
    bytes_per_value: int = 4  # 1 when the training set stays uint8 (memaudit.storage): no float copy, no index copy
    extra: dict = field(default_factory=dict)

    def search_rows(self, rows: float, k: int = 2) -> Work:
        """Exact neighbour search of `rows` queries against the training set: 2 M d FLOPs each."""
        return Work(flops=2.0 * rows * self.num_train * self.dim)

    def empirical_rows(self, rows: float) -> Work:
        """`rows` evaluations of the empirical denoiser D*: two GEMMs, 4 M d FLOPs each."""
        return Work(flops=4.0 * rows * self.num_train * self.dim)

    def model_rows(self, rows: float) -> Work:
        """`rows` evaluations of the model (FLOPs for a closed-form model, model rows for a network)."""
        return self.empirical_rows(rows) if self.empirical_model else Work(model_rows=rows)

    def evals(self, sampler: str) -> int:
        """Model evaluations per sample of one run of `sampler` with `steps` steps."""
        return SAMPLERS[sampler].evals(self.steps)


@dataclass
class Rates:
    """This machine's measured speed: GEMM FLOP/s at the scan's shapes, the model's seconds per row (forward) and
    per row of one J^T J product (a network's Jacobian power iteration)."""

    gemm_flops: float
    eigh_flops: float
    model_row_seconds: float = 0.0
    jacobian_row_seconds: float = 0.0

    def seconds(self, work: Work) -> float:
        return (work.flops / self.gemm_flops + work.eigh_flops / self.eigh_flops
                + work.model_rows * self.model_row_seconds + work.jacobian_rows * self.jacobian_row_seconds)


@dataclass
class Phase:
    name: str
    work: Work
    memory_bytes: float
    seconds: float


def _repeat(fn) -> float:
    """The fastest of repeated calls of fn (seconds), run for about BENCH_SECONDS after one warm-up call."""
    fn()
    best, spent = math.inf, 0.0
    while spent < BENCH_SECONDS or best == math.inf:
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return best


def gemm_rate(rows: int, dim: int, cols: int, device: torch.device, from_bytes: bool = False) -> float:
    """FLOP/s of one (rows, dim) x (dim, cols) float32 GEMM on `device`, as the empirical denoiser runs it;
    from_bytes: with the uint8 -> float32 conversion of the (cols, dim) chunk (memaudit.storage) in the time."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rows, dim, generator=gen).to(device)
    b = torch.randn(cols, dim, generator=gen).to(device)
    raw = torch.randint(0, 256, (cols, dim), dtype=torch.uint8, generator=gen).to(device)
    bias = torch.randn(cols, generator=gen).to(device)

    def run():
        torch.addmm(bias, a, (raw.to(torch.float32).div_(127.5).sub_(1.0) if from_bytes else b).T)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return 2.0 * rows * dim * cols / _repeat(run)


def eigh_rate(size: int, device: torch.device) -> float:
    """6 n^3 / seconds of one float64 symmetric eigendecomposition of size n (timed at n <= 512, scales as n^3)."""
    n = max(2, min(size, 512))
    a = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    a = a @ a.T
    return 6.0 * n ** 3 / _repeat(lambda: torch.linalg.eigh(a))


def model_rates(model, image_shape: Sequence[int], rows: int, device: torch.device) -> tuple[float, float]:
    """Seconds per row of the model's forward pass and of one J^T J product, timed on `rows` random inputs."""
    from memaudit.metrics.jacobian import model_jacobian_norm

    x = torch.randn((rows, *image_shape), generator=torch.Generator().manual_seed(0)).to(device)
    sigma = torch.full((rows,), 1.0, device=device)

    def forward():
        with torch.no_grad():
            model(x, sigma)

    per_row = _repeat(forward) / rows
    one_iter = _repeat(lambda: model_jacobian_norm(model, x, 1.0, iters=1,
                                                   generator=torch.Generator().manual_seed(0))) / rows
    return per_row, one_iter


def measure_rates(workload: Workload, model, image_shape, device: torch.device) -> Rates:
    """The machine's GEMM rate at the scan's shapes and, for a network, its per-row costs."""
    rows = max(1, min(workload.batch_size, workload.num_samples, 256))
    gemm = gemm_rate(rows, workload.dim, max(1, min(workload.num_train, CHUNK)), device,
                     from_bytes=workload.bytes_per_value == 1)
    eigh = eigh_rate(min(workload.dim, workload.num_train), device)
    if workload.empirical_model:
        return Rates(gemm, eigh)
    forward, jacobian = model_rates(model, image_shape, max(1, min(rows, 16)), device)
    # model_jacobian_norm(iters=1) is a forward with graph, one J^T J product and a final jvp: about
    # 2 J^T J products' worth; the per-iteration cost is half of it
    return Rates(gemm, eigh, forward, jacobian / 2)


def resident_bytes(w: Workload) -> float:
    """What a scan holds throughout: the training set (float32 with its faiss index, or uint8 bytes searched where
    they are), every run's samples, the recorded trajectories (x and D(x) per step)."""
    train = (4.0 if w.bytes_per_value == 4 else 0.5) * w.num_train * w.dim
    samples = 4.0 * w.num_samples * w.dim * len(w.samplers)
    trajectories = 2 * 4.0 * w.record * w.steps * w.dim * len(w.samplers)
    return 2 * train + samples + trajectories


def working_bytes(w: Workload) -> float:
    """A phase's temporaries: one batch's logits chunk and its exp, and the batch itself several times over."""
    rows = min(w.batch_size, w.num_samples)
    return 3 * 4.0 * rows * min(w.num_train, CHUNK) + 8 * 4.0 * rows * w.dim


def plan(w: Workload, rates: Rates, metrics, computes) -> list[Phase]:
    """The phases of a scan in the order it runs them, each with its work, memory and predicted seconds.
    metrics: the METRICS table; computes(metric) -> bool: whether the scan computes it."""
    from memaudit.metrics.base import RUN

    base, temp = resident_bytes(w), working_bytes(w)
    phases = [_phase("setup (index, duplicates)", w.search_rows(w.num_train), base, rates)]
    for sampler in w.samplers:
        phases.append(_phase(f"sample {sampler}", w.model_rows(w.num_samples * w.evals(sampler)) +
                             (w.search_rows(w.num_samples * w.steps) if SAMPLERS[sampler].needs_nearest else Work()),
                             base + temp, rates))
        run = sum((m.cost(w, sampler) for m in metrics if m.scope == RUN and computes(m)), Work())
        phases.append(_phase(f"metrics {sampler}", run, base + temp, rates))
    for metric in metrics:
        if metric.scope != RUN and computes(metric):
            phases.append(_phase(metric.name.replace("_", " "), metric.cost(w, None), base + temp, rates))
    return phases


def _phase(name: str, work: Work, memory: float, rates: Rates) -> Phase:
    return Phase(name, work, memory, rates.seconds(work))


def format_plan(phases: list[Phase], rates: Rates, w: Workload, budget: Optional[float] = None) -> list[str]:
    """The --dry-run table: per phase GFLOP, model rows, memory and predicted seconds, then the total."""
    total = sum(p.seconds for p in phases) or 1e-12
    lines = [f"dry run: M = {w.num_train} training images of dimension {w.dim}, {w.num_samples} samples x "
             f"{len(w.samplers)} sampler(s), {w.steps} steps; measured GEMM rate {rates.gemm_flops / 1e9:.1f} GFLOP/s"
             + (f", model {rates.model_row_seconds * 1e3:.3g} ms per row" if not w.empirical_model else
                " (closed-form model: its rows are GEMMs)"),
             f"{'phase':28s} {'GFLOP':>10s} {'model rows':>11s} {'memory':>9s} {'seconds':>9s} {'share':>6s}"]
    for p in phases:
        rows = p.work.model_rows + p.work.jacobian_rows
        lines.append(f"{p.name:28s} {(p.work.flops + p.work.eigh_flops) / 1e9:10.3g} {rows:11.0f} {p.memory_bytes / 2**30:8.2f}G "
                     f"{p.seconds:9.2f} {100 * p.seconds / total:5.1f}%")
    peak = max(p.memory_bytes for p in phases)
    top = max(phases, key=lambda p: p.seconds)
    lines.append(f"{'total':28s} {sum(p.work.flops + p.work.eigh_flops for p in phases) / 1e9:10.3g} {'':11s} {peak / 2**30:8.2f}G "
                 f"{total:9.2f}")
    lines.append(f"dominant phase: {top.name} ({100 * top.seconds / total:.0f}% of the predicted time); nothing was "
                 "sampled or measured, no report written, no gate evaluated")
    return lines
