"""`memaudit smooth MODEL DATA --out new/`: fine-tune toward a smoothed target (and/or unconditioned), then compare.

The targets follow the seed papers (docs/smoothing.md): --temperature 2 or 7/sigma is Zhou et al.'s power-law
temperature smoothing over the K nearest training images of each clean image (not a Gaussian temperature,
which only relabels sigma); --kernel h is kernel score smoothing; --uncondition removes the network's noise input.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from memaudit.atomic import check_distinct_paths
from memaudit.cli import options as opt
from memaudit.data import load_dataset
from memaudit.errors import SettingError, UserError
from memaudit.finetune import finetune
from memaudit.metrics.fid import fid_proxy
from memaudit.models.latent import is_latent
from memaudit.models.native import is_native
from memaudit.numbers import fmt
from memaudit.progress import ProgressTracker, data_loading, progress_tracker
from memaudit.scan import ScanConfig, run_scan
from memaudit.smoothing.kernel import DEFAULT_SAMPLES
from memaudit.smoothing.targets import SmoothingConfig
from memaudit.training import TrainConfig

DEFAULT_TEMPERATURE = "2"
QUICK_SCAN_SKIP = ("adaptive_l2", "entropy", "cosine", "jacobian")
UNCONDITIONED_SAMPLERS = ("sde", "pc", "adaptive")

TEMPERATURE = typer.Option(None, "--temperature", "-T", help="T or c/sigma: power-law temperature "
                           "smoothing (Zhou et al. 2026, Eq. 10-11).")
K = typer.Option(30, "--k", help="Neighbours of the clean image mixed by --temperature.")
SIGMA_COLLAPSE = typer.Option(None, "--sigma-collapse", help="sigma_c (default: c of c/sigma; all sigmas for a "
                              "constant T); auto = the scan's collapse_sigma.")
KNN_FEATURES = typer.Option(None, "--knn-features", help="Space of the kNN graph: pixels, resnet18:PATH (the "
                            "paper's), torchscript:PATH.")
DENOMINATOR = typer.Option("sigma", "--denominator", help="sigma: sigma^2 (released code); shell: ||x - mu_j||^2/(d-2) "
                           "(the paper's text).")
KERNEL = typer.Option(None, "--kernel", help="Bandwidth h of kernel score smoothing (instead of --temperature).")
KERNEL_SAMPLES = typer.Option(DEFAULT_SAMPLES, "--kernel-samples", help="Perturbations e of --kernel (even: "
                              "antithetic pairs).")
UNCONDITION = typer.Option(False, "--uncondition", help="No noise input to the network (Eq. 9).")
SIGMA_SAMPLING = typer.Option("lognormal", "--sigma-sampling", help="Training sigmas: EDM log-normal, or log-uniform "
                              "(the paper's NCSN setting).")

@dataclass
class Row:
    """One line of the comparison table: a model, the sampler it was scanned with, its numbers."""

    label: str
    sampler: str
    summary: dict
    holdout_proxy: Optional[float] = None


def smooth(
    model: str = typer.Argument(..., metavar="MODEL", help="Checkpoint to fine-tune (any format `scan` loads)."),
    data: Path = typer.Argument(..., metavar="DATA", help="Its training images: a folder, .npy or .npz."),
    out: Path = typer.Option(..., "--out", "-o", help="Output native checkpoint folder (atomic)."),
    temperature: Optional[str] = TEMPERATURE,
    k: int = K,
    sigma_collapse: Optional[str] = SIGMA_COLLAPSE,
    knn_features: Optional[str] = KNN_FEATURES,
    denominator: Literal["sigma", "shell"] = DENOMINATOR,
    kernel: Optional[float] = KERNEL,
    kernel_samples: int = KERNEL_SAMPLES,
    uncondition: bool = UNCONDITION,
    sigma_sampling: Literal["lognormal", "loguniform"] = SIGMA_SAMPLING,
    steps: int = typer.Option(2000, "--steps", help="Optimiser steps."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per step."),
    lr: float = typer.Option(2e-4, "--lr", help="Adam learning rate (lower than for training from scratch)."),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Save a resumable checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from --out."),
    samples: int = typer.Option(256, "--samples", help="Samples per row of the before/after comparison."),
    holdout: Optional[Path] = typer.Option(None, "--holdout", help="Held-out images: the table adds the FID proxy "
                                           "against them."),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="Scan before/after and print the table."),
    param: Optional[opt.ParamName] = opt.PARAM,
    schedule: Optional[opt.ScheduleName] = opt.SCHEDULE,
    factory: Optional[str] = opt.FACTORY,
    factory_args: Optional[str] = opt.FACTORY_ARGS,
    trust_pickle: bool = opt.TRUST_PICKLE,
    sigma_min: Optional[float] = opt.SIGMA_MIN,
    sigma_max: Optional[float] = opt.SIGMA_MAX,
    round_timesteps: bool = opt.ROUND_TIMESTEPS,
    model_config: Optional[str] = opt.MODEL_CONFIG,
    resize: Optional[int] = opt.RESIZE,
    channels: Optional[int] = opt.CHANNELS,
    seed: int = opt.SEED,
    device: str = opt.DEVICE,
    cache_dir: Optional[str] = opt.CACHE_DIR,
    quiet: bool = opt.QUIET,
) -> None:
    """Fine-tune MODEL so it memorizes DATA less, then compare before and after (docs/smoothing.md).

    \b
    Targets (plain denoising toward the clean image where none applies):
      --temperature 2          power-law weights over the K nearest training images of the clean image, every sigma
      --temperature 14/sigma   T = max(14/sigma, 1) below sigma_c = 14 (the paper's 7/sigma; our sigmas are 2x)
      --kernel 0.2             kernel score smoothing at every sigma: E_e D*(x + e, sigma), e ~ N(0, h^2 I)
      --uncondition            no noise input (alone: plain denoising; scan with --sampler sde or pc)
    What each does to the bundled digits, measured: examples/smoothing/README.md.
    """
    if temperature is None and kernel is None and not uncondition:
        temperature = DEFAULT_TEMPERATURE
    config = SmoothingConfig(temperature=temperature, k=k, features=knn_features, denominator=denominator,
                             kernel=kernel, kernel_samples=kernel_samples, uncondition=uncondition,
                             sigma_collapse=None if sigma_collapse in (None, "auto") else _number(sigma_collapse))
    config.validate()
    train_config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=checkpoint_every,
                               sigma_sampling=sigma_sampling)
    train_config.validate()
    if samples < 1:
        raise SettingError("num_samples", samples, ">= 1")
    check_distinct_paths(inputs={"MODEL": model, "DATA": data, "--holdout": holdout}, outputs={"--out": out})
    dev = opt.resolve_device(device)
    with data_loading("load DATA", quiet) as reporting:
        images = load_dataset(data, resize=resize, channels=channels, cache_dir=cache_dir, **reporting).images.to(dev)
    held_out = None
    if holdout is not None:
        with data_loading("load --holdout", quiet) as reporting:
            held_out = load_dataset(holdout, resize=resize, channels=channels, cache_dir=cache_dir, **reporting).images
    if compare and images.shape[0] < 2:
        raise UserError(f"{data} holds 1 image; the comparison scan needs at least 2 (or pass --no-compare)")
    loader = dict(param=param, schedule=schedule, factory=factory, trust_pickle=trust_pickle, sigma_min=sigma_min,
                  sigma_max=sigma_max, round_timesteps=round_timesteps, model_config=model_config,
                  factory_args=factory_args)
    original = opt.load_checked_model(model, images, dev, **loader)
    if is_latent(original):
        raise UserError(f"{model} is a latent diffusion model; smooth fine-tunes pixel-space models only")
    if getattr(original, "num_classes", None) is not None:
        raise UserError(f"{model} is class-conditional: memaudit smooth fine-tunes unconditional models only")
    err = Console(stderr=True)
    say = lambda line: err.print(opt.printable(line), markup=False, highlight=False) if not quiet else None  # noqa
    if sigma_collapse == "auto":
        config.sigma_collapse = measured_collapse_sigma(original, images, seed, dev, data)
        say(f"sigma_collapse = {config.sigma_collapse:.4g}: the model's measured collapse_sigma")
    if not resume and is_native(out):
        say(f"replacing the checkpoint in {out}")
    info = {"model": model, "data": str(data), "num_images": int(images.shape[0])}
    with progress_tracker(quiet=quiet) as tracker:
        finetune(original, images, config, train_config, out, info, resume=resume,
                 progress=tracker.task(config.action, steps))
        say(f"saved {out} ({config.action}, {steps} steps)")
        if compare:
            rows = compare_rows(model, out, images, held_out, config, loader, samples, seed, dev, tracker,
                                {"path": str(data), "num_images": int(images.shape[0])})
    if compare:
        print_comparison(rows, Console(width=max(Console().width, 110)), held_out is not None)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SettingError("sigma_collapse", repr(text), "a number or auto") from None


def measured_collapse_sigma(model, images, seed: int, device, data: Path) -> float:
    """collapse_sigma of a quick scan (128 heun samples, entropy only): where one training image takes over."""
    scan = ScanConfig(num_samples=128, samplers=("heun",), seed=seed, device=str(device), fid="off",
                      skip=("adaptive_l2", "cosine", "jacobian", "fid"))
    report = run_scan(model, images, scan, model_info={"spec": "original"}, data_info={"path": str(data)}).report
    value = report["summary"]["collapse_sigma"]
    if not value:
        raise UserError("the model's collapse_sigma is 0 (no single training image takes over its sampling path); "
                        "give --sigma-collapse a number")
    return float(value)


def compare_rows(model: str, out: Path, images, held_out, config: SmoothingConfig, loader: dict, samples: int,
                 seed: int, device, tracker: ProgressTracker, data_info: dict) -> list[Row]:
    """Scan the original and the fine-tuned checkpoint (same seed) with an ODE and the stochastic samplers, and
    the closed-form kernel-smoothed sampler when the target is the kernel's."""
    tuned = ("heun",) + (UNCONDITIONED_SAMPLERS if config.uncondition else ("sde",))
    candidates = [("original", model, s) for s in ("heun", "sde")]
    candidates += [(f"fine-tuned ({config.action})", str(out), s) for s in tuned]
    if config.target == "kernel":
        candidates.append((f"closed form empirical:kernel={config.kernel:g}", f"empirical:kernel={config.kernel:g}",
                           "heun"))
    scan = ScanConfig(num_samples=samples, seed=seed, device=str(device), skip=QUICK_SCAN_SKIP, fid="proxy")
    rows = []
    for label, spec, sampler in candidates:
        task = lambda description, total, label=label: tracker.task(f"{label}: {description}", total)  # noqa: E731
        options = loader if spec == model else {**loader, "model_config": None, "factory_args": None}  # native
        denoiser = opt.load_checked_model(spec, images, device, **options)
        result = run_scan(denoiser, images, replace(scan, samplers=(sampler,)),
                          model_info=opt.model_info(spec, denoiser), data_info=data_info, task=task)
        proxy = fid_proxy(result.samples[sampler], held_out) if held_out is not None else None
        rows.append(Row(label, sampler, result.report["summary"], proxy))
    return rows


def print_comparison(rows: list[Row], console: Console, with_holdout: bool) -> None:
    """The before/after table: fraction memorized, mean NN ratio, FID proxy against DATA (and held-out images)."""
    styled = console.is_terminal
    table = Table(title="Memorization before / after fine-tuning", box=box.ROUNDED if styled else box.ASCII,
                  title_justify="left", header_style="bold" if styled else "", title_style="bold" if styled else "")
    for header in ("model", "sampler", "memorized", "NN ratio", "proxy DATA") + \
            (("proxy held-out",) if with_holdout else ()):
        table.add_column(header, no_wrap=header in ("model", "sampler"),
                         justify="left" if header in ("model", "sampler") else "right")
    for row in rows:
        cells = [fmt(row.summary.get(key)) for key in ("memorized_fraction", "mean_nn_ratio", "fid_proxy")]
        table.add_row(row.label, row.sampler, *cells, *((fmt(row.holdout_proxy),) if with_holdout else ()))
    console.print(table)
    console.print("memorized = fraction with nearest/second-nearest training distance ratio < 1/3 (NN ratio: its "
                  "mean); proxy = pixel-PCA Frechet distance (lower = closer) to DATA, which rewards copies, and to "
                  "the held-out images, which does not",
                  markup=False, highlight=False)
