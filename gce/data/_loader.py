"""DeviceLoader: a whole split resident on the device, batched, converted and augmented there.

For small models a DataLoader with workers and PIL transforms costs more than the model itself; indexing
a uint8 tensor that already lives on the GPU costs almost nothing (the cifar10-airbench approach).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from gce.data._augment import get_augmentation
from gce.data._types import Split, seeded_generator
from gce.validation import check_int

__all__ = ["DeviceLoader"]


class DeviceLoader:
    """Batches of (x float32 in [0, 1] (B, C, H, W), y int64), both on `device`; one iteration is one epoch.

    The order and the augmentation of epoch e come from a generator seeded with (seed, e): the same seed
    gives the same batches, and a resumed run reproduces epoch e after `set_epoch(e)`. `epoch` is the epoch
    the next iteration produces; starting an iteration advances it. `device=None` keeps the split's device.
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool = False, augment: str = "none",
                 seed: int = 0, device: torch.device | str | None = None, drop_last: bool = False,
                 max_batches: int | None = None):
        check_int("batch_size", batch_size)
        check_int("max_batches", max_batches, optional=True)
        self._augmentation = get_augmentation(augment)
        self.device = torch.device(device) if device is not None else split.images.device
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.max_batches = max_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce epoch `epoch` (for resuming)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.labels)
        batches = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return batches if self.max_batches is None else min(batches, self.max_batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Everything random is drawn here, eagerly and once an epoch, so that the loop below never waits
        # on a host-to-device copy and `epoch` advances when iteration starts, not at the first batch.
        epoch, self.epoch = self.epoch, self.epoch + 1
        generator = seeded_generator(self.seed, epoch)
        n = len(self.labels)
        order = torch.randperm(n, generator=generator).to(self.device) if self.shuffle else None
        params = None
        if self.augment != "none":
            params = self._augmentation.sample(n, generator).to(self.device)
        return self._batches(order, params)

    def _batches(self, order: torch.Tensor | None, params: torch.Tensor | None):
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, len(self.labels))
            index = slice(lo, hi) if order is None else order[lo:hi]
            x, y = self.images[index], self.labels[index]
            if params is not None:
                x = self._augmentation.apply(x, params[lo:hi])
            yield x.float().div_(255.0), y
