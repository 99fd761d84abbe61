"""Memorized fraction of one memorizing denoising-diffusion-pytorch model: its own sampler vs memaudit's.

Trains a tiny Unet + GaussianDiffusion (pred_noise) on a handful of 8x8 digits with the library's own loss and
EMA, saves it in the Trainer's format (model-N.pt + model-config.json), then measures memaudit's NN ratio on
  (a) GaussianDiffusion.sample (the library's ancestral sampler, which clips x0 to [-1, 1]), and
  (b) `memaudit scan` of model-N.pt with its ddpm and heun samplers.
Needs denoising-diffusion-pytorch (extra ddpm).

    PYTHONPATH=. python examples/formats/ddpm_pytorch_agreement.py --out /tmp/ddpm-agreement
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

import denoising_diffusion_pytorch as ddpm
from ema_pytorch import EMA
from memaudit.metrics.nn_ratio import memorized, nn_ratios

ROOT = Path(__file__).resolve().parents[2]
UNET = {"dim": 32, "dim_mults": [1, 2], "channels": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--timesteps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with np.load(ROOT / "examples" / "digits" / "digits.npz", allow_pickle=False) as npz:
        pixels = npz["images"][: args.images]
    np.save(args.out / "train.npy", pixels)
    data = torch.from_numpy(pixels).float()[:, None] / 255  # the library normalises [0, 1] -> [-1, 1] itself

    torch.manual_seed(0)
    diffusion = ddpm.GaussianDiffusion(ddpm.Unet(**{**UNET, "dim_mults": tuple(UNET["dim_mults"])}), image_size=8,
                                       timesteps=args.timesteps, objective="pred_noise", beta_schedule="linear")
    ema = EMA(diffusion, beta=0.995, update_every=1)
    opt = torch.optim.Adam(diffusion.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        loss = diffusion(data[torch.randint(0, len(data), (32,), generator=gen)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
        if step % 500 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    checkpoint = args.out / "model-1.pt"
    torch.save({"step": args.steps, "model": diffusion.state_dict(), "opt": opt.state_dict(),
                "ema": ema.state_dict(), "scaler": None, "version": "2.3.4"}, str(checkpoint))
    (args.out / "model-config.json").write_text(json.dumps({"unet": UNET, "diffusion": {"image_size": 8}}))

    torch.manual_seed(1)
    with torch.no_grad():
        library = ema.ema_model.eval().sample(batch_size=args.samples) * 2 - 1  # [0, 1] -> [-1, 1]
    train = data * 2 - 1
    results = {"GaussianDiffusion.sample (library)": memorized(nn_ratios(library, train).ratio.numpy(), 1 / 3)}
    for sampler in ("ddpm", "heun"):
        report = args.out / f"scan-{sampler}.json"
        subprocess.run([sys.executable, "-m", "memaudit", "scan", str(checkpoint), str(args.out / "train.npy"),
                        "--samples", str(args.samples), "--sampler", sampler, "--steps", str(args.timesteps),
                        "--skip", "jacobian", "--skip", "cosine", "--skip", "entropy", "--fid", "off", "--quiet",
                        "--json", str(report)], check=False, stdout=subprocess.DEVNULL)
        results[f"memaudit scan --sampler {sampler}"] = \
            json.loads(report.read_text())["runs"][sampler]["nn_ratio"]["memorized_fraction"]
    for name, p in results.items():
        print(f"{name:36} memorized fraction {p:.3f} +- {math.sqrt(p * (1 - p) / args.samples):.3f}")
    (args.out / "agreement.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
