"""A one-hidden-layer perceptron: the tiny, fast model that tests of losses, attacks and training use."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gce.models.base import Classifier
from gce.validation import check_int

__all__ = ["MLP"]


class MLP(Classifier):
    """flatten → Linear(hidden) → ReLU → head; features are the hidden activations."""

    def __init__(self, *, hidden: int = 64, **common: Any):
        super().__init__(**common)
        check_int("hidden", hidden)
        self.fc = nn.Linear(math.prod(self.input_shape), hidden)
        self.head = nn.Linear(hidden, self.num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x.reshape(x.shape[0], -1)))
