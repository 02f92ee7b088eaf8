"""PreActResNet-18 for CIFAR: the common baseline of the adversarial-training literature.

He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016, https://arxiv.org/abs/1603.05027:
BN → ReLU before each convolution, so the shortcut path stays a pure identity. The CIFAR variant (a 3x3
stem of 64 channels, 4 stages of 2 blocks with 64/128/256/512 channels, 1x1 convolution shortcuts where the
shape changes) follows Rice et al., "Overfitting in adversarially robust deep learning", ICML 2020,
https://arxiv.org/abs/2002.11569, including the final BN → ReLU before pooling: ≈11.17M parameters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gce.models.base import Classifier, residual_stages

__all__ = ["PreActBlock", "PreActResNet18"]


class PreActBlock(nn.Module):
    """BN → ReLU → conv3x3 → BN → ReLU → (dropout →) conv3x3, added to the input, or to a 1x1 projection of the
    pre-activated input where the shape changes (as in the reference implementations). Also WideResNet's block."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.dropout(F.relu(self.bn2(self.conv1(out))))
        return self.conv2(out) + shortcut


class PreActResNet18(Classifier):
    """PreActResNet-18; features are the 512-d globally pooled activations after the final BN → ReLU."""

    def __init__(self, **common: Any):
        super().__init__(**common)
        self.conv1 = nn.Conv2d(self.input_shape[0], 64, 3, stride=1, padding=1, bias=False)
        self.layers = residual_stages(PreActBlock, 64, (64, 128, 256, 512), 2)
        self.bn = nn.BatchNorm2d(512)
        self.head = nn.Linear(512, self.num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        # adaptive pooling rather than avg_pool2d(4), so that 28x28 inputs work too
        return F.adaptive_avg_pool2d(out, 1).flatten(1)
