"""The DATASETS registry and `load_dataset`, which adds the seeded validation split and the smoke-run cap."""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gce.data import _sources
from gce.data._types import DataBundle, DatasetInfo, Split, content_digest, seeded_generator, stratified_split
from gce.validation import check_int

__all__ = ["DATASETS", "DatasetSpec", "load_dataset", "resolve_root"]

Loader = Callable[[Path, bool], tuple[Split, Split]]  # (root, download) -> (train, test)


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry: what the dataset is (cheap to read) and how to load it (maybe slow)."""

    info: DatasetInfo
    load: Loader


_MNIST = dict(num_classes=10, input_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,), augment="none")
_CIFAR = dict(input_shape=(3, 32, 32), augment="crop_flip")

# The val split's stream tag: far from any epoch number, so it never replays a loader epoch's permutation.
VAL_STREAM = 2**31 - 1

DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(DatasetInfo("mnist", **_MNIST), _sources.torchvision_loader("MNIST", "mnist")),
    "fashion_mnist": DatasetSpec(
        DatasetInfo("fashion_mnist", 10, (1, 28, 28), (0.2860,), (0.3530,), "none"), _sources.load_fashion_mnist),
    "cifar10": DatasetSpec(
        DatasetInfo("cifar10", 10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), **_CIFAR),
        _sources.torchvision_loader("CIFAR10", "cifar10")),
    "cifar100": DatasetSpec(
        DatasetInfo("cifar100", 100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), **_CIFAR),
        _sources.torchvision_loader("CIFAR100", "cifar100")),
    # Offline real data: an MNIST subset from the same population (MNIST's statistics apply) ...
    "mnist5k": DatasetSpec(DatasetInfo("mnist5k", **_MNIST), _sources.load_mnist5k),
    # ... and 8x8 digits upsampled to 28x28 (statistics measured on all 1,797 resized images).
    "digits": DatasetSpec(DatasetInfo("digits", 10, (1, 28, 28), (0.3053,), (0.3247,), "none"), _sources.load_digits),
}


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: the argument, else $GCE_DATA_ROOT, else ./data."""
    if root is None:
        root = os.environ.get("GCE_DATA_ROOT") or "data"
    return Path(root).expanduser()


def _val_count(val_size: int | float, n: int) -> int:
    """A count from a count or a fraction; a float >= 1 with no fractional part (from YAML) is a count."""
    bad = ValueError(f"val_size must be a fraction in (0, 1) or a count in [1, {n - 1}] for {n} training "
                     f"examples; got {val_size!r}")
    if isinstance(val_size, bool) or not isinstance(val_size, numbers.Real):
        raise bad
    if isinstance(val_size, numbers.Integral) or (val_size >= 1 and float(val_size).is_integer()):
        k = int(val_size)
    elif 0 < val_size < 1:
        k = round(float(val_size) * n)
    else:
        raise bad
    if not 1 <= k < n:
        raise bad
    return k


def load_dataset(name: str, root: str | os.PathLike | None = None, *, download: bool = False,
                 val_size: int | float = 0.1, seed: int = 0, limit: int | None = None) -> DataBundle:
    """Load a registered dataset as uint8 splits, with a validation split carved from train.

    The validation split is stratified and chosen by `seed` (so seeds also vary which images select the
    model); the test split is never touched. `limit` caps the training split after that, for smoke runs.
    """
    key = str(name).lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    check_int("limit", limit, optional=True)
    spec = DATASETS[key]
    full, test = spec.load(resolve_root(root), download)
    k = _val_count(val_size, len(full))
    rest, val = stratified_split(full.labels, k, seeded_generator(seed, VAL_STREAM))
    if limit is not None:
        rest = rest[:limit]  # rest is shuffled, so this is a random, near-stratified subset
    return DataBundle(spec.info, full.select(rest), full.select(val), test, content_digest(full, test))
