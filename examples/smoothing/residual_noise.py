"""Why the old unconditioned SDE samples kept visible noise, measured (issue 9, item 2).

    python examples/smoothing/residual_noise.py MODEL [MODEL ...] [--samplers sde heun] [--no-old-sde]

The old `sde` sampler was the Euler-Maruyama reverse SDE with 18 steps: x' = x + (s^2 - s'^2) s(x, s) +
sqrt(s^2 - s'^2) z, with s(x, s) = (D(x, s) - x) / s^2. It is re-implemented here (it is no longer in the sampler
table) beside today's `sde` (DPM-Solver++(2M) SDE, 50 steps). Each row is 256 samples with seed 0; the columns are
the fraction memorized (NN ratio < 1/3), the RMS pixel distance to the nearest training image and the
high-frequency (Laplacian) energy, and the mean top-class probability of a digit classifier (logistic regression
on digits 288-999, none of them training or held-out images): real digits score high, blobs and blends low.
Training images plus Gaussian noise calibrate what a noisy copy scores.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from memaudit.data import load_images  # noqa: E402
from memaudit.metrics.nn_ratio import NN_RATIO_THRESHOLD, memorized, nn_ratios  # noqa: E402
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


def digit_classifier():
    """Logistic regression on digits 288-999 (sklearn's load_digits labels; digits.npz is that set, in order)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    images = load_images(ROOT / "examples" / "digits" / "digits.npz").reshape(-1, 64).numpy()
    return LogisticRegression(max_iter=3000).fit(images[288:1000], load_digits().target[288:1000])


def row(name: str, x: torch.Tensor, train: torch.Tensor, classifier) -> str:
    nn = nn_ratios(x, train)
    rms = float(nn.d1.mean()) / math.sqrt(x[0].numel())
    hf = float(F.conv2d(x, LAPLACE.to(x.dtype)).pow(2).mean())
    confidence = float(classifier.predict_proba(x.reshape(len(x), -1).numpy()).max(1).mean())
    fraction = memorized(nn.ratio.numpy(), NN_RATIO_THRESHOLD)
    return f"| {name} | {fraction:.3f} | {rms:.3f} | {hf:.3f} | {confidence:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--samplers", nargs="+", default=["sde", "pc", "heun"])
    parser.add_argument("--no-old-sde", action="store_true", help="leave out the Euler-Maruyama rows")
    args = parser.parse_args()
    train = load_images(ROOT / "examples" / "digits" / "digits32.npz")
    held = load_images(ROOT / "examples" / "digits" / "digits.npz")[1000:1000 + N]
    clf = digit_classifier()
    print("| samples (256) | memorized | RMS to nearest | HF energy | classifier confidence |")
    print("|---|---:|---:|---:|---:|")
    print(row("training images", train, train, clf))
    print(row("held-out real digits", held, train, clf))
    gen = torch.Generator().manual_seed(0)
    for s in (0.05, 0.1, 0.2):
        copies = train[torch.randint(0, len(train), (N,), generator=gen)]
        print(row(f"training image + N(0, {s}^2)", copies + s * torch.randn(copies.shape, generator=gen), train, clf))
    for spec in args.models:
        model = load_model(spec, train=train)
        label = Path(spec).name
        if not args.no_old_sde:
            print(row(f"{label}: old sde (Euler-Maruyama, 18 steps)", euler_maruyama(model, 18), train, clf))
            print(row(f"{label}: old sde at 50 steps", euler_maruyama(model, 50), train, clf))
        for sampler in args.samplers:
            x, _ = sample(model, N, SamplerConfig(sampler=sampler), seed=0, batch_size=128)
            print(row(f"{label}: {sampler} (50 steps)", x, train, clf), flush=True)


if __name__ == "__main__":
    main()
