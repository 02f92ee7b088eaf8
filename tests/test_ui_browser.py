"""What a researcher sees: the URL a real sweep prints, opened in headless Chromium on a real MLflow server."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import require
from mlflow import MlflowClient
from rich.console import Console

from sweeps.launcher import run_sweep
from sweeps.loading import load_spec
from tracking.logger import EXPERIMENT_KIND, ROLE_TAG, SWEEP_TAG
from tracking.views import WORKFLOW

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
CHROMIUM = os.environ.get("GCE_CHROMIUM", "/usr/bin/chromium")

TINY = {"data": {"dataset": "mnist5k", "limit": 512}, "model": {"name": "mlp", "kwargs": {"hidden": 32}},
        "epochs": 3, "batch_size": 64, "max_batches": 6}


@pytest.fixture(scope="module")
def browser_ready():
    require(shutil.which(CHROMIUM) is not None or Path(CHROMIUM).exists(),
            f"Debian's chromium ({CHROMIUM}) is not installed: apt-get install chromium")
    require(importlib.util.find_spec("playwright") is not None, "playwright is not installed (a dev dependency)")


def test_the_printed_url_opens_the_sweeps_runs_with_factor_and_objective_columns(browser_ready, ray_local,
                                                                                  mlflow_server, tmp_path):
    from ui_check import check_ui

    spec = load_spec({"name": "ui", "experiment": "test-ui", "base": TINY, "resources": {"cpu": 1},
                      "space": {"loss.name": ["ce", "gce"]}, "system_metrics": {"interval_s": 0.25},
                      "evaluation": {"max_examples": 64, "attacks": [{"name": "fgsm", "eps": [0.1]}]}})
    out = io.StringIO()
    result = run_sweep(spec, tracking_uri=mlflow_server.url, storage=tmp_path, console=Console(file=out, width=300))
    assert result.trials == 2 and result.errors == 0
    (url,) = re.findall(r"MLflow UI: (\S+)", out.getvalue())

    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("test-ui")
    assert experiment.tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]  # the UI's training views, not GenAI's
    runs = client.search_runs([experiment.experiment_id], f"tags.`{SWEEP_TAG}` = '{result.sweep_id}'")
    trials = [r for r in runs if r.data.tags[ROLE_TAG] == "trial"]
    (parent,) = [r for r in runs if r.data.tags[ROLE_TAG] == "sweep"]
    assert "gce-sweep ablate" in parent.data.tags["mlflow.note.content"]  # the parent says what it is

    shot = Path(os.environ.get("GCE_UI_SCREENSHOT_DIR", tmp_path))
    trial_ids = [r.data.tags["gce.trial_id"] for r in trials]
    missing, text = check_ui(url, [*trial_ids, "val/robust_acc/worst_case", "loss.name", "mnist5k-train"],
                             screenshot=shot / "sweep_runs.png")
    assert not missing, f"not on screen: {missing}"
    assert "Model registry" in text and "Evaluation runs" not in text  # MLflow's training mode, not GenAI's
    assert f"{len(trials)} matching runs" in text  # the sweep's trials, and only those

    # One trial's page: its datasets in the overview, its system metrics in their tab.
    run = trials[0]
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)
    run_url = f"{mlflow_server.url}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}?{WORKFLOW}"
    missing, _ = check_ui(run_url, ["mnist5k-train", "Datasets"], screenshot=shot / "trial_run.png")
    assert not missing, f"not on the run page: {missing}"
    missing, _ = check_ui(run_url, ["cpu_utilization_percentage"], click=["System metrics"],
                          screenshot=shot / "trial_system_metrics.png")
    assert not missing, f"not in the system metrics tab: {missing}"
