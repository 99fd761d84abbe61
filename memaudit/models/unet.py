"""A small UNet (a few 100k to 2M parameters) taking (x_in, noise_in) -> output, for native checkpoints.

With num_classes = N it is class-conditional: forward(x_in, noise_in, class_labels) adds a learned embedding of
the label (nn.Embedding(N, emb_dim)) to the noise embedding, as guided-diffusion and diffusers' num_class_embeds do.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
import torch.nn.functional as F


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class NoiseEmbedding(nn.Module):
    """Sinusoidal embedding of the scalar noise input followed by a 2-layer MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, noise_in: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=noise_in.device) / half)
        angles = noise_in.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
        return self.mlp(emb)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the noise embedding added in between, plus a skip connection."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """UNet with `len(channel_mult)` resolution levels; H and W must be divisible by 2**(levels-1)."""

    def __init__(self, in_channels: int = 1, base_channels: int = 32, channel_mult: tuple[int, ...] = (1, 2),
                 num_res_blocks: int = 1, emb_dim: int = 128, dropout: float = 0.0,
                 num_classes: int | None = None):
        super().__init__()
        self.config = dict(in_channels=in_channels, base_channels=base_channels,
                           channel_mult=list(channel_mult), num_res_blocks=num_res_blocks,
                           emb_dim=emb_dim, dropout=dropout, **({"num_classes": num_classes} if num_classes else {}))
        self.embed = NoiseEmbedding(emb_dim)
        self.num_classes = num_classes
        self.class_embed = nn.Embedding(num_classes, emb_dim) if num_classes else None
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        chans = [base_channels * m for m in channel_mult]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, c = [base_channels], base_channels
        for level, ch in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c, ch, emb_dim, dropout))
                c = ch
                skips.append(c)
            self.down.append(blocks)
            last = level == len(chans) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
            if not last:
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout), ResBlock(c, c, emb_dim, dropout)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, ch in reversed(list(enumerate(chans))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(c + skips.pop(), ch, emb_dim, dropout))
                c = ch
            self.up.append(blocks)
            self.upsample.append(nn.Conv2d(c, c, 3, padding=1) if level > 0 else nn.Identity())
        self.out_norm = nn.GroupNorm(_groups(c), c)
        self.out = nn.Conv2d(c, in_channels, 3, padding=1)
        self.levels = len(chans)

    def forward(self, x: Tensor, noise_in: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.embed(noise_in.reshape(-1).expand(x.shape[0]) if noise_in.numel() == 1 else noise_in)
        if (class_labels is None) != (self.class_embed is None):
            raise ValueError("a class-conditional UNet needs class_labels; an unconditional one takes none")
        if self.class_embed is not None:
            emb = emb + self.class_embed(class_labels.long())
        h = self.stem(x)
        hs = [h]
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
                hs.append(h)
            if level < self.levels - 1:
                h = self.downsample[level](h)
                hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for i, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if i < self.levels - 1:
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))
