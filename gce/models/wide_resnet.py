"""Wide residual networks (WRN-depth-k), the architecture of most robust-training leaderboards.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016, https://arxiv.org/abs/1605.07146: a 3x3 stem of
16 channels, 3 stages of (depth - 4) / 6 pre-activation blocks with 16k/32k/64k channels, dropout between
the two convolutions of a block, final BN → ReLU → global pooling. WRN-28-10 has ≈36.5M parameters.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gce.models.base import Classifier, residual_stages
from gce.models.preact_resnet import PreActBlock
from gce.validation import check_int, is_int, is_number

__all__ = ["WideResNet"]


class WideResNet(Classifier):
    """WRN-``depth``-``widen_factor``; features are the 64k-d globally pooled activations."""

    def __init__(self, *, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0, **common: Any):
        super().__init__(**common)
        if not is_int(depth, 10) or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, 40, ...); got {depth!r}")
        check_int("widen_factor", widen_factor)
        if not (is_number(dropout, 0) and dropout < 1):
            raise ValueError(f"dropout must be a number in [0, 1); got {dropout!r}")
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.depth, self.widen_factor, self.dropout = depth, widen_factor, float(dropout)
        self.conv1 = nn.Conv2d(self.input_shape[0], 16, 3, stride=1, padding=1, bias=False)
        block = partial(PreActBlock, dropout=float(dropout))
        self.layers = residual_stages(block, 16, widths, (depth - 4) // 6)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.head = nn.Linear(widths[-1], self.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)
