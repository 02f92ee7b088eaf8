"""LeNet-5 as in the GCE authors' MNIST code (henry8527/GCE), the paper's MNIST architecture.

LeCun et al., "Gradient-based learning applied to document recognition", Proc. IEEE 1998; layer sizes and
ReLU/max-pool choices follow Chen et al., "Improving Adversarial Robustness via Guided Complement Entropy",
ICCV 2019, https://arxiv.org/abs/1903.09799 (https://github.com/henry8527/GCE).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gce.models.base import Classifier

__all__ = ["LeNet5"]


class LeNet5(Classifier):
    """conv 6@5x5 pad 2 → ReLU → pool → conv 16@5x5 → ReLU → pool → fc120 → ReLU → fc84 → ReLU → fc.

    Channels and the flatten size come from ``input_shape`` (28x28 → 16·5·5 = 400, 32x32 → 16·6·6 = 576).
    Features are the 84-d activations before the head. 61,706 parameters for MNIST with 10 classes.
    """

    MIN_SIZE = 12  # smallest height/width for which the second pooling still has an output

    def __init__(self, **common: Any):
        super().__init__(**common)
        channels, height, width = self.input_shape
        if min(height, width) < self.MIN_SIZE:
            raise ValueError(
                f"input_shape {self.input_shape} is too small for lenet5: height and width must be "
                f">= {self.MIN_SIZE}"
            )
        out_h, out_w = (height // 2 - 4) // 2, (width // 2 - 4) // 2
        self.conv1 = nn.Conv2d(channels, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * out_h * out_w, 120)
        self.fc2 = nn.Linear(120, 84)
        self.head = nn.Linear(84, self.num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # ReLU after the pool: the same values (ReLU is monotone, so it commutes with max) on 4x fewer elements.
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        # reshape, not view: under channels_last the pooled tensor is not contiguous in NCHW order
        x = x.reshape(x.shape[0], -1)
        return F.relu(self.fc2(F.relu(self.fc1(x))))
