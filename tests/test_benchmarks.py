"""The benchmark suite runs end to end (figures are not asserted: speed is measured, never tested)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_benchmark_suite_runs_and_writes_its_tables(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["rows"]) == 5 and summary["environment"]["torch"]
    assert all(row["baseline"] > 0 and row["ours"] > 0 for row in summary["rows"])
    for name in ("train_throughput", "attack_throughput", "tracking_cost", "sweep_overhead"):
        assert (tmp_path / f"{name}.json").exists()
