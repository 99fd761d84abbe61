"""Train a tiny latent diffusion model on the bundled 8x8 digits in seconds and save it as a diffusers folder.

    python examples/latent/make_latent_model.py OUT [--images 32] [--vae-steps 300] [--unet-steps 200]

OUT/vae (AutoencoderKL, 1x8x8 images -> 4x4x4 latents, scaling_factor = 1 / std of the training latents),
OUT/unet (UNet2DModel on the latents, epsilon prediction) and OUT/scheduler (DDPMScheduler): the layout of a
diffusers pipeline folder, which `memaudit scan OUT examples/digits/digits32.npz` and `memaudit inspect OUT` read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

DIGITS = Path(__file__).resolve().parents[1] / "digits" / "digits.npz"


def digits(count: int) -> torch.Tensor:
    """The first `count` bundled digits as (N, 1, 8, 8) in [-1, 1]."""
    with np.load(DIGITS, allow_pickle=False) as npz:
        return torch.from_numpy(npz["images"][:count].astype(np.float32) / 127.5 - 1)[:, None]


def tiny_vae(latent_channels: int = 4):
    """An AutoencoderKL with one 2x downsampling: 1x8x8 images <-> latent_channels x 4 x 4 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=8,
                         mid_block_add_attention=False)


def tiny_unet(latent_shape):
    from diffusers import UNet2DModel

    c, h, _ = latent_shape
    return UNet2DModel(sample_size=h, in_channels=c, out_channels=c, block_out_channels=(16, 32), norm_num_groups=8,
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))


def train_vae(images: torch.Tensor, steps: int, seed: int = 0, kl: float = 1e-4):
    """Reconstruction (MSE) + kl * KL training of tiny_vae; sets scaling_factor = 1 / std of the latent means."""
    torch.manual_seed(seed)
    vae = tiny_vae()
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(steps):
        post = vae.encode(images).latent_dist
        recon = vae.decode(post.sample()).sample
        loss = (recon - images).pow(2).mean() + kl * post.kl().mean() / images[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        std = float(vae.encode(images).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


def train_unet(latents: torch.Tensor, steps: int, seed: int = 0, timesteps: int = 200):
    """Epsilon-prediction DDPM training of tiny_unet on the (scaled) latents."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    unet = tiny_unet(tuple(latents.shape[1:]))
    scheduler = DDPMScheduler(num_train_timesteps=timesteps, clip_sample=False)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    for _ in range(steps):
        t = torch.randint(0, timesteps, (latents.shape[0],))
        noise = torch.randn_like(latents)
        loss = (unet(scheduler.add_noise(latents, noise, t), t).sample - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval(), scheduler


def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """z = scaling_factor * the posterior mean (what memaudit encodes the training set to)."""
    with torch.no_grad():
        return vae.encode(images).latent_dist.mean * vae.config.scaling_factor


def save_pipeline(out: Path, unet, scheduler, vae) -> None:
    unet.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    vae.save_pretrained(out / "vae")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--unet-steps", type=int, default=200)
    args = parser.parse_args()
    images = digits(args.images)
    vae = train_vae(images, args.vae_steps)
    unet, scheduler = train_unet(encode(vae, images), args.unet_steps)
    save_pipeline(args.out, unet, scheduler, vae)
    with torch.no_grad():
        rms = float((vae.decode(encode(vae, images) / vae.config.scaling_factor).sample - images).pow(2).mean().sqrt())
    print(f"saved {args.out}: reconstruction RMS {rms:.3f} (images in [-1, 1]), scaling factor "
          f"{vae.config.scaling_factor:.4g}")


if __name__ == "__main__":
    main()
