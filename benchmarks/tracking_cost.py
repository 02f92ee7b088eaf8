"""MLflow logging cost per epoch: one ``log_batch`` call (tracking.logger) vs one ``log_metric`` call per metric.

Both write the same number of metrics into the same run on the same server, interleaved epoch by epoch so that
server warm-up and database growth hit both alike; the per-metric loop is what ``MLflowLoggerCallback`` does.
By default a fresh embedded server (SQLite, a temporary folder) is started and stopped; ``--tracking-uri``
(or $MLFLOW_TRACKING_URI) measures an existing one instead, e.g. the compose stack on PostgreSQL.

    python -m benchmarks.tracking_cost [--epochs 40] [--metrics 12] [--tracking-uri URI] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import fresh_tracking_server, report
from tracking.connection import check_server
from tracking.logger import RunLogger


def epoch_metrics(n: int, epoch: int, prefix: str) -> dict[str, float]:
    """``n`` metrics like a trial's epoch: losses, accuracies, throughput."""
    names = ["train/loss", "train/acc", "val/loss", "val/clean_acc", "train/images_per_s", "train/lr"]
    names += [f"val/extra_{i}" for i in range(max(0, n - len(names)))]
    return {f"{prefix}/{k}": 1.0 / (epoch + 1) + i for i, k in enumerate(names[:n])}


def measure(uri: str, epochs: int, n_metrics: int) -> tuple[list[float], list[float]]:
    """Seconds per epoch for each method, epochs interleaved, in one run."""
    log = RunLogger(uri, "benchmark-tracking-cost")
    run = log.start_trial(f"bench-{os.getpid()}-{time.time_ns()}", "t0", {"epochs": epochs, "metrics": n_metrics})
    batched, single = [], []
    for epoch in range(-2, epochs):  # two warm-up epochs: connection pool, first inserts
        metrics = epoch_metrics(n_metrics, epoch + 2, "batched")
        start = time.perf_counter()
        log.log_metrics(run, metrics, step=epoch + 2)
        t_batched = time.perf_counter() - start

        metrics = epoch_metrics(n_metrics, epoch + 2, "per_metric")
        start = time.perf_counter()
        for key, value in metrics.items():
            log.client.log_metric(run, key, value, step=epoch + 2)
        t_single = time.perf_counter() - start
        if epoch >= 0:
            batched.append(t_batched)
            single.append(t_single)
    log.end_run(run)
    history = log.client.get_metric_history(run, "batched/train/loss")
    assert len(history) == epochs + 2, "every batched epoch must be stored"
    return batched, single


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--metrics", type=int, default=12, help="metrics logged per epoch")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.tracking_uri:
        check_server(args.tracking_uri)
        where = args.tracking_uri
        batched, single = measure(args.tracking_uri, args.epochs, args.metrics)
    else:
        where = "embedded server (SQLite, fresh)"
        with fresh_tracking_server() as (url, _):
            batched, single = measure(url, args.epochs, args.metrics)

    per_metric_ms, batched_ms = statistics.median(single) * 1e3, statistics.median(batched) * 1e3
    rows = [
        {"method": "one log_metric call per metric", "calls_per_epoch": args.metrics,
         "ms_per_epoch": per_metric_ms, "ratio": 1.0},
        {"method": "one log_batch per epoch (tracking.logger)", "calls_per_epoch": 1,
         "ms_per_epoch": batched_ms, "ratio": per_metric_ms / batched_ms},
    ]
    return report("tracking_cost", rows, torch.device("cpu"), args.out,
                  title=f"{args.metrics} metrics an epoch, median of {args.epochs} epochs, same run, {where}")


if __name__ == "__main__":
    main()
