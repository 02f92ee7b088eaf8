"""Every benchmark in one run, then one summary table of the headline ratios.

    python -m benchmarks [--quick] [--out DIR]

Each benchmark measures its baseline in the same process and writes its own JSON; the summary goes to
``summary.json`` beside them. ``--quick`` shortens each one (fewer repeats, fewer trials) for a smoke check.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks import attack_throughput, sweep_overhead, tracking_cost, train_throughput
from benchmarks.common import report


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke check, noisier figures)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = ["--out", str(args.out)] if args.out else []
    summary = []

    print("\n== training throughput ==")
    rows = train_throughput.main(["--repeats", "1" if args.quick else "3", *out])
    summary.append({"benchmark": "LeNet-5 training, images/s", "baseline": rows[0]["images_per_s"],
                    "ours": rows[1]["images_per_s"], "speed-up": rows[1]["ratio"],
                    "baseline is": "authors' DataLoader loop"})

    print("\n== attack throughput ==")
    rows = attack_throughput.main(["--steps", "10" if args.quick else "40", *out])
    for row in rows:
        summary.append({"benchmark": f"{row['attack']} on {row['model']}, images/s",
                        "baseline": row.get("torchattacks_images_per_s", float("nan")),
                        "ours": row["images_per_s"], "speed-up": row.get("ratio", float("nan")),
                        "baseline is": "torchattacks PGD"})

    print("\n== tracking cost ==")
    rows = tracking_cost.main((["--epochs", "10"] if args.quick else []) + out)
    summary.append({"benchmark": "MLflow logging, ms per epoch", "baseline": rows[0]["ms_per_epoch"],
                    "ours": rows[1]["ms_per_epoch"], "speed-up": rows[1]["ratio"],
                    "baseline is": "one log_metric per metric"})

    print("\n== sweep overhead ==")
    rows = sweep_overhead.main(["--trials", "4" if args.quick else "8", *out])
    summary.append({"benchmark": "sweep, seconds per trial", "baseline": rows[0]["per_trial_s"],
                    "ours": rows[1]["per_trial_s"], "speed-up": 1 / rows[1]["ratio"],
                    "baseline is": "same trials in-process, no Ray/MLflow"})

    print("\n== summary: speed-up of ours over the baseline measured in the same run (> 1: ours is faster) ==")
    report("summary", summary, torch.device("cpu"), args.out)
    return summary


if __name__ == "__main__":
    main()
