"""LeNet-5 training images/s: the device-resident loader vs the authors' torchvision DataLoader loop.

A third row, the same optimiser steps on one batch already in memory, is the ceiling any data path can reach:
on a small model on the CPU the forward/backward/Adam step itself bounds the speed-up.

Same model, loss (GCE), optimiser (Adam 1e-3, betas 0.9/0.99), batch size and images, measured in one
process. The baseline is henry8527/GCE's main.py loop: torchvision MNIST read from IDX files, ToTensor on
PIL images, DataLoader(shuffle=True, num_workers=2), and `loss.item()` plus an accuracy `.item()` every step.

    python -m benchmarks.train_throughput [--epochs 2] [--device auto] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader

from benchmarks.common import report, timed
from gce.config import TrainConfig
from gce.data import load_dataset, write_idx
from gce.losses import guided_complement_entropy
from gce.models import build_model
from gce.train import Trainer, resolve_device


def authors_loop(root: Path, device: torch.device, batch_size: int, workers: int):
    """One epoch of the authors' training loop; returns the number of images seen."""
    dataset = torchvision.datasets.MNIST(str(root), train=True, transform=torchvision.transforms.ToTensor())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0)
    torch.manual_seed(0)
    model = build_model("lenet5", input_shape=(1, 28, 28), num_classes=10).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))

    def epoch() -> int:
        model.train()
        seen = correct = 0
        train_loss = 0.0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss = guided_complement_entropy(out, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            train_loss += loss.item()
            correct += out.argmax(1).eq(y).sum().item()
            seen += y.shape[0]
        return seen

    return epoch


def _times(fn, k: int):
    return lambda: sum(fn() for _ in range(k))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timings per method (the best is kept)")
    parser.add_argument("--epochs", type=int, default=1,
                        help="epochs per timing (a GPU runs an MNIST-5k epoch in ~0.1 s: time several)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baseline")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="also time gce.train with torch.compile")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)

    bundle = load_dataset("mnist5k", seed=0)
    config = TrainConfig.from_dict({"data": {"dataset": "mnist5k"}, "model": {"name": "lenet5"},
                                    "loss": {"name": "gce"}, "batch_size": args.batch_size,
                                    "device": str(device)})
    trainer = Trainer(config, data=bundle)

    def one_epoch(t: Trainer):
        def run() -> int:
            t.train_epoch()
            return len(bundle.train)

        return run

    ours = one_epoch(trainer)

    # The ceiling of any data path: the same steps on batches already converted, laid out and resident (one
    # batch repeated would overfit into denormal floats, which are slow on a CPU).
    ceiling_trainer = Trainer(config, data=bundle)
    prepared = [(x.contiguous(memory_format=torch.channels_last) if ceiling_trainer.channels_last else x, y)
                for x, y in ceiling_trainer.train_loader]

    def model_only() -> int:
        for x, y in prepared:
            ceiling_trainer._step(ceiling_trainer.loss_fn, x, y, ceiling_trainer.optimizer)
        return len(bundle.train)

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        train = bundle.train
        write_idx(raw / "train-images-idx3-ubyte", train.images[:, 0].numpy())
        write_idx(raw / "train-labels-idx1-ubyte", train.labels.numpy().astype("uint8"))
        write_idx(raw / "t10k-images-idx3-ubyte", bundle.test.images[:, 0].numpy())
        write_idx(raw / "t10k-labels-idx1-ubyte", bundle.test.labels.numpy().astype("uint8"))
        baseline_epoch = authors_loop(Path(tmp), device, args.batch_size, args.workers)
        baseline_epoch()  # warm-up: worker start, first allocations
        trainer.train_epoch()
        baseline = timed(_times(baseline_epoch, args.epochs), device, args.repeats)
        fast = timed(_times(ours, args.epochs), device, args.repeats)
        model_only()  # warm-up: optimiser state, first-call kernels
        ceiling = timed(_times(model_only, args.epochs), device, args.repeats)
        compiled = None
        if args.compile:
            compiled_trainer = Trainer(TrainConfig.from_dict({**config.to_dict(), "compile": True}), data=bundle)
            compiled_trainer.train_epoch()  # compilation happens here, outside the timing
            compiled = timed(_times(one_epoch(compiled_trainer), args.epochs), device, args.repeats)

    rows = [
        {"method": f"authors' DataLoader loop (workers={args.workers})", "images_per_s": baseline, "ratio": 1.0},
        {"method": "gce.train (device-resident uint8 loader)", "images_per_s": fast, "ratio": fast / baseline},
        {"method": "ceiling: model steps alone on prepared resident batches", "images_per_s": ceiling,
         "ratio": ceiling / baseline},
    ]
    if compiled is not None:
        rows.append({"method": "gce.train + torch.compile", "images_per_s": compiled, "ratio": compiled / baseline})
    return report("train_throughput", rows, device, args.out,
                  title=f"LeNet-5, GCE, Adam, batch {args.batch_size}, {len(bundle.train)} MNIST-5k images, "
                        f"device {device}")


if __name__ == "__main__":
    main()
