"""ResNet-18 (He et al. 2016) in torchvision's parameter layout, for feature-space neighbours without torchvision.

Features as the seed paper's kNN uses them (Zhou et al. 2026, released code `setup_feature_extractor`): images in
[-1, 1] mapped to [0, 1], grayscale repeated to RGB, resized bilinearly to 224, ImageNet mean/std normalised, the
trunk without avgpool and fc, global average pooling -> 512-d, L2-normalised.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memaudit.errors import UserError, first_lines

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                           if stride != 1 or c_in != c_out else None)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision.models.resnet18's modules and state-dict keys (conv1, bn1, layer1..4, fc)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, c = (64, 128, 256, 512), 64
        for i, width in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(c, width, stride), BasicBlock(width, width, 1)))
            c = width
        self.fc = nn.Linear(512, num_classes)

    def trunk(self, x: Tensor) -> Tensor:
        """The feature map before average pooling, (B, 512, h, w)."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ResNet18Features(nn.Module):
    """x (B, C, H, W) in [-1, 1] -> L2-normalised 512-d global-average-pooled ResNet-18 features."""

    def __init__(self, net: ResNet18, size: int = 224):
        super().__init__()
        self.net, self.size = net.eval(), size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = (x.float() + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        feats = self.net.trunk((x - self.mean) / self.std).mean((2, 3))
        return F.normalize(feats, dim=1)


def resnet18_features(path: str | Path, device) -> ResNet18Features:
    """ResNet18Features with the weights of a torchvision-layout state dict file (safetensors or a torch file
    read weights-only; the fc layer may be absent)."""
    from memaudit.models.statedict import read_state_dict

    state = read_state_dict(path)
    net = ResNet18()
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise UserError(f"{path} is not a ResNet-18 state dict in torchvision's layout: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    try:
        return ResNet18Features(net).to(device)
    except RuntimeError as exc:
        raise UserError(f"cannot place the ResNet-18 on {device}: {first_lines(exc)}") from None
