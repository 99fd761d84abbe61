"""The scan: sample a model with each sampler, compute the four memorization metrics and FID, build the report.

Every metric compares the model to the exact empirical denoiser D*_1 of the training set (DESIGN.md).
Near-duplicate training images are clustered first, so a copy of a duplicated image still counts as a copy.
Sampling progress is saved per batch in a work folder so an interrupted scan can resume exactly; saved
samples are checked (digests, shapes, a re-drawn spot check) before they are trusted, and the report says
which runs resumed.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from memaudit.denoiser import Denoiser, clip_sigma_range
from memaudit.duplicates import DEFAULT_TOLERANCE, Duplicates, find_duplicates
from memaudit.empirical import EmpiricalDenoiser
from memaudit.errors import UserError
from memaudit.fingerprints import data_fingerprint, model_fingerprint
from memaudit.metrics.entropy import trajectory_entropy
from memaudit.metrics.fid import FID_MODES, compute_fid, inception_feature_extractor
from memaudit.metrics.jacobian import jacobian_profile
from memaudit.metrics.nn_ratio import load_feature_extractor, nn_ratios, training_index
from memaudit.metrics.score_cosine import cosine_on_training_points, cosine_on_trajectories
from memaudit.neighbors import NeighborIndex
from memaudit.report.schema import build_report, nn_ratio_section
from memaudit.resources import check_fits
from memaudit.sampling import (DEFAULT_SIGMA_MAX, DEFAULT_SIGMA_MIN, DEFAULT_STEPS, Batch, SamplerConfig,
                               Trajectory, check_sampler, rerun_rows, sample)
from memaudit.workdir import SampleStore

# task(description, total) -> advance(done, info="")
TaskFactory = Callable[[str, int], Callable[..., None]]
# note(message): a line the user should see (resume decisions, duplicate warnings); ignored by default
NoteFn = Callable[[str], None]

TRAJECTORY_BYTES = 512 * 1024**2  # recorded trajectories (x and D(x) per step) are kept within this budget
SPOT_CHECK_ROWS = 2  # saved samples re-drawn before a resume is trusted
SPOT_CHECK_RMS = 1e-3  # largest RMS difference (in [-1, 1] pixel units) a re-drawn sample may show
SAMPLE_MEMORY_FACTOR = 8  # working memory of one sampling batch, in copies of the batch


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

    def validate(self) -> None:
        if not self.samplers:
            raise UserError("give at least one --sampler")
        for name in self.samplers:
            check_sampler(name)
        if len(set(self.samplers)) != len(self.samplers):
            raise UserError(f"each --sampler once, please: got {', '.join(self.samplers)}")
        if not 0 < self.threshold <= 1:
            raise UserError(f"--threshold must be in (0, 1], not {self.threshold}")
        for name, value in (("--samples", self.num_samples), ("--steps", self.steps), ("--topk", self.topk),
                            ("--batch-size", self.batch_size)):
            if value < 1:
                raise UserError(f"{name} must be >= 1, not {value}")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed must be in [0, 2^63), not {self.seed}")
        unknown = set(self.skip) - set(SKIPPABLE)
        if unknown:
            raise UserError(f"cannot skip {', '.join(sorted(unknown))}; choose from {', '.join(SKIPPABLE)}")
        if self.fid not in FID_MODES:
            raise UserError(f"unknown --fid {self.fid!r}; choose one of {', '.join(FID_MODES)}")
        if not (math.isfinite(self.dup_tol) and 0 <= self.dup_tol < 1):
            raise UserError(f"--dup-tol must be in [0, 1), not {self.dup_tol}")
        for name, value in (("--sigma-min", self.sigma_min), ("--sigma-max", self.sigma_max)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UserError(f"{name} must be > 0 and finite, not {value}")

    def sampler_config(self, sampler: str) -> SamplerConfig:
        return SamplerConfig(sampler=sampler, steps=self.steps,
                             sigma_min=self.sigma_min if self.sigma_min is not None else DEFAULT_SIGMA_MIN,
                             sigma_max=self.sigma_max if self.sigma_max is not None else DEFAULT_SIGMA_MAX)

    def records_trajectories(self) -> bool:
        """Whether any metric reads the sampling trajectories (entropy and the trajectory cosine do)."""
        return "entropy" not in self.skip or "cosine" not in self.skip

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
                "dup_tol": self.dup_tol}


SKIPPABLE = ("entropy", "cosine", "jacobian", "fid")


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


def check_sampling_memory(config: ScanConfig, image_shape: Sequence[int]) -> None:
    """UserError before sampling when the samples, or one batch's working memory, cannot fit in memory."""
    size = 4.0 * math.prod(image_shape)
    needed = size * (config.num_samples * len(config.samplers)
                     + SAMPLE_MEMORY_FACTOR * min(config.batch_size, config.num_samples))
    check_fits(needed, f"sampling {config.num_samples} samples per sampler in batches of {config.batch_size}",
               "lower --samples or --batch-size")


def spot_check(model: Denoiser, batches: list[Batch], config: SamplerConfig, device: str) -> Optional[str]:
    """Re-draw SPOT_CHECK_ROWS saved samples (rows chosen at random, anew on every resume) from their batch's
    recorded generator state; a message if any differs from what was saved, else None."""
    rng = secrets.SystemRandom()
    for _ in range(SPOT_CHECK_ROWS):
        batch = rng.choice(batches)
        row = rng.randrange(batch.samples.shape[0])
        again = rerun_rows(model, batch, torch.tensor([row]), config, device)[0]
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


def sample_run(model: Denoiser, sampler: str, config: ScanConfig, store: SampleStore, resume: bool,
               task: TaskFactory, note: NoteFn, record: int) -> RunSamples:
    """Samples and recorded trajectories of one sampler run, resumed from the store when asked (and sound)."""
    sampler_config = config.sampler_config(sampler)
    batches, problem = store.load(sampler, config.num_samples, model.image_shape) if resume else ([], None)
    if batches:
        problem = spot_check(model, batches, sampler_config, config.device)
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
                                   record=record, batches=batches, on_batch=save)
    return RunSamples(samples, trajectories, resumed, SPOT_CHECK_ROWS if batches else 0)


def run_metrics(model: Denoiser, empirical: EmpiricalDenoiser, train: Tensor, run: RunSamples,
                config: ScanConfig, features, index: NeighborIndex, duplicates: Duplicates) -> dict:
    """The per-run report sections: nn_ratio, entropy and trajectory_cosine."""
    nn = nn_ratios(run.samples, train, features=features, index=index, duplicates=duplicates)
    out = {"nn_ratio": nn_ratio_section(nn.ratio, nn.d1, nn.d2, nn.nearest, threshold=config.threshold,
                                        ratio_plain=nn.ratio_plain)}
    if "entropy" not in config.skip:
        out["entropy"] = trajectory_entropy(empirical, run.trajectories, config.topk, labels=duplicates.labels)
    if "cosine" not in config.skip:
        out["trajectory_cosine"] = cosine_on_trajectories(model, empirical, run.trajectories)
    return out


def feature_extractor(name: Optional[str], device: torch.device, image_shape: tuple):
    """None (pixel space), clean-fid's Inception ("inception") or a TorchScript extractor at a path."""
    if not name or name == "pixels":
        return None
    if name == "inception":
        return inception_feature_extractor(device)
    return load_feature_extractor(name, device, image_shape)


def training_duplicates(index: NeighborIndex, tolerance: float, note: NoteFn) -> Duplicates:
    """Near-duplicate clusters of the training set; a note when there are any, a UserError when all are one."""
    duplicates = find_duplicates(index, tolerance)
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
             gates: Sequence = (), task: Optional[TaskFactory] = None, workdir: Optional[Path] = None,
             resume: bool = False, note: Optional[NoteFn] = None) -> ScanResult:
    """Sample with each configured sampler, measure everything, and return the report and the samples."""
    config.validate()
    task = task or (lambda description, total: (lambda done, info="": None))
    note = note or (lambda message: None)
    check_sampling_memory(config, model.image_shape)
    device = torch.device(config.device)
    train_dev = train.to(device)
    empirical = EmpiricalDenoiser(train_dev)
    features = feature_extractor(config.features, device, tuple(train.shape[1:]))
    index = training_index(train_dev, features)
    duplicates = training_duplicates(index, config.dup_tol, note)
    record = trajectory_rows(config, model.image_shape)
    store = SampleStore(workdir, {"settings": config.sample_settings(), "record": record, "model": model_info,
                                  "weights": model_fingerprint(model) if workdir is not None else None,
                                  "data": data_fingerprint(train) if workdir is not None else None})
    runs, all_samples, resumed = {}, {}, {}
    for sampler in config.samplers:
        run = sample_run(model, sampler, config, store, resume, task, note, record)
        advance = task(f"metrics {sampler}", 1)
        runs[sampler] = run_metrics(model, empirical, train_dev, run, config, features, index, duplicates)
        advance(1)
        all_samples[sampler] = run.samples
        resumed[sampler] = {"resumed_samples": run.resumed, "spot_checked": run.checked}
    sections = global_metrics(model, empirical, train_dev, all_samples, config, task)
    lo, hi = config.sampler_config(config.samplers[0]).sigma_range(model)
    settings = {**config.settings(), "trajectory_samples": record, "sampling_sigma_min": lo,
                "sampling_sigma_max": hi}
    data = {**data_info, "duplicates": duplicates.section()}
    provenance = {"resumed": any(r["resumed_samples"] for r in resumed.values()), "runs": resumed}
    report = build_report(model=model_info, data=data, settings=settings, runs=runs, gates=gates,
                          provenance=provenance, **sections)
    return ScanResult(report, all_samples, store.folder)


def global_metrics(model: Denoiser, empirical: EmpiricalDenoiser, train: Tensor, samples: dict[str, Tensor],
                   config: ScanConfig, task: TaskFactory) -> dict:
    """score_cosine on noisy training points, the Jacobian profile and FID (each unless skipped)."""
    sigmas = metric_sigmas(model, config.metric_sigmas)
    generator = torch.Generator().manual_seed(config.seed + 1)
    out: dict = {}
    if "cosine" not in config.skip:
        advance = task("score cosine", 1)
        out["score_cosine"] = cosine_on_training_points(model, empirical, train, sigmas, config.cosine_points,
                                                        generator)
        advance(1)
    if "jacobian" not in config.skip:
        advance = task("jacobian", 1)
        pick = torch.randperm(train.shape[0], generator=generator)[: config.jacobian_points]
        out["jacobian"] = jacobian_profile(model, empirical, train[pick.to(train.device)], sigmas, generator,
                                           iters=config.jacobian_iters, sampler=config.samplers[0])
        advance(1)
    if "fid" not in config.skip and config.fid != "off":
        advance = task("fid", 1)
        first = samples[next(iter(samples))]
        out["fid"] = [asdict(r) for r in compute_fid(first, train.cpu(), config.device, mode=config.fid)]
        advance(1)
    return out
