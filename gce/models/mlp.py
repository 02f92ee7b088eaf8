"""A one-hidden-layer perceptron: the tiny, fast model that tests of losses, attacks and training use."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gce.models.base import Classifier

__all__ = ["MLP"]


class MLP(Classifier):
    """flatten → Linear(hidden) → ReLU → head; features are the hidden activations."""

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        hidden: int = 64,
    ):
        super().__init__(input_shape=input_shape, num_classes=num_classes, mean=mean, std=std)
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise ValueError(f"hidden must be an int >= 1; got {hidden!r}")
        self.fc = nn.Linear(math.prod(self.input_shape), hidden)
        self.head = nn.Linear(hidden, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x.reshape(x.shape[0], -1)))
