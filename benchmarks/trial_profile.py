"""Where one trial's time goes, end to end: a real sweep (Ray Tune + MLflow) of a realistic trial, profiled.

Each trial records its own profile (``sweeps.trainable``): data loading, training compute, per-epoch MLflow
logging, Ray reporting (checkpoint + ``tune.report``), robustness evaluation (attacks, diagnostics, clusters),
artifacts (checkpoint, plots) and peak memory. This benchmark runs a few such trials through ``run_sweep`` on
a fresh embedded MLflow server, reads the profiles back from MLflow and prints the mean seconds and share of
the trial per phase. Ray's own bookkeeping between trials is ``benchmarks.sweep_overhead``'s figure.

Targets (issue 7): tracking <= 2% of trial time; sweep overhead <= 10% of a 30-second trial.

    python -m benchmarks.trial_profile [--seeds 1] [--epochs 20] [--device auto] [--no-plots] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from benchmarks.common import fresh_tracking_server, report
from gce.train import resolve_device

PHASES = [  # (label, metric): the parts of time/trial_s
    ("MLflow: the trial's run (create, params)", "time/run_start_s"),
    ("data loading", "time/data_s"),
    ("training compute (incl. per-epoch val)", "time/fit_compute_s"),
    ("MLflow: per-epoch metrics", "time/log_s"),
    ("Ray: checkpoint + tune.report per epoch", "time/report_s"),
    ("evaluation: attacks, diagnostics, clusters", "time/eval_s"),
    ("MLflow: artifacts (checkpoint, plots) + final", "time/artifacts_s"),
]


def profile_spec(seeds: int, epochs: int, device: str, plots: bool = True,
                 max_examples: int = 1000) -> dict:
    """A trial of the size the issue's targets speak of (~20-30 s on 2 CPU cores): LeNet-5 on MNIST-5k, the
    paper's optimiser and 20 epochs, FGSM and PGD-40 (0.01) at three ε on the validation (400) and test
    (1,000) images, diagnostics on."""
    gpu = 1.0 if device == "cuda" else 0
    return {"name": "profile", "experiment": "bench-trial-profile",
            "base": {"data": {"dataset": "mnist5k"}, "model": {"name": "lenet5"}, "device": device,
                     "optim": {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.99]}, "epochs": epochs, "batch_size": 64},
            "space": {"loss.name": ["ce", "gce"]},
            "seeds": list(range(seeds)),
            "evaluation": {"max_examples": max_examples, "plots": plots,
                           "attacks": [{"name": "fgsm", "eps": [0.1, 0.2, 0.3]},
                                       {"name": "pgd", "eps": [0.1, 0.2, 0.3], "steps": 40, "step_size": 0.01}]},
            "resources": {"cpu": 1, "gpu": gpu}, "max_concurrent_trials": 1}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1, help="seeds per loss (CE, GCE): 2 x seeds trials")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-plots", action="store_true", help="evaluation.plots: false (no per-trial PNGs)")
    parser.add_argument("--max-examples", type=int, default=1000, help="images attacked per split")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from mlflow import MlflowClient

    from sweeps.launcher import run_sweep
    from sweeps.loading import load_spec
    from tracking.logger import ROLE_TAG, SWEEP_TAG

    device = resolve_device(args.device)
    spec = load_spec(profile_spec(args.seeds, args.epochs, device.type, plots=not args.no_plots,
                                  max_examples=args.max_examples))
    with fresh_tracking_server("gce-bench-profile-") as (url, tmp):  # gpu.sh cleans up by this name
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
        result = run_sweep(spec, tracking_uri=url, storage=tmp / "ray")
        ray.shutdown()
        assert result.errors == 0, "a profiled trial failed"
        client = MlflowClient(url)
        exp = client.get_experiment_by_name(result.experiment)
        runs = client.search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = '{result.sweep_id}'")
        metrics = [r.data.metrics for r in runs if r.data.tags.get(ROLE_TAG) == "trial"]

    def mean(key: str) -> float:
        return statistics.fmean(m[key] for m in metrics)

    trial = mean("time/trial_s")
    rows = [{"phase": label, "seconds": mean(key), "share_of_trial": mean(key) / trial} for label, key in PHASES]
    accounted = sum(r["seconds"] for r in rows)
    rows.append({"phase": "other (Ray context, config)", "seconds": trial - accounted,
                 "share_of_trial": (trial - accounted) / trial})
    rows.append({"phase": "whole trial", "seconds": trial, "share_of_trial": 1.0})
    tracking = mean("time/tracking_share")
    rows.append({"phase": "tracking total (target <= 2%)", "seconds": tracking * trial, "share_of_trial": tracking})
    rows.append({"phase": "peak resident memory of the worker, MB", "seconds": float("nan"),
                 "share_of_trial": float("nan"), "value": mean("mem/peak_rss_mb")})
    if "mem/cuda_peak_mb" in metrics[0]:
        rows.append({"phase": "peak CUDA memory of a trial, MB", "seconds": float("nan"),
                     "share_of_trial": float("nan"), "value": mean("mem/cuda_peak_mb")})
    for row in rows:
        row.setdefault("value", float("nan"))
    return report("trial_profile_no_plots" if args.no_plots else "trial_profile", rows, device, args.out,
                  title=f"one trial profiled end to end: mean of {len(metrics)} trial(s), LeNet-5, MNIST-5k, "
                        f"{args.epochs} epochs, FGSM + PGD-40 at 3 eps on up to {args.max_examples} val + test "
                        f"images, plots {'off' if args.no_plots else 'on'}, device {device}")


if __name__ == "__main__":
    main()
