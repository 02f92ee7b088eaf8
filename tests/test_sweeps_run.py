"""End-to-end sweeps on a real local Ray (2 CPUs) logging to a real MLflow server, read back from MLflow."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from gce.metrics import PEAK_RSS, TIME_PHASES, TIME_SHARES, share_key, time_key
from sweeps.launcher import run_sweep
from sweeps.loading import load_spec
from tracking.logger import ROLE_TAG, SWEEP_TAG

pytestmark = pytest.mark.slow

TINY = {"data": {"dataset": "mnist5k", "limit": 512}, "model": {"name": "mlp", "kwargs": {"hidden": 32}},
        "optim": {"name": "adam", "lr": 3e-3}, "epochs": 2, "batch_size": 64, "max_batches": 4}
EVAL = {"max_examples": 64, "attacks": [{"name": "fgsm", "eps": [0.1, 0.2]}, {"name": "pgd", "eps": [0.2], "steps": 3}]}


def sweep(name: str, **fields):
    return load_spec({"name": name, "experiment": f"test-{name}", "base": TINY, "evaluation": EVAL,
                      "resources": {"cpu": 1}, **fields})


def runs_of(uri: str, result):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(result.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = '{result.sweep_id}'")
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    children = [r for r in runs if r.data.tags.get(ROLE_TAG) == "trial"]
    return client, parents, children


def test_grid_sweep_end_to_end_parent_children_metrics_artifacts(ray_local, mlflow_server, tmp_path):
    spec = sweep("grid", space={"loss.name": ["ce", "cot", "gce"],
                                "loss.alpha": {"grid": [0.1, 1.0], "when": {"loss.name": "gce"}}})
    result = run_sweep(spec, tracking_uri=mlflow_server.url, storage=tmp_path)
    assert result.trials == 4 and result.errors == 0
    client, parents, children = runs_of(mlflow_server.url, result)
    assert len(parents) == 1 and len(children) == 4
    assert parents[0].info.status == "FINISHED"
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert 0 <= run.data.metrics["val/robust_acc/worst_case"] <= run.data.metrics["val/clean_acc"]
        assert "test/robust_acc/worst_case" in run.data.metrics
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in history] == [1, 2]  # one point per epoch
        assert run.data.tags["check/raised"]  # masking diagnostics ran and were tagged
        # The trial's own profile: every phase timed, the parts add up to no more than the whole.
        m = run.data.metrics
        assert {*map(time_key, TIME_PHASES), *map(share_key, TIME_SHARES), PEAK_RSS} <= set(m)
        parts = (m["time/run_start_s"] + m["time/data_s"] + m["time/train_s"] + m["time/eval_s"]
                 + m["time/artifacts_s"])
        assert 0 < parts <= m["time/trial_s"] + 1e-6
        assert m["time/fit_compute_s"] + m["time/log_s"] + m["time/report_s"] == pytest.approx(m["time/train_s"])
        assert m["time/log_s"] > 0 and m["time/run_start_s"] > 0 and m["time/report_s"] > 0
        assert m["mem/peak_rss_mb"] > 50
        assert 0 < m["time/tracking_share"] < 1
        # A conditional space never gives α to a non-GCE trial.
        assert ("loss.alpha" in run.data.params) == (run.data.params["loss.name"] == "gce")
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert {"config.json", "checkpoints", "plots"} <= artifacts
        assert {"plots/robustness_curves_linf.png", "plots/confusion_matrix.png", "plots/embedding.png",
                "plots/adversarial_examples.png"} <= plots
    alphas = sorted(float(r.data.params["loss.alpha"]) for r in children if "loss.alpha" in r.data.params)
    assert alphas == [0.1, 1.0]


@pytest.mark.parametrize("algorithm", ["random", "tpe", "multi_objective"])
def test_optuna_searchers_run_and_respect_the_conditional_space(ray_local, mlflow_server, tmp_path, algorithm):
    objective = ([{"metric": "val/clean_acc", "mode": "max"}, {"metric": "val/robust_acc/worst_case", "mode": "max"}]
                 if algorithm == "multi_objective" else {"metric": "val/robust_acc/worst_case", "mode": "max"})
    spec = sweep(algorithm, space={"loss.name": {"choice": ["ce", "gce"]},
                                   "loss.alpha": {"uniform": [0.05, 1.0], "when": {"loss.name": "gce"}},
                                   "optim.lr": {"loguniform": [1e-3, 1e-2]}},
                 search={"algorithm": algorithm, "num_samples": 3, "seed": 1}, objective=objective)
    result = run_sweep(spec, tracking_uri=mlflow_server.url, storage=tmp_path)
    assert result.trials == 3 and result.errors == 0
    _, _, children = runs_of(mlflow_server.url, result)
    assert len(children) == 3
    lrs = {float(r.data.params["optim.lr"]) for r in children}
    assert len(lrs) == 3 and all(1e-3 <= lr <= 1e-2 for lr in lrs)  # sampled, not a grid
    for run in children:
        alpha = run.data.params.get("loss.alpha")
        assert (alpha is not None) == (run.data.params["loss.name"] == "gce")
        if alpha is not None:
            assert 0.05 <= float(alpha) <= 1.0


def test_asha_stops_a_bad_trial_early(ray_local, mlflow_server, tmp_path):
    base = {**TINY, "epochs": 4, "max_batches": 8}
    spec = sweep("asha", base=base, space={"optim.lr": [3e-3, 1e-7]}, max_concurrent_trials=1,
                 evaluation={**EVAL, "plots": False},
                 scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2, "metric": "val/clean_acc"})
    result = run_sweep(spec, tracking_uri=mlflow_server.url, storage=tmp_path)
    client, _, children = runs_of(mlflow_server.url, result)
    by_lr = {float(r.data.params["optim.lr"]): r for r in children}
    good, bad = by_lr[3e-3], by_lr[1e-7]
    assert [m.step for m in client.get_metric_history(good.info.run_id, "val/clean_acc")] == [1, 2, 3, 4]
    assert good.info.status == "FINISHED" and "stop_reason" not in good.data.tags  # ran to the end
    bad_epochs = [m.step for m in client.get_metric_history(bad.info.run_id, "val/clean_acc")]
    assert len(bad_epochs) < 4
    assert bad.info.status == "FINISHED" and "stopped early" in bad.data.tags["stop_reason"]
    # Its profile up to the stop, logged once by the driver (the stopped trial could not).
    assert {"time/trial_s", "time/train_s", "time/log_s", "mem/peak_rss_mb"} <= set(bad.data.metrics)
    assert len(client.get_metric_history(bad.info.run_id, "time/trial_s")) == 1
    assert "val/robust_acc/worst_case" not in bad.data.metrics
    # plots: false keeps the checkpoint and config, renders no figure.
    assert {a.path for a in client.list_artifacts(good.info.run_id)} == {"checkpoints", "config.json"}


def test_cli_runs_the_quickstart_smoke(mlflow_server, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "GCE_RAY_RESULTS": str(tmp_path),
           "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", "quickstart", "--smoke"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "MLflow UI: " in out.stdout and "parent run: " in out.stdout
    # What the user sees is clean: no traceback from Ray, Tune or a worker's shutdown, and the last progress line
    # counts no trial as running once all are done.
    assert "Traceback" not in out.stdout + out.stderr and "Exception ignored" not in out.stdout + out.stderr
    assert [line for line in out.stdout.splitlines() if line.startswith("[5/5]")][0].count("running 0")
    assert "5 trial(s), 0 failed" in out.stdout
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("gce-quickstart-smoke")
    children = client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'trial'")
    assert len(children) == 5 and {r.info.status for r in children} == {"FINISHED"}
