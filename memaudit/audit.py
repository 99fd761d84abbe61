"""The scan: sample a model with each sampler, compute the four memorization metrics and FID, build the report.

Every metric compares the model to the exact empirical denoiser D*_1 of the training set (DESIGN.md).
Sampling progress is saved per batch in a work folder so an interrupted scan can resume exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from memaudit.atomic import atomic_path
from memaudit.denoiser import Denoiser, clip_sigma_range
from memaudit.empirical import EmpiricalDenoiser
from memaudit.errors import UserError
from memaudit.metrics.entropy import trajectory_entropy
from memaudit.metrics.fid import compute_fid, inception_feature_extractor
from memaudit.metrics.jacobian import jacobian_profile
from memaudit.metrics.nn_ratio import load_feature_extractor, nn_ratios, training_index
from memaudit.neighbors import NeighborIndex
from memaudit.metrics.score_cosine import cosine_on_training_points, cosine_on_trajectories
from memaudit.report.schema import build_report, nn_ratio_section
from memaudit.sampling import SAMPLERS, SamplerConfig, SamplingState, Trajectory, sample

# task(description, total) -> advance(done, info="")
TaskFactory = Callable[[str, int], Callable[..., None]]


@dataclass
class ScanConfig:
    """What a scan samples and measures."""

    num_samples: int = 256
    samplers: Sequence[str] = ("heun", "sde")
    steps: int = 18
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

    def validate(self) -> None:
        for name in self.samplers:
            if name not in SAMPLERS:
                raise UserError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
        if not self.samplers:
            raise UserError("give at least one --sampler")
        if not 0 < self.threshold <= 1:
            raise UserError(f"--threshold must be in (0, 1], not {self.threshold}")
        for name, value in (("--samples", self.num_samples), ("--steps", self.steps), ("--topk", self.topk),
                            ("--batch-size", self.batch_size)):
            if value < 1:
                raise UserError(f"{name} must be >= 1, not {value}")
        unknown = set(self.skip) - set(SKIPPABLE)
        if unknown:
            raise UserError(f"cannot skip {', '.join(sorted(unknown))}; choose from {', '.join(SKIPPABLE)}")

    def settings(self) -> dict:
        """The report's "settings" section."""
        return {"num_samples": self.num_samples, "seed": self.seed, "samplers": list(self.samplers),
                "steps": self.steps, "threshold": self.threshold, "features": self.features or "pixels",
                "topk": self.topk, "device": self.device, "batch_size": self.batch_size,
                "trajectory_samples": self.trajectory_samples, "cosine_points": self.cosine_points,
                "jacobian_points": self.jacobian_points, "skip": sorted(self.skip), "fid": self.fid}


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


def data_fingerprint(train: Tensor) -> str:
    """sha256 of the training tensor's bytes (first 16 hex digits)."""
    return hashlib.sha256(train.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def model_fingerprint(model: Denoiser) -> str:
    """sha256 of the model's state dict (names, dtypes, shapes, bytes; first 16 hex digits).

    It keys the work folder, so samples of a checkpoint retrained in place are never resumed.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class SampleStore:
    """Per-sampler sampling state in a work folder, tagged with a fingerprint of everything that shapes it."""

    def __init__(self, root: Optional[Path], fingerprint: dict):
        self.tag = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(root) / f"scan-{self.tag}" if root is not None else None

    def path(self, sampler: str) -> Path:
        return self.folder / f"samples-{sampler}.pt"

    def save(self, sampler: str, state: SamplingState) -> None:
        if self.folder is None:
            return
        payload = {"tag": self.tag, "done": state.done, "generator_state": state.generator_state,
                   "batches": state.batches,
                   "trajectories": [{"sigmas": torch.tensor(t.sigmas, dtype=torch.float64),
                                     "xs": torch.stack(t.xs), "denoised": torch.stack(t.denoised)}
                                    for t in state.trajectories]}
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        with atomic_path(self.path(sampler)) as tmp:
            tmp.write_bytes(buffer.getvalue())  # a plain write: disk full is an OSError (torch.save's is not)

    def load(self, sampler: str) -> Optional[SamplingState]:
        """The saved state for this sampler, or None when there is none or it belongs to other settings."""
        if self.folder is None or not self.path(sampler).is_file():
            return None
        try:
            payload = torch.load(self.path(sampler), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a corrupt work file is simply not resumed
            return None
        if payload.get("tag") != self.tag:
            return None
        trajs = [Trajectory(t["sigmas"].tolist(), list(t["xs"]), list(t["denoised"])) for t in payload["trajectories"]]
        return SamplingState(list(payload["batches"]), trajs, int(payload["done"]), payload["generator_state"])


def sample_run(model: Denoiser, sampler: str, config: ScanConfig, store: SampleStore, resume: bool,
               task: TaskFactory) -> tuple[Tensor, list[Trajectory]]:
    """Samples and recorded trajectories of one sampler run, resumed from the store when asked."""
    state = store.load(sampler) if resume else None
    advance = task(f"sample {sampler}", config.num_samples)
    if state is not None:
        advance(state.done, "resumed")
    elif resume:
        advance(0, "nothing saved for these settings; from the start")
    sampler_config = SamplerConfig(sampler=sampler, steps=config.steps)
    return sample(model, config.num_samples, sampler_config, seed=config.seed, batch_size=config.batch_size,
                  device=config.device, progress=advance, record=config.trajectory_samples, state=state,
                  on_batch=lambda s: store.save(sampler, s))


def run_metrics(model: Denoiser, empirical: EmpiricalDenoiser, train: Tensor, samples: Tensor,
                trajectories: list[Trajectory], config: ScanConfig, features, index: NeighborIndex) -> dict:
    """The per-run report sections: nn_ratio, entropy and trajectory_cosine."""
    nn = nn_ratios(samples, train, features=features, index=index)
    run = {"nn_ratio": nn_ratio_section(nn.ratio, nn.d1, nn.d2, nn.nearest, threshold=config.threshold)}
    if "entropy" not in config.skip:
        run["entropy"] = trajectory_entropy(empirical, trajectories, config.topk)
    if "cosine" not in config.skip:
        run["trajectory_cosine"] = cosine_on_trajectories(model, empirical, trajectories)
    return run


def feature_extractor(name: Optional[str], device: torch.device, image_shape: tuple):
    """None (pixel space), clean-fid's Inception ("inception") or a TorchScript extractor at a path."""
    if not name or name == "pixels":
        return None
    if name == "inception":
        return inception_feature_extractor(device)
    return load_feature_extractor(name, device, image_shape)


def run_scan(model: Denoiser, train: Tensor, config: ScanConfig, *, model_info: dict, data_info: dict,
             gates: Sequence = (), task: Optional[TaskFactory] = None, workdir: Optional[Path] = None,
             resume: bool = False) -> ScanResult:
    """Sample with each configured sampler, measure everything, and return the report and the samples."""
    config.validate()
    task = task or (lambda description, total: (lambda done, info="": None))
    device = torch.device(config.device)
    train_dev = train.to(device)
    empirical = EmpiricalDenoiser(train_dev)
    features = feature_extractor(config.features, device, tuple(train.shape[1:]))
    index = training_index(train_dev, features)
    store = SampleStore(workdir, {"settings": config.settings(), "model": model_info,
                                  "weights": model_fingerprint(model) if workdir is not None else None,
                                  "data": data_fingerprint(train) if workdir is not None else None})
    runs, all_samples = {}, {}
    for sampler in config.samplers:
        samples, trajectories = sample_run(model, sampler, config, store, resume, task)
        advance = task(f"metrics {sampler}", 1)
        runs[sampler] = run_metrics(model, empirical, train_dev, samples, trajectories, config, features, index)
        advance(1)
        all_samples[sampler] = samples
    sections = global_metrics(model, empirical, train_dev, all_samples, config, task)
    report = build_report(model=model_info, data=data_info, settings=config.settings(), runs=runs,
                          gates=gates, **sections)
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
                                           iters=config.jacobian_iters)
        advance(1)
    if "fid" not in config.skip and config.fid != "off":
        advance = task("fid", 1)
        first = samples[next(iter(samples))]
        out["fid"] = [asdict(r) for r in compute_fid(first, train.cpu(), config.device, mode=config.fid)]
        advance(1)
    return out
