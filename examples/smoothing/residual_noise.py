"""Why the old unconditioned SDE samples kept visible noise, measured (issue 9, item 2).

    python examples/smoothing/residual_noise.py UNCONDITIONED_MODEL [CONDITIONED_MODEL]

The old `sde` sampler was the Euler-Maruyama reverse SDE with 18 steps: x' = x + (s^2 - s'^2) s(x, s) +
sqrt(s^2 - s'^2) z, with s(x, s) = (D(x, s) - x) / s^2. It is re-implemented here (it is no longer in the sampler
table) beside today's `sde` (DPM-Solver++(2M) SDE, 50 steps). Each row is 256 samples with seed 0; the columns are
the fraction memorized (NN ratio < 1/3), the RMS pixel distance to the nearest training image and the
high-frequency (Laplacian) energy. Training images plus Gaussian noise calibrate what a noisy copy scores.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from memaudit.data import load_images  # noqa: E402
from memaudit.metrics.nn_ratio import nn_ratios  # noqa: E402
from memaudit.models.load import load_model  # noqa: E402
from memaudit.sampling import SamplerConfig, cpu_noise, sample  # noqa: E402

LAPLACE = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])[None, None]
N = 256


@torch.no_grad()
def euler_maruyama(model, steps: int, seed: int = 0) -> torch.Tensor:
    """The old `sde`: Euler-Maruyama reverse-SDE steps on the Karras schedule, then a final D at sigma_min."""
    config = SamplerConfig(sampler="heun", steps=steps)
    sigmas = config.sigmas_for(model).tolist()
    noise = cpu_noise(torch.Generator().manual_seed(seed), N)
    x = noise(torch.empty((N, *model.image_shape))) * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = model(x, torch.full((N,), s))
        if s_next == 0:
            return denoised
        var = s**2 - s_next**2
        x = x + var * (denoised - x) / s**2 + math.sqrt(var) * noise(x)
    return x


def row(name: str, x: torch.Tensor, train: torch.Tensor) -> str:
    nn = nn_ratios(x, train)
    rms = float(nn.d1.mean()) / math.sqrt(x[0].numel())
    hf = float(F.conv2d(x, LAPLACE.to(x.dtype)).pow(2).mean())
    return f"| {name} | {float((nn.ratio < 1 / 3).double().mean()):.3f} | {rms:.3f} | {hf:.3f} |"


def main() -> None:
    train = load_images(ROOT / "examples" / "digits" / "digits32.npz")
    held = load_images(ROOT / "examples" / "digits" / "digits.npz")[1000:1000 + N]
    print("| samples (256) | memorized | RMS to nearest | HF energy |")
    print("|---|---:|---:|---:|")
    print(row("training images", train, train))
    print(row("held-out real digits", held, train))
    gen = torch.Generator().manual_seed(0)
    for s in (0.05, 0.1, 0.2):
        copies = train[torch.randint(0, len(train), (N,), generator=gen)]
        print(row(f"training image + N(0, {s}^2)", copies + s * torch.randn(copies.shape, generator=gen), train))
    for spec in sys.argv[1:]:
        model = load_model(spec, train=train)
        label = Path(spec).name
        print(row(f"{label}: old sde (Euler-Maruyama, 18 steps)", euler_maruyama(model, 18), train))
        print(row(f"{label}: old sde at 50 steps", euler_maruyama(model, 50), train))
        for sampler in ("sde", "pc", "heun"):
            x, _ = sample(model, N, SamplerConfig(sampler=sampler), seed=0, batch_size=128)
            print(row(f"{label}: {sampler} (50 steps)", x, train))


if __name__ == "__main__":
    main()
