"""`memaudit train DATA --out model/`: train the built-in UNet with the EDM loss."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from memaudit.atomic import check_distinct_paths
from memaudit.cli.options import CHANNELS, DEVICE, QUIET, RESIZE, SEED, resolve_device
from memaudit.data import load_images
from memaudit.errors import UserError
from memaudit.models.native import check_output_folder, is_native, make_unet_denoiser
from memaudit.progress import progress_tracker
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
    resize: Optional[int] = RESIZE,
    channels: Optional[int] = CHANNELS,
    seed: int = SEED,
    device: str = DEVICE,
    quiet: bool = QUIET,
) -> None:
    """Train the built-in UNet denoiser on DATA (EDM loss) and save a native checkpoint."""
    dev = resolve_device(device)
    images = load_images(data, resize=resize, channels=channels, limit=limit).to(dev)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema, seed=seed,
                         checkpoint_every=checkpoint_every)
    config.validate()
    for option, value in (("--width", channels_base), ("--levels", levels)):
        if value < 1:
            raise UserError(f"{option} must be >= 1, not {value}")
    check_distinct_paths(inputs={"DATA": data}, outputs={"--out": out})
    model = make_unet_denoiser(tuple(images.shape[1:]), base_channels=channels_base,
                               channel_mult=tuple([1] + [2] * (levels - 1)), seed=seed).to(dev)
    check_output_folder(out)
    if not resume and is_native(out) and not quiet:
        Console(stderr=True).print(f"replacing the checkpoint in {out}")
    history = [{"action": "train", "data": str(data), "num_images": int(images.shape[0]),
                "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}]
    try:
        with progress_tracker(quiet=quiet) as tracker:
            fit(model, images, config, out, history, resume=resume, progress=tracker.task("train", steps),
                settings={"architecture": model.net.architecture})
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; progress is saved in {out}: run the same command with --resume "
                                "to continue") from None
    if not quiet:
        Console(stderr=True).print(f"saved {out} ({steps} steps on {images.shape[0]} images)")
