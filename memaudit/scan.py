"""The scan: sample a model with each sampler, compute every metric of memaudit.metrics.METRICS, build the report.

The metrics compare the model to the exact empirical denoiser D*_1 of the training set (DESIGN.md); run
metrics get each sampler run, scan metrics the whole scan, through one ScanContext. Gates are not the engine's
business: the caller attaches them to the report.
Near-duplicate training images are clustered first, so a copy of a duplicated image still counts as a copy.
Sampling progress is saved per batch in a work folder so an interrupted scan can resume exactly; saved
samples are checked (digests, shapes, a re-drawn spot check) before they are trusted, and the report says
which runs resumed.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from memaudit import distributed
from memaudit.class_scan import class_plan, sample_classes, without_unconditional_metrics
from memaudit.denoiser import Denoiser, clip_sigma_range
from memaudit.duplicates import DEFAULT_TOLERANCE, Duplicates, find_duplicates
from memaudit.empirical import EmpiricalDenoiser
from memaudit.errors import SettingError, UserError
from memaudit.features import feature_space
from memaudit.fingerprints import data_fingerprint, model_fingerprint
from memaudit.indexes import is_approximate, parse_index
from memaudit.metrics import METRICS, SKIP_CHOICES, skipped
from memaudit.metrics.base import RUN, RunData, ScanContext
from memaudit.metrics.fid import FID_MODES
from memaudit.metrics.nn_ratio import check_index, training_index
from memaudit.neighbors import NeighborIndex
from memaudit.report.schema import build_report
from memaudit.resources import check_fits, map_large_blocks, return_freed_memory
from memaudit.sampling import (DEFAULT_SIGMA_MAX, DEFAULT_SIGMA_MIN, DEFAULT_STEPS, Batch, BatchPlan, SamplerConfig,
                               check_sampler, rerun_rows, resumed_problem, sample)
from memaudit.shared_rows import RowState
from memaudit.workdir import SampleStore

# task(description, total) -> advance(done, info="")
TaskFactory = Callable[[str, int], Callable[..., None]]
# note(message): a line the user should see (resume decisions, duplicate warnings); ignored by default
NoteFn = Callable[[str], None]

TRAJECTORY_BYTES = 128 * 1024**2  # recorded trajectories (x and D(x) per step) are kept within this budget
SPOT_CHECK_ROWS = 2  # saved samples re-drawn before a resume is trusted
SPOT_CHECK_RMS = 1e-3  # largest RMS difference (in [-1, 1] pixel units) a re-drawn sample may show
SAMPLE_MEMORY_FACTOR = 8  # working memory of one sampling batch, in copies of the batch
MAX_SHIFTS = 4  # --match-shifts: (2N + 1)^2 shifts are searched per sample


@dataclass
class ScanConfig:
    """What a scan samples and measures."""

    num_samples: int = 256
    samplers: Sequence[str] = ("heun", "sde")
    steps: int = DEFAULT_STEPS
    seed: int = 0
    batch_size: int = 128
    threshold: float = 1 / 3
    topk: int = 16
    trajectory_samples: int = 128
    cosine_points: int = 128
    jacobian_points: int = 16
    jacobian_iters: int = 10
    metric_sigmas: int = 8
    features: Optional[str] = None
    fid: str = "auto"
    device: str = "cpu"
    skip: Sequence[str] = field(default_factory=tuple)
    sigma_min: Optional[float] = None  # sampling range; None: the default, clipped to the model's range
    sigma_max: Optional[float] = None
    dup_tol: float = DEFAULT_TOLERANCE
    match_flips: bool = False  # the match metric: also compare each sample's mirror image
    match_shifts: int = 0  # ... and its shifts by up to this many pixels
    fpr: float = 0.01  # the calibration metric: target false-positive rate on held-out real images
    index: str = "exact"  # the neighbour index (memaudit.indexes), e.g. "ivf" or "ivf:nlist=1024,nprobe=64"
    min_recall: float = 0.99  # with an approximate index: the recall@1 below which the scan fails

    def validate(self) -> None:
        if not self.samplers:
            raise SettingError("samplers", "none", "at least one sampler")
        for name in self.samplers:
            check_sampler(name)
        if len(set(self.samplers)) != len(self.samplers):
            raise SettingError("samplers", ", ".join(self.samplers), "each sampler once")
        if not 0 < self.threshold <= 1:
            raise SettingError("threshold", self.threshold, "in (0, 1]")
        for name in ("num_samples", "steps", "topk", "batch_size"):
            if getattr(self, name) < 1:
                raise SettingError(name, getattr(self, name), ">= 1")
        if not 0 <= self.seed < 2**63:
            raise SettingError("seed", self.seed, "in [0, 2^63)")
        unknown = sorted(set(self.skip) - set(SKIP_CHOICES))
        if unknown:
            raise SettingError("skip", ", ".join(unknown), f"one of {', '.join(SKIP_CHOICES)}")
        if self.fid not in FID_MODES:
            raise SettingError("fid", repr(self.fid), f"one of {', '.join(FID_MODES)}")
        if not (math.isfinite(self.dup_tol) and 0 <= self.dup_tol < 1):
            raise SettingError("dup_tol", self.dup_tol, "in [0, 1)")
        if not (isinstance(self.match_shifts, int) and 0 <= self.match_shifts <= MAX_SHIFTS):
            raise SettingError("match_shifts", self.match_shifts, f"an integer in [0, {MAX_SHIFTS}]")
        if not (math.isfinite(self.fpr) and 0 < self.fpr < 1):
            raise SettingError("fpr", self.fpr, "in (0, 1)")
        parse_index(self.index)
        if not (math.isfinite(self.min_recall) and 0 <= self.min_recall <= 1):
            raise SettingError("min_recall", self.min_recall, "in [0, 1]")
        for name in ("sigma_min", "sigma_max"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise SettingError(name, value, "> 0 and finite")

    def computes(self, metric) -> bool:
        """Whether this scan computes `metric` (not skipped; FID not turned off)."""
        return metric.name not in skipped(self.skip) and not (metric.name == "fid" and self.fid == "off")

    def sampler_config(self, sampler: str) -> SamplerConfig:
        return SamplerConfig(sampler=sampler, steps=self.steps,
                             sigma_min=self.sigma_min if self.sigma_min is not None else DEFAULT_SIGMA_MIN,
                             sigma_max=self.sigma_max if self.sigma_max is not None else DEFAULT_SIGMA_MAX)

    def records_trajectories(self) -> bool:
        """Whether any computed metric reads the sampling trajectories."""
        return any(m.needs_trajectories and self.computes(m) for m in METRICS)

    def sample_settings(self) -> dict:
        """The settings the samples depend on (what keys the work folder)."""
        return {"num_samples": self.num_samples, "seed": self.seed, "samplers": list(self.samplers),
                "steps": self.steps, "device": self.device, "batch_size": self.batch_size,
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def settings(self) -> dict:
        """The report's "settings" section."""
        return {"num_samples": self.num_samples, "seed": self.seed, "samplers": list(self.samplers),
                "steps": self.steps, "threshold": self.threshold, "features": self.features or "pixels",
                "topk": self.topk, "device": self.device, "batch_size": self.batch_size,
                "trajectory_samples": self.trajectory_samples, "cosine_points": self.cosine_points,
                "jacobian_points": self.jacobian_points, "skip": sorted(self.skip), "fid": self.fid,
                "dup_tol": self.dup_tol, "match_flips": self.match_flips, "match_shifts": self.match_shifts,
                "fpr": self.fpr, "index": self.index}


@dataclass
class ScanResult:
    report: dict
    samples: dict[str, Tensor]
    workdir: Optional[Path] = None  # where the resumable samples were kept (safe to delete now)


def metric_sigmas(model: Denoiser, count: int, lo: float = 0.01, hi: float = 10.0) -> list[float]:
    """`count` log-spaced noise levels in [lo, hi] clipped to the model's valid range, descending."""
    lo, hi = clip_sigma_range(model, lo, hi)
    if count <= 1 or lo >= hi:
        return [max(lo, min(hi, 1.0))]
    step = (math.log(hi) - math.log(lo)) / (count - 1)
    return [math.exp(math.log(hi) - i * step) for i in range(count)]


def trajectory_rows(config: ScanConfig, image_shape: Sequence[int]) -> int:
    """How many samples' trajectories to record: none without a consumer, else at most
    config.trajectory_samples and as many as fit in TRAJECTORY_BYTES (x and D(x) per step, float32)."""
    if not config.records_trajectories():
        return 0
    per_sample = 2 * config.steps * 4 * math.prod(image_shape)
    return max(0, min(config.trajectory_samples, TRAJECTORY_BYTES // per_sample))


def trimming(task: TaskFactory) -> TaskFactory:
    """The task factory, each new phase first returning the memory the last one freed (resources)."""
    def start(description: str, total: int):
        return_freed_memory()
        return task(description, total)

    return start


def compute_run_metric(metric, ctx: ScanContext, run: RunData):
    """One run metric's section, after returning what the previous metric freed (its peak does not stack)."""
    return_freed_memory()
    return metric.compute(ctx, run)


def check_sampling_memory(config: ScanConfig, image_shape: Sequence[int]) -> None:
    """UserError before sampling when the samples, or one batch's working memory, cannot fit in memory."""
    size = 4.0 * math.prod(image_shape)
    needed = size * (config.num_samples * len(config.samplers)
                     + SAMPLE_MEMORY_FACTOR * min(config.batch_size, config.num_samples))
    check_fits(needed, f"sampling {config.num_samples} samples per sampler in batches of {config.batch_size}",
               "lower --samples or --batch-size")


def spot_check(model: Denoiser, batches: list[Batch], config: SamplerConfig, device: str,
               nearest=None) -> Optional[str]:
    """Re-draw SPOT_CHECK_ROWS saved samples (rows chosen at random, anew on every resume) from their batch's
    recorded generator state; a message if any differs from what was saved, else None."""
    rng = secrets.SystemRandom()
    for _ in range(SPOT_CHECK_ROWS):
        batch = rng.choice(batches)
        row = rng.randrange(batch.samples.shape[0])
        again = rerun_rows(model, batch, torch.tensor([row]), config, device, nearest=nearest)[0]
        rms = float((again.double() - batch.samples[row].double()).pow(2).mean().sqrt())
        if not rms <= SPOT_CHECK_RMS:
            return f"a saved sample differs from its re-drawn value (RMS {rms:.3g})"
    return None


@dataclass
class RunSamples:
    """One sampler run's samples and trajectories, and how many of them came from the work folder."""

    samples: Tensor
    trajectories: list[Trajectory]
    resumed: int = 0
    checked: int = 0
    labels: Optional[Tensor] = None  # class of each sample (class-conditional models, memaudit.class_scan)


def sample_run(model: Denoiser, sampler: str, config: ScanConfig, store: SampleStore, resume: bool,
               task: TaskFactory, note: NoteFn, record: int, nearest=None) -> RunSamples:
    """Samples and recorded trajectories of one sampler run, resumed from the store when asked (and sound)."""
    sampler_config = config.sampler_config(sampler)
    batches, problem = store.load(sampler, config.num_samples, model.image_shape) if resume else ([], None)
    # (the work folder is rank 0's: other torchrun ranks get a SampleStore without one, so nothing to resume)
    if batches:
        problem = resumed_problem(BatchPlan(config.num_samples, sampler_config, config.seed, config.batch_size),
                                  batches) or spot_check(model, batches, sampler_config, config.device, nearest)
        batches = [] if problem else batches
    if problem:
        note(f"not resuming {sampler} from {store.folder}: {problem}; sampling it from the start")
    advance = task(f"sample {sampler}", config.num_samples)
    resumed = sum(b.samples.shape[0] for b in batches)
    if batches:
        advance(resumed, "resumed")
        note(f"resumed {sampler}: {resumed} of {config.num_samples} samples from {store.folder} "
             f"(spot-checked {SPOT_CHECK_ROWS})")
    elif resume:
        advance(0, "nothing saved for these settings; from the start")
    saved = list(batches)

    def save(batch: Batch) -> None:
        saved.append(batch)
        store.save(sampler, saved)

    samples, trajectories = sample(model, config.num_samples, sampler_config, seed=config.seed,
                                   batch_size=config.batch_size, device=config.device, progress=advance,
                                   record=record, batches=batches, on_batch=save, nearest=nearest,
                                   source=distributed.batch_source())
    return RunSamples(samples, trajectories, resumed, SPOT_CHECK_ROWS if batches else 0)


def training_duplicates(index: NeighborIndex, tolerance: float, note: NoteFn,
                        image_shape: Optional[Sequence[int]] = None) -> Duplicates:
    """Near-duplicate clusters of the training set; a note when there are any, a UserError when all are one."""
    duplicates = find_duplicates(index, tolerance, image_shape)
    if duplicates.num_distinct < 2:
        raise UserError("every training image is a near-duplicate of one image (--dup-tol "
                        f"{tolerance:g}); the NN ratio needs at least 2 distinct training images")
    clusters = duplicates.clusters()
    if clusters:
        note(f"warning: {sum(len(c) for c in clusters)} training images form {len(clusters)} near-duplicate "
             f"clusters (e.g. images {', '.join(map(str, clusters[0][:4]))}); d2 of the NN ratio is measured to "
             "the nearest distinct image (the report lists the clusters)")
    return duplicates


def run_scan(model: Denoiser, train: Tensor, config: ScanConfig, *, model_info: dict, data_info: dict,
             task: Optional[TaskFactory] = None, workdir: Optional[Path] = None, resume: bool = False,
             note: Optional[NoteFn] = None, holdout: Optional[Tensor] = None, labels: Optional[Tensor] = None,
             class_names: Optional[list] = None, labels_problem: str = "the data has no class labels",
             context: Optional[dict] = None) -> Optional[ScanResult]:
    """Sample with each configured sampler, compute every listed metric, and return the report (without gates:
    the caller attaches them) and the samples. `holdout`: held-out real images (same shape and range as `train`)
    that calibrate the NN-ratio rule and feed C_T (memaudit.metrics.calibration, ct_score). `labels`: the training
    images' classes, which a class-conditional model samples per class (memaudit.class_scan; ignored otherwise).
    `context`: entries the metrics find in ScanContext.cache (memaudit.latent_scan puts the decoded pixel space
    there). On a torchrun rank other than 0 it only draws that rank's share of the samples and returns None.
    """
    config.validate()
    map_large_blocks()
    plan = class_plan(model, labels, config.num_samples, labels_problem)
    if holdout is not None and tuple(holdout.shape[1:]) != tuple(train.shape[1:]):
        raise UserError(f"the held-out images have shape {tuple(holdout.shape[1:])}, the training images "
                        f"{tuple(train.shape[1:])}: they must match")
    if holdout is not None and holdout.shape[0] < 2:
        raise UserError(f"--holdout holds {holdout.shape[0]} image; calibration needs at least 2")
    task = trimming(task or (lambda description, total: (lambda done, info="": None)))
    note = note or (lambda message: None)
    config = without_unconditional_metrics(config, note) if plan else config
    check_sampling_memory(config, model.image_shape)
    device = torch.device(config.device)
    train_dev = train.to(device)
    if not distributed.is_main():
        return sample_for_rank_zero(model, train_dev, config, plan)
    features = feature_space(config.features, device, tuple(train.shape[1:]))
    index = training_index(train_dev, features, index=config.index)
    duplicates = training_duplicates(index, config.dup_tol, note,
                                     tuple(train.shape[1:]) if features.is_pixels else None)
    ctx = ScanContext(model=model, empirical=EmpiricalDenoiser(train_dev), train=train_dev, config=config,
                      features=features, index=index, duplicates=duplicates, runs={},
                      sigmas=metric_sigmas(model, config.metric_sigmas),
                      generator=torch.Generator().manual_seed(config.seed + 1), task=task,
                      holdout=holdout.to(device) if holdout is not None else None,
                      labels=labels if plan else None, class_names=class_names if plan else None,
                      cache=dict(context or {}))
    record = trajectory_rows(config, model.image_shape)
    store = SampleStore(workdir, {"settings": config.sample_settings(), "record": record, "model": model_info,
                                  "weights": model_fingerprint(model) if workdir is not None else None,
                                  "data": data_fingerprint(train) if workdir is not None else None})
    runs, resumed = {}, {}
    for sampler in config.samplers:
        run = sample_classes(sample_run, model, sampler, config, store, plan, record, resume=resume, task=task,
                             note=note, nearest=ctx.empirical.nearest_distance) if plan else \
            sample_run(model, sampler, config, store, resume, task, note, record, ctx.empirical.nearest_distance)
        ctx.runs[sampler] = RunData(sampler, run.samples, run.trajectories, labels=run.labels)
        advance = task(f"metrics {sampler}", 1)
        runs[sampler] = {m.name: compute_run_metric(m, ctx, ctx.runs[sampler]) for m in METRICS
                         if m.scope == RUN and config.computes(m)}
        ctx.runs[sampler].trajectories = []  # only the run metrics read them (up to TRAJECTORY_BYTES): free them
        advance(1)
        resumed[sampler] = {"resumed_samples": run.resumed, "spot_checked": run.checked}
        del run
    sections = scan_sections(ctx)
    lo, hi = config.sampler_config(config.samplers[0]).sigma_range(model)
    settings = {**config.settings(), "trajectory_samples": record, "sampling_sigma_min": lo,
                "sampling_sigma_max": hi, **({"class_samples": {str(c): n for c, n in plan.counts.items()}}
                                             if plan else {})}
    data = {**data_info, "duplicates": duplicates.section()}
    provenance = {"resumed": any(r["resumed_samples"] for r in resumed.values()), "runs": resumed}
    report = build_report(model=model_info, data=data, settings=settings, runs=runs, provenance=provenance,
                          sections=sections)
    return ScanResult(report, {name: r.samples for name, r in ctx.runs.items()}, store.folder)


def sample_for_rank_zero(model: Denoiser, train: Tensor, config: ScanConfig, plan) -> None:
    """A torchrun rank other than 0: draw its share of every sampling run, in rank 0's order, and answer its
    share of the metrics' row work whenever rank 0 asks (memaudit.shared_rows), until rank 0 stops the command
    (memaudit.distributed.finish). Rank 0 alone measures and reports."""
    quiet = lambda description, total: (lambda done, info="": None)  # noqa: E731
    store = SampleStore(None, {})
    record = trajectory_rows(config, model.image_shape)
    empirical = EmpiricalDenoiser(train)
    distributed.serving(RowState(empirical, train, config.features, config.index, torch.device(config.device)).answer)
    nearest = empirical.nearest_distance
    for sampler in config.samplers:
        if plan:
            sample_classes(sample_run, model, sampler, config, store, plan, record, resume=False, task=quiet,
                           note=lambda message: None, nearest=nearest)
        else:
            sample_run(model, sampler, config, store, False, quiet, lambda message: None, record, nearest)


def scan_sections(ctx: ScanContext) -> dict:
    """The scan-level sections (score_cosine, jacobian, fid, ...), each unless skipped, in METRICS order."""
    out: dict = {}
    for metric in METRICS:
        if metric.scope == RUN or not ctx.config.computes(metric):
            continue
        advance = ctx.task(metric.name.replace("_", " "), 1)
        section = metric.compute(ctx)
        if section is not None:
            out[metric.name] = section
        advance(1)
    return out


def dry_run(model: Denoiser, train: Tensor, config: ScanConfig, holdout: Optional[Tensor] = None) -> list[str]:
    """The --dry-run plan: each phase's predicted FLOPs, model rows, memory and seconds (memaudit.cost), from
    this machine's measured GEMM rate and the model's measured per-row costs; nothing is sampled."""
    from memaudit import cost

    config.validate()
    check_index(train, config.index)  # what the scan would refuse, refused before planning it
    check_sampling_memory(config, model.image_shape or tuple(train.shape[1:]))
    workload = cost.Workload(
        num_train=int(train.shape[0]), dim=int(math.prod(train.shape[1:])), num_samples=config.num_samples,
        samplers=tuple(config.samplers), steps=config.steps, record=trajectory_rows(config, model.image_shape or
                                                                                    tuple(train.shape[1:])),
        cosine_points=config.cosine_points, jacobian_points=config.jacobian_points,
        jacobian_iters=config.jacobian_iters, metric_sigmas=config.metric_sigmas, topk=config.topk,
        batch_size=config.batch_size, empirical_model=isinstance(model, EmpiricalDenoiser),
        holdout=int(holdout.shape[0]) if holdout is not None else 0,
        match_transforms=(2 if config.match_flips else 1) * (2 * config.match_shifts + 1) ** 2,
        bytes_per_value=1 if getattr(train, "is_bytes", False) else 4,
        extra={"sigmas": metric_sigmas(model, config.metric_sigmas), "approximate": is_approximate(config.index)})
    rates = cost.measure_rates(workload, model, tuple(train.shape[1:]), torch.device(config.device))
    phases = cost.plan(workload, rates, METRICS, config.computes)
    return cost.format_plan(phases, rates, workload)
