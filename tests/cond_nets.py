"""A class-conditional test network whose weights are images: net(x, sigma, c) = the empirical denoiser of the
images labelled c, softmax_i(-||x - p_i||^2 / (2 sigma^2)) over {p_i : label_i = c} (param x0, schedule ve:
x_in = x, noise_in = sigma). Given the training images of a class it memorizes that class; given other images
of the class, its samples are copies of those, not of the training images."""

import torch
from torch import nn


class ClassEmpiricalNet(nn.Module):
    def __init__(self, num_points: int, side: int = 8):
        super().__init__()
        self.register_buffer("points", torch.zeros(num_points, 1, side, side))
        self.register_buffer("point_labels", torch.zeros(num_points, dtype=torch.long))

    def forward(self, x, noise_in, class_labels):
        p = self.points.flatten(1)
        d2 = torch.cdist(x.flatten(1).double(), p.double()) ** 2
        logits = -d2 / (2 * noise_in.double()[:, None] ** 2)
        logits = logits.masked_fill(self.point_labels[None] != class_labels[:, None], float("-inf"))
        return (torch.softmax(logits, 1) @ p.double()).to(x.dtype).reshape(x.shape)


def build(num_points: int, side: int = 8) -> nn.Module:
    return ClassEmpiricalNet(num_points, side)
