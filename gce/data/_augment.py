"""Batch augmentations run on the device, vectorised over the batch (no Python loop per image).

Each augmentation is split in two: `sample` draws the random parameters of a whole epoch at once on a CPU
generator, `apply` uses them on a uint8 batch wherever it lives. Drawing on the CPU makes the batches of a
seed the same on every device; drawing once an epoch keeps host-to-device copies out of the batch loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AUGMENTATIONS", "Augmentation", "get_augmentation"]


@dataclass(frozen=True)
class Augmentation:
    """`sample(n, generator) -> (n, k) int64` parameters; `apply(uint8 batch, its parameters) -> uint8 batch`."""

    sample: Callable[[int, torch.Generator], torch.Tensor]
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _identity_sample(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(n, 0, dtype=torch.int64)


def _shift_flip(pad: int, flip: bool) -> Augmentation:
    """Random crop of the original size from a zero-padded image, and/or a random horizontal flip.

    Parameters per image: (row offset, column offset, flip) into the padded image. One advanced-indexing
    gather does crop and flip together.
    """

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
        flips = torch.randint(0, 2, (n, 1), generator=generator) if flip else torch.zeros(n, 1, dtype=torch.int64)
        return torch.cat([shifts, flips], dim=1)

    def apply(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if pad:
            x = F.pad(x, (pad, pad, pad, pad))
        dev = x.device
        params = params.to(dev)
        rows = params[:, 0:1] + torch.arange(h, device=dev)  # (B, H)
        cols = torch.arange(w, device=dev)
        cols = params[:, 1:2] + torch.where(params[:, 2:3].bool(), w - 1 - cols, cols)  # (B, W), flipped in place
        return x[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]

    return Augmentation(sample, apply)


AUGMENTATIONS: dict[str, Augmentation] = {
    "none": Augmentation(_identity_sample, lambda x, params: x),
    "crop_flip": _shift_flip(4, flip=True),  # the standard CIFAR recipe: 4-pixel zero padding + flip
    "crop": _shift_flip(4, flip=False),
    "flip": _shift_flip(0, flip=True),
}


def get_augmentation(name: str) -> Augmentation:
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {name!r}; known augmentations: {', '.join(sorted(AUGMENTATIONS))}")
    return AUGMENTATIONS[name]
