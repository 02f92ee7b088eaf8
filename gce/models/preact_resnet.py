"""PreActResNet-18 for CIFAR: the common baseline of the adversarial-training literature.

He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016, https://arxiv.org/abs/1603.05027:
BN → ReLU before each convolution, so the shortcut path stays a pure identity. The CIFAR variant (a 3x3
stem of 64 channels, 4 stages of 2 blocks with 64/128/256/512 channels, 1x1 convolution shortcuts where the
shape changes) follows Rice et al., "Overfitting in adversarially robust deep learning", ICML 2020,
https://arxiv.org/abs/2002.11569, including the final BN → ReLU before pooling: ≈11.17M parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gce.models.base import Classifier

__all__ = ["PreActResNet18"]


class PreActBlock(nn.Module):
    """BN → ReLU → conv3x3 → BN → ReLU → conv3x3, added to the (pre-activated, if projected) input."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(Classifier):
    """PreActResNet-18; features are the 512-d globally pooled activations after the final BN → ReLU."""

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__(input_shape=input_shape, num_classes=num_classes, mean=mean, std=std)
        self.conv1 = nn.Conv2d(self.input_shape[0], 64, 3, stride=1, padding=1, bias=False)
        layers: list[nn.Module] = []
        in_planes = 64
        for stage, planes in enumerate((64, 128, 256, 512)):
            for i in range(2):
                layers.append(PreActBlock(in_planes, planes, 2 if stage > 0 and i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.head = nn.Linear(512, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        # adaptive pooling rather than avg_pool2d(4), so that 28x28 inputs work too
        return F.adaptive_avg_pool2d(out, 1).flatten(1)
