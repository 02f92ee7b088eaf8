"""A short random-moment fault campaign (benchmarks.faults): the driver, a trial's worker and the embedded MLflow
server killed at moments nobody chose, resumed as a user would, the exactly-once invariants checked after every
sweep. The long campaign is ``python -m benchmarks.faults --kills 30``."""

from __future__ import annotations

import os
import random

import pytest

from benchmarks.faults import TARGETS, campaign
from tracking.server import stop_server

pytestmark = pytest.mark.slow


def test_a_short_random_campaign_breaks_no_invariant(tmp_path):
    seed = int(os.environ.get("GCE_FAULTS_SEED") or random.SystemRandom().randrange(2**31))
    print(f"\nfault campaign seed {seed} (replay: GCE_FAULTS_SEED={seed} or python -m benchmarks.faults "
          f"--kills 3 --seed {seed})")
    try:
        result = campaign(kills=3, seed=seed, root=tmp_path, targets=TARGETS, per_sweep=2, stacks=(1, 2))
    finally:
        stop_server(tmp_path / "mlflow")
    print(f"FIGURES fault campaign: {result.summary()}")
    assert result.violations == [], f"seed {seed}: " + "\n".join(result.violations)
    assert len([k for k in result.kills if k.phase != "missed"]) >= 3
