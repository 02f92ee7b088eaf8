"""The logger's contract, run against every storage backend (SQLite embedded server, PostgreSQL server).

Everything is read back twice: through MlflowClient and through the server's REST API, with artifacts
downloaded through the server's proxy (what a remote Ray worker would use).
"""

import json
import uuid

import numpy as np
import pytest
import requests
import torch
from mlflow import MlflowClient

from tracking import plots
from tracking.logger import SWEEP_TAG, TRIAL_TAG, RunLogger, spec_hash

PNG = b"\x89PNG\r\n\x1a\n"


def new_logger(uri: str) -> RunLogger:
    return RunLogger(uri, f"study-{uuid.uuid4().hex[:8]}")


def test_sweep_and_trial_runs_round_trip(tracking_uri, tmp_path):
    log = new_logger(tracking_uri)
    spec = {"experiment": "x", "train": {"lr": 0.001, "epochs": 3}}
    parent = log.start_sweep("sw1", spec_name="quickstart", spec_hash=spec_hash(spec), ray_address="local")
    params = {"loss.name": "gce", "loss.alpha": 1 / 3, "train.lr": 0.001, "model.name": "lenet5", "seed": 0}
    child = log.start_trial("sw1", "t0", params, parent_run_id=parent)
    for epoch in range(3):
        log.log_metrics(child, {"train/loss": 1.0 / (epoch + 1), "train/acc": 0.5 + 0.1 * epoch,
                                "val/clean_acc": 0.4 + 0.1 * epoch}, step=epoch)
    log.log_metrics(child, {"val/robust_acc/pgd/eps=0.3": 0.2, "val/robust_acc/worst_case": 0.15}, step=3)
    log.log_spec(child, spec)
    ckpt = tmp_path / "final.pt"
    torch.save({"model": {"w": torch.ones(2)}, "config": params}, ckpt)
    log.log_checkpoint(child, ckpt)
    log.log_robustness_curves(child, {"pgd": {0.1: 0.6, 0.3: 0.2}, "worst_case": {0.1: 0.5, 0.3: 0.15}}, 0.9)
    log.log_confusion_matrix(child, np.eye(3) * 10 + 1)
    log.log_embedding(child, torch.randn(30, 2), torch.arange(30) % 3)
    x = torch.rand(4, 1, 8, 8)
    log.log_adversarial_grid(child, x, (x + 0.1).clamp(0, 1), torch.tensor([0, 1, 2, 3]),
                             torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 0, 3]))
    log.end_run(child, "FINISHED", stop_reason="asha: below median at epoch 3")
    log.end_run(parent)

    client = MlflowClient(tracking_uri)
    run = client.get_run(child)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.alpha"] == str(1 / 3) and run.data.params["model.name"] == "lenet5"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags[SWEEP_TAG] == "sw1" and run.data.tags[TRIAL_TAG] == "t0"
    assert run.data.tags["stop_reason"].startswith("asha")
    history = client.get_metric_history(child, "val/clean_acc")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.4), (1, 0.5), (2, 0.6)]
    sweep = client.get_run(parent)
    assert sweep.data.tags["gce.spec_name"] == "quickstart" and sweep.data.tags["gce.spec_hash"] == spec_hash(spec)
    assert sweep.data.tags["gce.version.mlflow"] and sweep.data.tags["gce.ray_address"] == "local"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts must go through the server's proxy"

    api = f"{tracking_uri}/api/2.0/mlflow"
    rest = requests.get(f"{api}/runs/get", params={"run_id": child}, timeout=10).json()["run"]
    assert {p["key"]: p["value"] for p in rest["data"]["params"]}["loss.name"] == "gce"
    rest_metrics = {m["key"]: m["value"] for m in rest["data"]["metrics"]}
    assert rest_metrics["val/robust_acc/worst_case"] == 0.15
    assert rest_metrics["val/robust_acc/pgd/eps_0.3"] == 0.2  # '=' is not allowed in MLflow names
    listed = requests.get(f"{api}/artifacts/list", params={"run_id": child, "path": "plots"}, timeout=10).json()
    assert {f["path"] for f in listed["files"]} == {f"plots/{n}.png" for n in (
        "robustness_curves", "confusion_matrix", "embedding", "adversarial_examples")}
    proxy = f"{tracking_uri}/api/2.0/mlflow-artifacts/artifacts/{log.experiment_id}/{child}/artifacts"
    for name in ("plots/robustness_curves.png", "plots/adversarial_examples.png"):
        body = requests.get(f"{proxy}/{name}", timeout=10)
        assert body.status_code == 200 and body.content.startswith(PNG), name
    assert "lr: 0.001" in requests.get(f"{proxy}/spec.yaml", timeout=10).text
    local = client.download_artifacts(child, "checkpoints/final.pt", str(tmp_path / "dl"))
    assert torch.load(local, weights_only=True)["config"]["loss.name"] == "gce"


def test_a_trial_is_one_run_however_often_it_starts(tracking_uri):
    log = new_logger(tracking_uri)
    parent = log.start_sweep("sw2", spec_name="s", spec_hash="h")
    assert log.start_sweep("sw2", spec_name="s", spec_hash="h") == parent  # a resumed sweep keeps its parent
    first = log.start_trial("sw2", "t0", {"seed": 0}, parent_run_id=parent)
    log.end_run(first, "FAILED", error=RuntimeError("CUDA out of memory"))
    client = MlflowClient(tracking_uri)
    failed = client.get_run(first)
    assert failed.info.status == "FAILED" and failed.data.tags["error"] == "RuntimeError: CUDA out of memory"

    again = log.start_trial("sw2", "t0", {"seed": 0}, parent_run_id=parent)  # the retry continues the run
    assert again == first and client.get_run(first).info.status == "RUNNING"
    other = log.start_trial("sw2", "t1", {"seed": 1}, parent_run_id=parent)
    runs = client.search_runs([log.experiment_id], f"tags.`{TRIAL_TAG}` = 't0'")
    assert [r.info.run_id for r in runs] == [first]

    # the driver dies: on resume the sweep closes what it left RUNNING, except the trial it resumes now
    assert log.close_orphans("sw2", keep=[other]) == [first]
    assert client.get_run(first).info.status == "KILLED"
    assert client.get_run(other).info.status == "RUNNING"
    assert client.get_run(parent).info.status == "RUNNING"  # parents are not trials
    log.end_run(other, "KILLED")
    assert client.get_run(other).info.status == "KILLED"
    assert len(client.search_runs([log.experiment_id], f"tags.`{SWEEP_TAG}` = 'sw2'")) == 3


def test_end_run_rejects_unknown_status_and_ids_with_quotes(mlflow_server):
    log = new_logger(mlflow_server.url)
    run = log.start_trial("sw3", "t0")
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        log.end_run(run, "DONE")
    with pytest.raises(ValueError, match="quotes"):
        log.start_trial("sw3", "t'0")


def test_plots_reject_wrong_shapes_and_write_pngs(tmp_path):
    with pytest.raises(ValueError, match="K x K"):
        plots.confusion_matrix(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plots.embedding_scatter(np.ones((5, 3)), np.zeros(5))
    with pytest.raises(ValueError, match="same"):
        plots.adversarial_grid(np.ones((2, 1, 4, 4)), np.ones((3, 1, 4, 4)), [0, 1])
    rgb = plots.adversarial_grid(np.random.rand(3, 3, 8, 8), np.random.rand(3, 3, 8, 8), [0, 1, 2])
    path = plots.save(rgb, tmp_path / "grid.png")
    assert path.read_bytes().startswith(PNG)


def test_dataset_lineage_is_stored_once_per_split_and_compare_warns_on_other_data(mlflow_server):
    from typer.testing import CliRunner

    from gce.data import load_dataset
    from sweeps.cli import app

    name = f"lineage-{uuid.uuid4().hex[:6]}"
    log = RunLogger(mlflow_server.url, name)
    digits, mnist = load_dataset("digits", seed=0), load_dataset("mnist5k", seed=0)
    runs = []
    for i, data in enumerate([digits, digits, mnist]):
        run = log.start_trial("s", f"t{i}", {"loss.name": "ce", "seed": i})
        log.log_datasets(run, data)
        log.log_datasets(run, data)  # a retried trial logs its lineage again: nothing is added
        log.log_metrics(run, {"val/clean_acc": 0.5})
        log.end_run(run)
        runs.append(run)
    stored = MlflowClient(mlflow_server.url).get_run(runs[0])
    inputs = stored.inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == ["digits-test", "digits-train", "digits-validation"]
    assert {json.loads(i.dataset.profile)["num_examples"] for i in inputs} == {len(digits.train), len(digits.val),
                                                                               len(digits.test)}
    assert stored.data.tags["gce.data_digest"] == digits.digest != mnist.digest
    out = CliRunner().invoke(app, ["compare", name, "--metric", "val/clean_acc", "--tracking-uri",
                                   mlflow_server.url])
    assert out.exit_code == 0, out.output
    assert f"trained on different data (gce.data_digest: {digits.digest} (2 runs), {mnist.digest} (1 run))" \
        in out.output
    same = CliRunner().invoke(app, ["compare", name, "--metric", "val/clean_acc", "--tracking-uri",
                                    mlflow_server.url, "--filter", f"tags.`gce.data_digest` = '{digits.digest}'"])
    assert same.exit_code == 0 and "different data" not in same.output


def test_trials_on_the_same_data_logging_their_lineage_at_once_both_get_it(tracking_uri):
    """The server's dataset insert is check-then-insert: two trials with the same splits (same seed) logging at
    the same moment made the second fail with a UNIQUE violation (seen in CI). Both must end with their inputs."""
    import threading

    from gce.data import load_dataset

    data = load_dataset("digits", seed=0)
    for round_ in range(4):  # a fresh experiment each round: the race is on the experiment's first insert
        log = RunLogger(tracking_uri, f"lineage-race-{uuid.uuid4().hex[:6]}")
        runs = [log.start_trial("s", f"t{i}", {"seed": 0}) for i in range(3)]
        barrier, errors = threading.Barrier(len(runs)), []

        def lineage(log: RunLogger, barrier: threading.Barrier, errors: list, run_id: str) -> None:
            try:
                barrier.wait()
                log.log_datasets(run_id, data)
            except Exception as err:  # collected and asserted below
                errors.append(err)

        threads = [threading.Thread(target=lineage, args=(log, barrier, errors, run)) for run in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [], f"round {round_}: {errors}"
        for run in runs:
            stored = MlflowClient(tracking_uri).get_run(run).inputs.dataset_inputs
            assert sorted(i.dataset.name for i in stored) == ["digits-test", "digits-train", "digits-validation"]


def test_a_lost_insert_race_on_the_server_is_retried_not_raised(mlflow_server):
    """The race above is rare on demand (a few ms wide): here the server's exact answer to the loser of it is
    given to the first request, as CI saw it; the lineage must still be stored, and other errors still raise."""
    from mlflow.exceptions import RestException

    from gce.data import load_dataset

    log = RunLogger(mlflow_server.url, f"lineage-lost-{uuid.uuid4().hex[:6]}")
    run = log.start_trial("s", "t0", {"seed": 0})
    real, calls = log.client.log_inputs, []

    def lose_once(run_id, datasets=None, models=None):
        calls.append(run_id)
        if len(calls) == 1:
            raise RestException({"error_code": "BAD_REQUEST", "message": "(sqlite3.IntegrityError) UNIQUE constraint "
                                 "failed: datasets.experiment_id, datasets.name, datasets.digest"})
        return real(run_id, datasets, models)

    log.client.log_inputs = lose_once
    log.log_datasets(run, load_dataset("digits", seed=0))
    assert len(calls) == 2 and len(MlflowClient(mlflow_server.url).get_run(run).inputs.dataset_inputs) == 3

    def refuse(run_id, datasets=None, models=None):
        raise RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "dataset name too long"})

    log.client.log_inputs = refuse
    with pytest.raises(RestException, match="too long"):
        log.log_datasets(run, load_dataset("digits", seed=0))
