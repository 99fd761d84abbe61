"""Options shared by several subcommands, and small helpers to turn them into objects."""

from __future__ import annotations

from typing import Optional

import torch
import typer

from memaudit.errors import UserError

DEVICE = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N.")
RESIZE = typer.Option(None, "--resize", help="Resize every training image to N x N.")
CHANNELS = typer.Option(None, "--channels", help="Force 1 (grayscale) or 3 (RGB) channels.")
SEED = typer.Option(0, "--seed", help="Random seed (same seed and device = same results).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")


def resolve_device(name: str) -> torch.device:
    """A torch device, checked to exist (cuda without a GPU is a one-line error)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device


def positive(value: Optional[float], name: str) -> None:
    if value is not None and not value > 0:
        raise UserError(f"{name} must be > 0, not {value}")
