"""CIFAR ResNets (ResNet-20/32/56): the GCE paper's CIFAR-10/100 and Tiny ImageNet architecture is ResNet-56.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, https://arxiv.org/abs/1512.03385,
§4.2: a 3x3 stem of 16 channels, then 3 stages of n basic blocks with 16/32/64 channels (depth = 6n + 2),
global average pooling and a linear head. Shortcuts are option A (identity, subsampled and zero-padded
where the shape changes), which adds no parameters: 0.27M / 0.46M / 0.85M for depth 20 / 32 / 56.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gce.models.base import Classifier, residual_stages
from gce.validation import is_int

__all__ = ["CifarResNet", "resnet20", "resnet32", "resnet56"]


class PadShortcut(nn.Module):
    """Option-A shortcut: take every other pixel and zero-pad the new channels (parameter-free)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra_channels - half))


class BasicBlock(nn.Module):
    """conv3x3 → BN → ReLU → conv3x3 → BN, added to the shortcut, then ReLU (post-activation)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        changes_shape = stride != 1 or in_planes != planes
        self.shortcut = PadShortcut(planes - in_planes) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Classifier):
    """ResNet-(6n+2) for small images; features are the 64-d globally pooled activations."""

    def __init__(self, *, depth: int = 20, **common: Any):
        super().__init__(**common)
        if not is_int(depth, 8) or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...); got {depth!r}")
        self.depth = depth
        self.conv1 = nn.Conv2d(self.input_shape[0], 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layers = residual_stages(BasicBlock, 16, (16, 32, 64), (depth - 2) // 6)
        self.head = nn.Linear(64, self.num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


def resnet20(**common: Any) -> CifarResNet:
    """ResNet-20 (n = 3), ≈0.27M parameters for 10 classes."""
    return CifarResNet(depth=20, **common)


def resnet32(**common: Any) -> CifarResNet:
    """ResNet-32 (n = 5), ≈0.46M parameters for 10 classes."""
    return CifarResNet(depth=32, **common)


def resnet56(**common: Any) -> CifarResNet:
    """ResNet-56 (n = 9), ≈0.85M parameters for 10 classes: the GCE paper's CIFAR model."""
    return CifarResNet(depth=56, **common)
