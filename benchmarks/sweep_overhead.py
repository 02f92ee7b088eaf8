"""Sweep overhead: N tiny trials through the sweep machinery vs the same trials called in-process.

The baseline runs each trial's work directly — `gce.train.fit` plus the end-of-trial science (latent
clusters, confusion matrix) — with no Ray and no MLflow. The sweep runs the same spec through `run_sweep`:
Ray Tune scheduling, per-epoch reports with checkpoints, MLflow runs, params, metrics, plots. Both use one
thread a trial and one trial at a time, so the difference is overhead, reported per trial and as a ratio;
Ray's start-up and the `gce-sweep` process start are reported apart, as fixed costs.

    python -m benchmarks.sweep_overhead [--trials 8] [--epochs 1] [--cli] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import fresh_tracking_server, report
from gce.data import load_dataset
from gce.latent import confusion_matrix, latent_clusters
from gce.train import fit
from sweeps.loading import load_spec


def tiny_spec(trials: int, epochs: int) -> dict:
    return {"name": "overhead", "experiment": "bench-sweep-overhead",
            "base": {"data": {"dataset": "mnist5k", "limit": 1024}, "model": {"name": "lenet5"},
                     "optim": {"name": "adam", "lr": 1e-3}, "epochs": epochs, "batch_size": 64},
            "space": {"optim.lr": [1e-3 * (1 + i / 10) for i in range(trials)]},
            "evaluation": {"attacks": [], "checks": False, "test": False, "max_examples": 256},
            "resources": {"cpu": 1}, "max_concurrent_trials": 1}


def in_process(spec) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like a trial with resources.cpu = 1
    try:
        return _in_process(spec)
    finally:
        torch.set_num_threads(threads)


def _in_process(spec) -> float:
    start = time.perf_counter()
    for point in spec.grid_points():
        cfg = spec.trial_config(point, spec.seeds[0])
        d = cfg.data
        data = load_dataset(d.dataset, d.root, val_size=d.val_size, seed=cfg.seed, limit=d.limit)
        result = fit(cfg, data=data)
        latent_clusters(result.model, data.val, max_examples=256)
        confusion_matrix(result.model, data.val)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--cli", action="store_true", help="also time the whole `gce-sweep run` command")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from sweeps.launcher import run_sweep

    spec = load_spec(tiny_spec(args.trials, args.epochs))
    with fresh_tracking_server() as (url, tmp):
        in_process(spec)  # warm-up: imports, dataset cache, allocator
        baseline = in_process(spec)
        start = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
        ray_start = time.perf_counter() - start
        start = time.perf_counter()
        result = run_sweep(spec, tracking_uri=url, storage=tmp / "ray")
        swept = time.perf_counter() - start
        ray.shutdown()
        assert result.errors == 0, "a benchmark trial failed"
        cli = None
        if args.cli:
            path = tmp / "spec.yaml"
            path.write_text(yaml.safe_dump(tiny_spec(args.trials, args.epochs)))
            env = {**os.environ, "MLFLOW_TRACKING_URI": url, "GCE_RAY_RESULTS": str(tmp / "cli")}
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "sweeps.cli", "run", str(path)], env=env, check=True,
                           capture_output=True)
            cli = time.perf_counter() - start
    n = args.trials
    rows = [
        {"what": f"{n} trials in-process (no Ray, no MLflow)", "seconds": baseline, "per_trial_s": baseline / n,
         "ratio": 1.0},
        {"what": f"{n} trials through run_sweep (Ray Tune + MLflow)", "seconds": swept, "per_trial_s": swept / n,
         "ratio": swept / baseline},
        {"what": "overhead per trial (sweep - in-process) / N", "seconds": swept - baseline,
         "per_trial_s": (swept - baseline) / n, "ratio": (swept - baseline) / baseline},
        {"what": "fixed: ray.init (local, 2 CPUs)", "seconds": ray_start, "per_trial_s": float("nan"),
         "ratio": float("nan")},
    ]
    if cli is not None:
        rows.append({"what": "whole `gce-sweep run` command (process, Ray, sweep)", "seconds": cli,
                     "per_trial_s": cli / n, "ratio": cli / baseline})
    return report("sweep_overhead", rows, torch.device("cpu"), args.out,
                  title=f"sweep overhead: {n} LeNet-5 trials of {args.epochs} epoch(s) on 1,024 MNIST-5k images, "
                        "one at a time")


if __name__ == "__main__":
    main()
