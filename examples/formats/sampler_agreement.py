"""Memorized fraction of one memorizing diffusers model, sampled by diffusers' own DDPMPipeline and by memaudit.

Trains a tiny UNet2DModel on a handful of 8x8 digits with the DDPM epsilon loss (DDPMScheduler's add_noise) until
it memorizes, saves the pipeline folder, then measures memaudit's NN ratio (d1/d2 < 1/3 = memorized) on
  (a) DDPMPipeline samples (diffusers' ancestral sampler, its clip_sample), and
  (b) `memaudit scan` of the folder with its ddpm and heun samplers.
The fractions should agree within binomial sampling error sqrt(p (1 - p) / n).

    PYTHONPATH=. python examples/formats/sampler_agreement.py --out /tmp/agreement
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import diffusers
from memaudit.metrics.nn_ratio import memorized, nn_ratios

ROOT = Path(__file__).resolve().parents[2]


def digits(n: int) -> np.ndarray:
    with np.load(ROOT / "examples" / "digits" / "digits.npz", allow_pickle=False) as npz:
        return npz["images"][:n]


def train(images: torch.Tensor, steps: int, timesteps: int, seed: int):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                                 layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=timesteps)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x0 = images[torch.randint(0, len(images), (32,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, timesteps, (32,), generator=gen)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    return unet.eval(), scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--timesteps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pixels = digits(args.images)
    np.save(args.out / "train.npy", pixels)
    images = torch.from_numpy(pixels).float()[:, None] / 127.5 - 1
    unet, scheduler = train(images, args.steps, args.timesteps, args.seed)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.save_pretrained(args.out / "pipeline")

    with torch.no_grad():
        out = pipe(batch_size=args.samples, generator=torch.Generator().manual_seed(args.seed + 1),
                   num_inference_steps=args.timesteps, output_type="np").images  # (n, 8, 8, 1) in [0, 1]
    library = torch.from_numpy(out).permute(0, 3, 1, 2).float() * 2 - 1
    results = {"DDPMPipeline (diffusers)": memorized(nn_ratios(library, images).ratio.numpy(), 1 / 3)}
    for sampler in ("ddpm", "heun"):
        report = args.out / f"scan-{sampler}.json"
        subprocess.run([sys.executable, "-m", "memaudit", "scan", str(args.out / "pipeline"), str(args.out / "train.npy"),
                        "--samples", str(args.samples), "--sampler", sampler, "--steps", str(args.timesteps),
                        "--skip", "jacobian", "--skip", "cosine", "--skip", "entropy", "--fid", "off", "--quiet",
                        "--json", str(report)], check=False)
        summary = json.loads(report.read_text())["runs"][sampler]
        results[f"memaudit scan --sampler {sampler}"] = summary["nn_ratio"]["memorized_fraction"]
    for name, p in results.items():
        print(f"{name:32} memorized fraction {p:.3f} +- {math.sqrt(p * (1 - p) / args.samples):.3f}")
    (args.out / "agreement.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
