"""`memaudit train DATA --out model/`: train the built-in UNet with the EDM loss, toward the same smoothed targets
as `memaudit smooth` when asked (the seed paper trains them from scratch)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer
from rich.console import Console

from memaudit.atomic import check_distinct_paths
from memaudit.cli import smooth as smoothing_options
from memaudit.cli.options import CACHE_DIR, CHANNELS, DEVICE, QUIET, RESIZE, SEED, resolve_device
from memaudit.data import Dataset, load_dataset
from memaudit.errors import UserError
from memaudit.finetune import history_entry, prepare
from memaudit.models.native import check_output_folder, is_native, make_unet_denoiser
from memaudit.smoothing.targets import SmoothingConfig, make_target
from memaudit.progress import data_loading, progress_tracker
from memaudit.training import TrainConfig, fit


def train(
    data: Path = typer.Argument(..., metavar="DATA", help="Training images: a folder, .npy or .npz."),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint folder (written atomically)."),
    steps: int = typer.Option(2000, "--steps", help="Optimiser steps."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per step."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    ema: float = typer.Option(0.999, "--ema", help="EMA decay of the saved weights."),
    channels_base: int = typer.Option(32, "--width", help="UNet base channel count."),
    levels: int = typer.Option(2, "--levels", help="UNet resolution levels."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N training images."),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every",
                                         help="Save a resumable checkpoint every N steps (0: only at the end)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from --out."),
    temperature: Optional[str] = smoothing_options.TEMPERATURE,
    k: int = smoothing_options.K,
    sigma_collapse: Optional[float] = typer.Option(None, "--sigma-collapse", help="Smooth at and below this sigma "
                                                   "(default: c of c/sigma, every sigma for a constant T)."),
    knn_features: Optional[str] = smoothing_options.KNN_FEATURES,
    denominator: Literal["sigma", "shell"] = smoothing_options.DENOMINATOR,
    kernel: Optional[float] = smoothing_options.KERNEL,
    kernel_samples: int = smoothing_options.KERNEL_SAMPLES,
    uncondition: bool = smoothing_options.UNCONDITION,
    class_conditional: bool = typer.Option(False, "--class-conditional", help="Train a class-conditional UNet on "
                                           "DATA's labels (class subfolders, or a 'labels' array in the .npz)."),
    sigma_sampling: Literal["lognormal", "loguniform"] = smoothing_options.SIGMA_SAMPLING,
    resize: Optional[int] = RESIZE,
    channels: Optional[int] = CHANNELS,
    seed: int = SEED,
    device: str = DEVICE,
    cache_dir: Optional[str] = CACHE_DIR,
    quiet: bool = QUIET,
) -> None:
    """Train the built-in UNet denoiser on DATA (EDM loss; a smoothed target with --temperature or --kernel, no
    noise input with --uncondition) and save a native checkpoint."""
    dev = resolve_device(device)
    smoothing = SmoothingConfig(temperature=temperature, k=k, sigma_collapse=sigma_collapse, features=knn_features,
                                denominator=denominator, kernel=kernel, kernel_samples=kernel_samples,
                                uncondition=uncondition)
    smoothing.validate()
    with data_loading("load DATA", quiet) as reporting:
        dataset = load_dataset(data, resize=resize, channels=channels, limit=limit, cache_dir=cache_dir, **reporting)
    images = dataset.images.to(dev)
    labels, classes = training_labels(dataset, class_conditional, smoothing.action)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema, seed=seed,
                         checkpoint_every=checkpoint_every, sigma_sampling=sigma_sampling)
    config.validate()
    for option, value in (("--width", channels_base), ("--levels", levels)):
        if value < 1:
            raise UserError(f"{option} must be >= 1, not {value}")
    check_distinct_paths(inputs={"DATA": data}, outputs={"--out": out})
    model = make_unet_denoiser(tuple(images.shape[1:]), base_channels=channels_base,
                               channel_mult=tuple([1] + [2] * (levels - 1)), seed=seed, num_classes=classes).to(dev)
    check_output_folder(out)
    if not resume and is_native(out) and not quiet:
        Console(stderr=True).print(f"replacing the checkpoint in {out}")
    extra = prepare(model, smoothing, config, {"data": str(data), "num_images": int(images.shape[0])})
    entry = {**history_entry(smoothing, config, **extra), "action": "train" if smoothing.action == "denoise"
             else f"train+{smoothing.action}", **({"num_classes": classes} if classes else {})}
    try:
        with progress_tracker(quiet=quiet) as tracker:
            fit(model, images, config, out, [entry], target_fn=make_target(images, smoothing), resume=resume,
                progress=tracker.task("train", steps),
                settings={"architecture": model.net.architecture, "smoothing": smoothing.record()}, labels=labels)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; progress is saved in {out}: run the same command with --resume "
                                "to continue") from None
    if not quiet:
        Console(stderr=True).print(f"saved {out} ({steps} steps on {images.shape[0]} images)")


def training_labels(dataset: Dataset, class_conditional: bool, action: str):
    """(labels, number of classes) for --class-conditional, else (None, None); UserError when DATA has no labels
    or a smoothed target is asked for too (the smoothing targets mix images of every class)."""
    if not class_conditional:
        return None, None
    if dataset.labels is None:
        raise UserError(f"--class-conditional needs class labels, but {dataset.labels_problem}")
    if action != "denoise":
        raise UserError("--class-conditional trains the plain denoising target: drop --temperature, --kernel and "
                        "--uncondition")
    return dataset.labels, max(int(dataset.labels.max()) + 1, len(dataset.class_names or []))
