"""Wide residual networks (WRN-depth-k), the architecture of most robust-training leaderboards.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016, https://arxiv.org/abs/1605.07146: a 3x3 stem of
16 channels, 3 stages of (depth - 4) / 6 pre-activation blocks with 16k/32k/64k channels, dropout between
the two convolutions of a block, final BN → ReLU → global pooling. WRN-28-10 has ≈36.5M parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gce.models.base import Classifier

__all__ = ["WideResNet"]


class WideBlock(nn.Module):
    """BN → ReLU → conv3x3 → BN → ReLU → dropout → conv3x3, plus a 1x1 projection where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
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
        # as in the reference implementation, a projecting shortcut takes the pre-activated input
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.dropout(F.relu(self.bn2(self.conv1(out))))
        return self.conv2(out) + shortcut


class WideResNet(Classifier):
    """WRN-``depth``-``widen_factor``; features are the 64k-d globally pooled activations."""

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__(input_shape=input_shape, num_classes=num_classes, mean=mean, std=std)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, 40, ...); got {depth!r}")
        if not isinstance(widen_factor, int) or isinstance(widen_factor, bool) or widen_factor < 1:
            raise ValueError(f"widen_factor must be an int >= 1; got {widen_factor!r}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1); got {dropout!r}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.depth, self.widen_factor, self.dropout = depth, widen_factor, float(dropout)
        self.conv1 = nn.Conv2d(self.input_shape[0], 16, 3, stride=1, padding=1, bias=False)
        layers: list[nn.Module] = []
        in_planes = 16
        for stage, planes in enumerate(widths):
            for i in range(n):
                layers.append(WideBlock(in_planes, planes, 2 if stage > 0 and i == 0 else 1, float(dropout)))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.head = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)
