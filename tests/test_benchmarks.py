"""The benchmark suite runs end to end (figures are not asserted: speed is measured, never tested)."""

import json
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow
def test_benchmark_suite_runs_and_writes_its_tables(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {row["benchmark"].strip(): row for row in summary["rows"]}
    assert summary["environment"]["torch"] and summary["environment"]["threads"] == str(torch.get_num_threads())
    # Every figure was measured (an A/B difference may come out negative, within noise).
    assert all(row["ours"] > 0 for name, row in rows.items() if not name.startswith("plots' cost"))
    assert isinstance(rows["plots' cost: evaluation + artifacts with - without, %"]["ours"], float)
    assert all(row["baseline"] > 0 for row in rows.values() if row["baseline"] != "")
    train = rows["LeNet-5 training, images/s"]
    assert train["ratio"] == pytest.approx(train["ours"] / train["baseline"])
    assert train["met"] == ("yes" if train["ratio"] >= 3 else "NO")  # the verdict follows the figure
    ceiling = rows["ceiling: model steps alone, images/s"]
    assert ceiling["baseline"] == train["baseline"]
    assert any(name.startswith("trial of") for name in rows)
    judged = rows["tracking with plots: plot-free share + plots' cost, %"]
    plain, plots = rows["the same with plots: false, %"], rows["plots' cost: evaluation + artifacts with - without, %"]
    assert judged["ours"] == pytest.approx(plain["ours"] + max(plots["ours"], 0.0))
    assert judged["met"] == ("yes" if judged["ours"] <= 2 else "NO") and judged["target"] == "<= 2%"
    overhead = rows["overhead per trial, s"]
    assert overhead["met"] == ("yes" if overhead["ours"] <= 0.3 else "NO")
    assert any(name.startswith("peak resident memory") for name in rows)
    for name in ("train_throughput", "attack_throughput", "tracking_cost", "sweep_overhead", "trial_profile",
                 "trial_profile_no_plots"):
        assert (tmp_path / f"{name}.json").exists()
