"""The packing benchmark runs real trials in spawned processes and derives its ratios from what they measured
(figures are not asserted: speed is measured, never tested)."""

import json

import pytest

from benchmarks import packing

pytestmark = pytest.mark.slow  # spawned processes import torch: ~20 s a level on 2 cores


def test_packing_measures_each_level_and_writes_its_table(tmp_path):
    rows = packing.main(["--device", "cpu", "--concurrency", "1", "2", "--seconds", "2", "--out", str(tmp_path)])
    assert [row["concurrency"] for row in rows] == [1, 2]
    solo = rows[0]["per_trial_images_per_s"]
    for row in rows:
        assert row["per_trial_images_per_s"] > 0 and row["total_images_per_s"] > 0
        assert 0 < row["per_trial_min_images_per_s"] <= row["per_trial_images_per_s"]
        assert row["total_images_per_s"] == pytest.approx(row["concurrency"] * row["per_trial_images_per_s"])
        assert row["total_vs_solo"] == pytest.approx(row["total_images_per_s"] / solo)
        assert row["per_trial_vs_solo"] == pytest.approx(row["per_trial_images_per_s"] / solo)
        assert row["peak_mem_mb_per_trial"] > 10  # a process with torch imported: RSS, not a unit slip
    assert rows[0]["total_vs_solo"] == pytest.approx(1.0)
    written = json.loads((tmp_path / "packing.json").read_text())
    assert written["rows"] == rows and written["environment"]["torch"]


def test_a_failing_trial_raises_instead_of_hanging():
    with pytest.raises(RuntimeError, match="trial 0 failed"):
        packing.run_level(1, "no-such-model", 64, "cpu", seconds=1, barrier_timeout=30)
