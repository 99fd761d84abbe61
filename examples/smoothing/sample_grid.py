"""A PNG of samples beside their nearest training images, to see what a lower memorized fraction is made of.

    python examples/smoothing/sample_grid.py OUT.png MODEL[@SAMPLER] [MODEL[@SAMPLER] ...]

One band per model: 16 samples (sde unless @SAMPLER says otherwise, seed 0) on the top row, their nearest training images (of the 32 bundled
digits) below, each 8x8 digit scaled 4x.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from memaudit.data import load_images  # noqa: E402
from memaudit.metrics.nn_ratio import nn_ratios  # noqa: E402
from memaudit.models.load import load_model  # noqa: E402
from memaudit.sampling import SamplerConfig, sample  # noqa: E402

N, SCALE, GAP = 16, 4, 4


def band(x: torch.Tensor, train: torch.Tensor) -> np.ndarray:
    """Two rows: the samples and their nearest training images, as uint8 pixels."""
    near = train[nn_ratios(x, train).nearest]
    rows = [torch.cat(list(t[:, 0]), dim=1) for t in (x, near)]
    img = torch.cat([rows[0], torch.full((1, rows[0].shape[1]), -1.0), rows[1]], 0)
    return ((img.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()


def main() -> None:
    out, specs = Path(sys.argv[1]), sys.argv[2:]
    train = load_images(ROOT / "examples" / "digits" / "digits32.npz")
    bands = []
    for item in specs:
        spec, _, sampler = item.partition("@")
        x, _ = sample(load_model(spec, train=train), N, SamplerConfig(sampler=sampler or "sde"), seed=0, batch_size=N)
        bands += [band(x, train), np.zeros((GAP, N * 8), np.uint8)]
    img = Image.fromarray(np.concatenate(bands[:-1], 0))
    img.resize((img.width * SCALE, img.height * SCALE), Image.NEAREST).save(out)
    print(f"wrote {out}: {', '.join(specs)}")


if __name__ == "__main__":
    main()
