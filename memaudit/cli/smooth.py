"""`memaudit smooth MODEL DATA --out new/`: fine-tune toward D*_T (and/or unconditioned), then compare scans."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from memaudit.atomic import check_distinct_paths
from memaudit.scan import ScanConfig, run_scan
from memaudit.cli import options as opt
from memaudit.data import load_images
from memaudit.errors import UserError
from memaudit.finetune import FinetuneConfig, finetune
from memaudit.models.native import is_native
from memaudit.progress import ProgressTracker, progress_tracker
from memaudit.numbers import fmt
from memaudit.training import TrainConfig

DEFAULT_TEMPERATURE = 2.0
QUICK_SCAN_SKIP = ("entropy", "cosine", "jacobian")


@dataclass
class Row:
    """One line of the comparison table: a model, the sampler it was scanned with, its scan summary."""

    label: str
    sampler: str
    summary: dict


def smooth(
    model: str = typer.Argument(..., metavar="MODEL", help="Checkpoint to fine-tune (any format `scan` loads)."),
    data: Path = typer.Argument(..., metavar="DATA", help="Its training images: a folder, .npy or .npz."),
    out: Path = typer.Option(..., "--out", "-o", help="Output native checkpoint folder (written atomically)."),
    temperature: Optional[float] = typer.Option(
        None, "--temperature", "-T", help=f"Smoothing temperature T >= 1 of the target D*_T (default "
        f"{DEFAULT_TEMPERATURE:g}; with --uncondition the target is x0 unless T is given)."),
    k: int = typer.Option(64, "--k", help="Nearest training points in the smoothed target."),
    bandwidth: Optional[float] = typer.Option(
        None, "--bandwidth", help="Bandwidth floor h of the smoothed target: softmax variance "
        "max(sigma^2 T, h^2) (default: none, plain D*_T); also used by the closed-form row."),
    uncondition: bool = typer.Option(False, "--uncondition",
                                     help="Fix the network's noise input to a constant (scan it with --sampler sde)."),
    steps: int = typer.Option(2000, "--steps", help="Optimiser steps."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per step."),
    lr: float = typer.Option(2e-4, "--lr", help="Adam learning rate (lower than for training from scratch)."),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Save a resumable checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from --out."),
    samples: int = typer.Option(256, "--samples", help="Samples per row of the before/after comparison."),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="Scan before/after and print the table."),
    param: Optional[str] = opt.PARAM,
    schedule: Optional[str] = opt.SCHEDULE,
    factory: Optional[str] = opt.FACTORY,
    trust_pickle: bool = opt.TRUST_PICKLE,
    sigma_min: Optional[float] = opt.SIGMA_MIN,
    sigma_max: Optional[float] = opt.SIGMA_MAX,
    round_timesteps: bool = opt.ROUND_TIMESTEPS,
    resize: Optional[int] = opt.RESIZE,
    channels: Optional[int] = opt.CHANNELS,
    seed: int = opt.SEED,
    device: str = opt.DEVICE,
    quiet: bool = opt.QUIET,
) -> None:
    """Fine-tune MODEL toward the temperature-smoothed kNN empirical denoiser of DATA (or unconditioned)."""
    if temperature is None and not uncondition:
        temperature = DEFAULT_TEMPERATURE
    config = FinetuneConfig(temperature=temperature, k=k, uncondition=uncondition, bandwidth=bandwidth)
    config.validate()
    train_config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=checkpoint_every)
    train_config.validate()
    if samples < 1:
        raise UserError(f"--samples must be >= 1, not {samples}")
    check_distinct_paths(inputs={"MODEL": model, "DATA": data}, outputs={"--out": out})
    dev = opt.resolve_device(device)
    images = load_images(data, resize=resize, channels=channels).to(dev)
    if compare and images.shape[0] < 2:
        raise UserError(f"{data} holds 1 image; the comparison scan needs at least 2 (or pass --no-compare)")
    loader = dict(param=param, schedule=schedule, factory=factory, trust_pickle=trust_pickle, sigma_min=sigma_min,
                  sigma_max=sigma_max, round_timesteps=round_timesteps)
    original = opt.load_checked_model(model, images, dev, **loader)
    err = Console(stderr=True)
    if temperature == 1 and not quiet:
        err.print("note: T = 1 is the exact empirical denoiser; its target memorizes", markup=False, highlight=False)
    if not resume and is_native(out) and not quiet:
        err.print(f"replacing the checkpoint in {out}", markup=False, highlight=False)
    info = {"model": model, "data": str(data), "num_images": int(images.shape[0])}
    with progress_tracker(quiet=quiet) as tracker:
        finetune(original, images, config, train_config, out, info, resume=resume,
                 progress=tracker.task(config.action, steps))
        if not quiet:
            err.print(f"saved {out} ({config.action}, {steps} steps)", markup=False, highlight=False)
        if compare:
            rows = compare_rows(model, out, images, config, loader, samples, seed, dev, tracker,
                                {"path": str(data), "num_images": int(images.shape[0])})
    if compare:
        print_comparison(rows, Console())


def compare_rows(model: str, out: Path, images, config: FinetuneConfig, loader: dict, samples: int, seed: int,
                 device, tracker: ProgressTracker, data_info: dict) -> list[Row]:
    """Scan the original, the fine-tuned checkpoint and the closed-form smoothed sampler (same seed)."""
    closed_form = f"empirical:T={config.temperature or 1.0:g},k={config.k}"
    if config.bandwidth:
        closed_form += f",h={config.bandwidth:g}"
    tuned_sampler = "sde" if config.uncondition else "heun"
    candidates = [("original", model, sampler) for sampler in dict.fromkeys(("heun", tuned_sampler))]
    candidates += [(f"fine-tuned ({config.action})", str(out), tuned_sampler),
                   (f"closed form {closed_form}", closed_form, "heun")]
    scan = ScanConfig(num_samples=samples, seed=seed, device=str(device), skip=QUICK_SCAN_SKIP)
    rows = []
    for label, spec, sampler in candidates:
        task = lambda description, total, label=label: tracker.task(f"{label}: {description}", total)  # noqa: E731
        denoiser = opt.load_checked_model(spec, images, device, **loader)
        result = run_scan(denoiser, images, replace(scan, samplers=(sampler,)),
                          model_info=opt.model_info(spec, denoiser), data_info=data_info, task=task)
        rows.append(Row(label, sampler, result.report["summary"]))
    return rows


def print_comparison(rows: list[Row], console: Console) -> None:
    """The before/after table: fraction memorized, mean NN ratio, FID proxy (and clean-fid when computed)."""
    styled = console.is_terminal
    table = Table(title="Memorization before / after fine-tuning", box=box.ROUNDED if styled else box.ASCII,
                  title_justify="left", header_style="bold" if styled else "", title_style="bold" if styled else "")
    columns = [("fraction memorized", "memorized_fraction"), ("mean NN ratio", "mean_nn_ratio"),
               ("FID proxy", "fid_proxy")]
    if any(row.summary.get("fid") is not None for row in rows):
        columns.append(("FID (clean-fid)", "fid"))
    table.add_column("model", no_wrap=True)
    table.add_column("sampler", no_wrap=True)
    for title, _ in columns:
        table.add_column(title, justify="right")
    for row in rows:
        table.add_row(row.label, row.sampler, *(fmt(row.summary.get(key)) for _, key in columns))
    console.print(table)
    console.print("memorized = nearest/second-nearest training distance ratio < 1/3; FID proxy = pixel-PCA "
                  "Frechet distance to the training set (lower = closer to it)", markup=False, highlight=False)
