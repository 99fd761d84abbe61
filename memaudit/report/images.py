"""Image grids for the report (no torchvision): sample grids and "sample | nearest training image" pairs."""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from memaudit.atomic import atomic_path
from memaudit.data import to_uint8


def auto_upscale(height: int, target: int = 64) -> int:
    """Integer nearest-neighbour factor that makes an image about `target` pixels tall (at least 1)."""
    return max(1, math.ceil(target / max(1, int(height))))


def image_grid(images: Tensor, nrow: int = 8, padding: int = 2, upscale: int = 1,
               pad_value: int = 255) -> Image.Image:
    """Tile (N, C, H, W) images in [-1, 1] into one PIL image, `nrow` images per row.

    Each image is upscaled by an integer factor (nearest neighbour, so 8x8 digits stay crisp), and
    images are separated by `padding` pixels of `pad_value`, also around the border. Size:
    width = cols * W * upscale + (cols + 1) * padding, height likewise with rows = ceil(N / nrow).
    C = 1 gives a grayscale ("L") image, C = 3 an RGB image.
    """
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError("image_grid: images must be a (N, C, H, W) tensor")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("image_grid: no images to tile")
    if c not in (1, 3):
        raise ValueError(f"image_grid: images must have 1 or 3 channels, got {c}")
    if nrow < 1 or padding < 0 or upscale < 1:
        raise ValueError("image_grid: need nrow >= 1, padding >= 0, upscale >= 1")
    pixels = to_uint8(images)  # (N, H, W, C)
    if upscale > 1:
        pixels = pixels.repeat(upscale, axis=1).repeat(upscale, axis=2)
    ch, cw = h * upscale, w * upscale
    cols = min(nrow, n)
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * ch + (rows + 1) * padding, cols * cw + (cols + 1) * padding, c),
                     pad_value, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y = padding + r * (ch + padding)
        x = padding + col * (cw + padding)
        canvas[y:y + ch, x:x + cw] = pixels[i]
    return Image.fromarray(np.ascontiguousarray(canvas[..., 0]) if c == 1 else canvas)  # "L" / "RGB"


def _match_channels(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if a.shape[1] == b.shape[1]:
        return a, b
    return a.expand(-1, 3, -1, -1) if a.shape[1] == 1 else a, b.expand(-1, 3, -1, -1) if b.shape[1] == 1 else b


LABEL_HEIGHT = 12  # pixels of the column-label strip above a pairs grid (PIL's default bitmap font is 11 tall)
PAIR_LABELS = ("sample", "nearest")


def with_column_labels(grid: Image.Image, labels: Sequence[str], cell_width: int, padding: int) -> Image.Image:
    """The grid under a white strip naming each column (labels repeat across the columns), left-aligned."""
    out = Image.new(grid.mode, (grid.width, grid.height + LABEL_HEIGHT), 255 if grid.mode == "L" else (255,) * 3)
    out.paste(grid, (0, LABEL_HEIGHT))
    draw = ImageDraw.Draw(out)
    columns = (grid.width - padding) // (cell_width + padding)
    for col in range(columns):
        x = padding + col * (cell_width + padding) + 1  # one pixel in: a glyph's left bearing may reach back
        text = labels[col % len(labels)]
        while text and draw.textbbox((x, 0), text)[2] > x + cell_width - 2:
            text = text[:-1]  # cut to the cell: "nearest" over a 32-pixel cell reads "neare"
        draw.text((x, 0), text, fill=0 if grid.mode == "L" else (0, 0, 0))
    return out


def pairs_grid(samples: Tensor, train: Tensor, sample_indices: Sequence[int], nearest_indices: Sequence[int],
               padding: int = 2, upscale: int | None = None, pairs_per_row: int = 1,
               labels: bool = True) -> Image.Image:
    """`pairs_per_row` pairs per row, each samples[sample_indices[k]] | train[nearest_indices[k]], under a strip
    labelling the columns "sample" and "nearest" (training image) unless labels=False.

    Grayscale and RGB inputs are mixed by expanding grayscale to RGB. `upscale` defaults to
    auto_upscale(H). Raises ValueError when there are no pairs or the image sizes differ.
    """
    sample_indices, nearest_indices = list(sample_indices), list(nearest_indices)
    if len(sample_indices) != len(nearest_indices):
        raise ValueError("pairs_grid: sample_indices and nearest_indices must have the same length")
    if not sample_indices:
        raise ValueError("pairs_grid: no pairs to show")
    if samples.shape[-2:] != train.shape[-2:]:
        raise ValueError(f"pairs_grid: sample size {tuple(samples.shape[-2:])} differs from training image "
                         f"size {tuple(train.shape[-2:])}")
    left = samples.detach().cpu().float()[torch.as_tensor(sample_indices, dtype=torch.long)]
    right = train[torch.as_tensor(nearest_indices, dtype=torch.long)].detach().cpu().float()  # (a store too)
    left, right = _match_channels(left, right)
    interleaved = torch.stack([left, right], dim=1).reshape(-1, *left.shape[1:])
    if upscale is None:
        upscale = auto_upscale(left.shape[-2])
    grid = image_grid(interleaved, nrow=2 * max(1, min(pairs_per_row, len(sample_indices))), padding=padding,
                      upscale=upscale)
    return with_column_labels(grid, PAIR_LABELS, left.shape[-1] * upscale, padding) if labels else grid


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    """Save a PIL image as PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
