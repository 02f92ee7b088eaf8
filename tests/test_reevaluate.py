"""``gce-sweep evaluate`` on a real tiny sweep (real local Ray, real MLflow server): new attacks and transfer
attacks logged into the finished runs, idempotently, and bad inputs refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from sweeps.cli import app
from sweeps.launcher import run_sweep
from sweeps.loading import load_spec
from sweeps.reevaluate import EvaluateError, autoattack_block, load_evaluation, worst_label
from tracking.logger import ROLE_TAG, SWEEP_TAG, RunLogger

runner = CliRunner()
TINY = {"data": {"dataset": "mnist5k", "limit": 512}, "model": {"name": "mlp", "kwargs": {"hidden": 32}},
        "optim": {"name": "adam", "lr": 3e-3}, "epochs": 1, "batch_size": 64, "max_batches": 4}
EVAL = {"max_examples": 48, "attacks": [{"name": "fgsm", "eps": [0.1, 0.3]}], "checks": False, "plots": False}


@pytest.fixture(scope="module")
def sweep(ray_local, mlflow_server, tmp_path_factory):
    """Two finished trials (CE, GCE; seed 0) and their runs: {loss: run}."""
    name = f"reeval-{uuid.uuid4().hex[:6]}"
    spec = load_spec({"name": name, "experiment": f"test-{name}", "base": TINY, "evaluation": EVAL,
                      "space": {"loss.name": ["ce", "gce"]}, "resources": {"cpu": 1},
                      "system_metrics": {"enabled": False}})
    result = run_sweep(spec, tracking_uri=mlflow_server.url, storage=tmp_path_factory.mktemp("ray"))
    assert result.trials == 2 and result.errors == 0
    return result.sweep_id, result.experiment, mlflow_server.url


def trials(uri: str, sweep_id: str) -> dict:
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`{SWEEP_TAG}` = '{sweep_id}' AND tags.`{ROLE_TAG}` = 'trial'")
    return {r.data.params["loss.name"]: r for r in runs}


def evaluate(uri: str, *args: str):
    return runner.invoke(app, ["evaluate", *args, "--tracking-uri", uri])


def attack_file(tmp_path, attacks: list, name: str = "attacks.yaml", **evaluation) -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"evaluation": {"attacks": attacks, **evaluation}}))  # JSON is YAML
    return str(path)


def history(uri: str, run_id: str, key: str) -> list:
    return MlflowClient(uri).get_metric_history(run_id, key)


@pytest.mark.slow
def test_new_attacks_go_into_every_finished_run_once(sweep, tmp_path):
    sweep_id, _, uri = sweep
    before = trials(uri, sweep_id)
    mim = attack_file(tmp_path, [{"name": "mim", "eps": [0.1, 0.3], "steps": 3},
                                 {"name": "pgd", "eps": [0.3], "steps": 3, "loss": "cw"}], name="mim.yaml")
    out = evaluate(uri, sweep_id, "--attacks", mim, "--name", "mim")
    assert out.exit_code == 0, out.output
    assert "2 run(s) evaluated, 0 skipped, 0 failed" in out.output and "Traceback" not in out.output
    after = trials(uri, sweep_id)
    new = {f"{s}/robust_acc/{k}" for s in ("val", "test")
           for k in ("mim/eps_0.1", "mim/eps_0.3", "pgd-cw/eps_0.3", "worst_case_mim/eps_0.1",
                     "worst_case_mim/eps_0.3")}
    for loss, run in after.items():
        m, old = run.data.metrics, before[loss].data.metrics
        assert run.info.status == "FINISHED"
        assert new | {"time/reeval_mim_s"} <= set(m)
        assert {k: m[k] for k in old} == old  # the trial's own metrics: unchanged
        assert set(m) - set(old) == new | {"time/reeval_mim_s"}  # nothing but the new keys
        for split in ("val", "test"):  # the evaluation's worst case is at most each of its attacks
            assert m[f"{split}/robust_acc/worst_case_mim/eps_0.3"] <= min(m[f"{split}/robust_acc/mim/eps_0.3"],
                                                                         m[f"{split}/robust_acc/pgd-cw/eps_0.3"])
            assert m[f"{split}/robust_acc/worst_case_mim/eps_0.3"] <= m[f"{split}/robust_acc/worst_case_mim/eps_0.1"]
        assert len(history(uri, run.info.run_id, "val/robust_acc/worst_case")) == 1  # the headline: the trial's
        steps = {p.step for p in history(uri, run.info.run_id, "val/robust_acc/mim/eps_0.3")}
        assert steps == {int(m["epoch"])}  # at the run's last step
        record = json.loads(run.data.tags["gce.evaluation.mim"])
        assert record["splits"] == ["test", "val"] and record["surrogate"] is None
        assert record["n"] == {"val": int(m["val/eval_n"]), "test": int(m["test/eval_n"])}  # the trial's points

    # (2) The same evaluation again adds nothing; another list adds its own keys, on one run in this process.
    again = evaluate(uri, sweep_id, "--attacks", mim, "--name", "mim")
    assert again.exit_code == 0 and again.output.count("already evaluated") == 2, again.output
    gce = after["gce"].info.run_id
    assert len(history(uri, gce, "val/robust_acc/mim/eps_0.3")) == 1
    assert len(history(uri, gce, "time/reeval_mim_s")) == 1
    other = attack_file(tmp_path, [{"name": "bim", "eps": [0.3], "steps": 2}], name="bim.yaml")
    one = evaluate(uri, gce, "--attacks", other, "--split", "val", "--no-ray")
    assert one.exit_code == 0 and "1 run(s) evaluated" in one.output, one.output
    name = load_evaluation(attacks=other, splits=("val",)).name
    assert name.startswith("reeval-")
    runs = trials(uri, sweep_id)
    assert {"val/robust_acc/bim/eps_0.3", f"val/robust_acc/{worst_label(name, 'linf', 0.3)}/eps_0.3"} \
        <= set(runs["gce"].data.metrics)
    assert "test/robust_acc/bim/eps_0.3" not in runs["gce"].data.metrics  # --split val
    assert "val/robust_acc/bim/eps_0.3" not in runs["ce"].data.metrics  # one run's id: that run only
    # Test split later: only what is missing is evaluated.
    later = evaluate(uri, gce, "--attacks", other, "--no-ray")
    assert later.exit_code == 0 and "1 run(s) evaluated" in later.output, later.output
    runs = trials(uri, sweep_id)
    assert "test/robust_acc/bim/eps_0.3" in runs["gce"].data.metrics
    assert len(history(uri, gce, "val/robust_acc/bim/eps_0.3")) == 1
    # A name taken by another evaluation, or a key the run holds already, is refused for that run.
    clash = evaluate(uri, sweep_id, "--attacks", other, "--name", "mim", "--no-ray")
    assert clash.exit_code == 0 and clash.output.count("holds another evaluation") == 2, clash.output
    own = attack_file(tmp_path, [{"name": "fgsm", "eps": [0.3]}], name="fgsm.yaml")
    refused = evaluate(uri, sweep_id, "--attacks", own, "--no-ray")
    assert refused.output.count("already has val/robust_acc/fgsm/eps_0.3") == 2, refused.output
    assert len(history(uri, gce, "val/robust_acc/fgsm/eps_0.3")) == 1
    assert {r.info.status for r in trials(uri, sweep_id).values()} == {"FINISHED"}


@pytest.mark.slow
def test_transfer_from_the_ce_sibling(sweep, tmp_path):
    sweep_id, _, uri = sweep
    fgsm = attack_file(tmp_path, [{"name": "fgsm", "eps": [0.1, 0.3]}])
    out = evaluate(uri, sweep_id, "--attacks", fgsm, "--surrogate", "loss.name=ce", "--split", "val")
    assert out.exit_code == 0, out.output
    assert "1 run(s) evaluated, 1 skipped" in out.output and "its own surrogate" in out.output
    runs = trials(uri, sweep_id)
    ce, gce = runs["ce"], runs["gce"]
    name = load_evaluation(attacks=fgsm, surrogate="loss.name=ce").name
    assert name.startswith("transfer-")
    m = gce.data.metrics
    assert {"val/robust_acc/transfer-fgsm/eps_0.1", "val/robust_acc/transfer-fgsm/eps_0.3",
            f"val/robust_acc/worst_case_{name}/eps_0.3"} <= set(m)
    assert 0 <= m["val/robust_acc/transfer-fgsm/eps_0.3"] <= m["val/eval_clean_acc"]
    assert gce.data.tags[f"gce.evaluation.{name}.surrogate"] == ce.info.run_id
    assert json.loads(gce.data.tags[f"gce.evaluation.{name}"])["surrogate"] == ce.info.run_id
    assert not any(k.startswith("val/robust_acc/transfer-") for k in ce.data.metrics)
    assert gce.info.status == ce.info.status == "FINISHED"
    # A run id as the selector: that run is the surrogate, and is itself skipped.
    by_id = evaluate(uri, sweep_id, "--attacks", fgsm, "--surrogate", gce.info.run_id, "--split", "val",
                     "--name", "from-gce", "--no-ray")
    assert by_id.exit_code == 0 and "1 run(s) evaluated, 1 skipped" in by_id.output, by_id.output
    assert "val/robust_acc/transfer-fgsm/eps_0.3" in trials(uri, sweep_id)["ce"].data.metrics


@pytest.mark.slow
def test_the_command_line_starts_its_own_ray_and_prints_no_traceback(sweep, tmp_path):
    sweep_id, _, uri = sweep
    attacks = attack_file(tmp_path, [{"name": "pgd", "eps": [0.3], "steps": 2, "loss": "dlr"}])
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_AUTH_MODE": "disabled",
           "GCE_RAY_RESULTS": str(tmp_path / "ray_results")}
    out = subprocess.run([sys.executable, "-m", "sweeps.cli", "evaluate", sweep_id, "--attacks", attacks, "--split",
                          "val", "--name", "cli"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 run(s) evaluated, 0 skipped, 0 failed" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr and "Downloading artifacts" not in out.stderr
    assert not (tmp_path / "ray_results").exists()  # Ray's start-up notes went to a temporary folder
    assert all("val/robust_acc/worst_case_cli/eps_0.3" in r.data.metrics for r in trials(uri, sweep_id).values())


@pytest.mark.slow
def test_runs_without_checkpoint_or_not_finished_are_skipped_and_a_bad_checkpoint_fails(mlflow_server, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setenv("GCE_RAY_RESULTS", str(tmp_path / "ray_results"))  # where a failure's traceback goes
    uri, sweep_id = mlflow_server.url, f"fake-{uuid.uuid4().hex[:6]}"
    log = RunLogger(uri, f"test-{sweep_id}")
    parent = log.start_sweep(sweep_id, spec_name="fake", spec_hash="0")
    done = log.start_trial(sweep_id, "t0", {"loss.name": "ce"}, parent_run_id=parent)
    log.end_run(done)
    log.start_trial(sweep_id, "t1", {"loss.name": "gce"}, parent_run_id=parent)  # still RUNNING
    fgsm = attack_file(tmp_path, [{"name": "fgsm", "eps": [0.3]}])
    out = evaluate(uri, sweep_id, "--attacks", fgsm)
    assert out.exit_code == 0, out.output
    assert "no checkpoint artifact (checkpoints/final.pt)" in out.output and "status RUNNING" in out.output
    assert "0 run(s) evaluated, 2 skipped" in out.output
    parent_out = evaluate(uri, parent, "--attacks", fgsm)  # the parent run id stands for its sweep
    assert "0 run(s) evaluated, 2 skipped" in parent_out.output, parent_out.output
    # A checkpoint that is no checkpoint: that run fails (exit code 1), in one line, its traceback in a file.
    junk = tmp_path / "final.pt"
    junk.write_bytes(b"not a checkpoint")
    log.log_checkpoint(done, junk)
    failed = evaluate(uri, sweep_id, "--attacks", fgsm)
    assert failed.exit_code == 1, failed.output
    assert "failed: " in failed.output and "1 run(s) failed" in failed.output and "Traceback" not in failed.output
    assert "Traceback" in (tmp_path / "last_error.txt").read_text()
    assert MlflowClient(uri).get_run(done).info.status == "FINISHED"
    assert not any(k.startswith("gce.evaluation.") for k in MlflowClient(uri).get_run(done).data.tags)


def one_error_line(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.mark.slow
def test_bad_inputs_are_one_clear_line(sweep, tmp_path):
    sweep_id, _, uri = sweep
    fgsm = attack_file(tmp_path, [{"name": "fgsm", "eps": [0.3]}])
    one_error_line(evaluate(uri, "no-such-sweep", "--attacks", fgsm), "no-such-sweep")
    one_error_line(evaluate(uri, "0" * 32, "--attacks", fgsm), "no run 000")
    one_error_line(evaluate(uri, sweep_id, "--attacks", fgsm, "--surrogate", "loss.name=cot"), "loss.name=cot")
    one_error_line(evaluate(uri, sweep_id, "--attacks", fgsm, "--surrogate", "loss.nam=ce"), "loss.nam")
    one_error_line(evaluate(uri, sweep_id, "--attacks", fgsm, "--surrogate", "ce"), "KEY=VALUE")
    one_error_line(evaluate(uri, sweep_id, "--attacks", fgsm, "--surrogate", "f" * 32), "no such run")
    one_error_line(evaluate(uri, sweep_id, "--attacks", str(tmp_path / "missing.yaml")), "missing.yaml")
    (tmp_path / "broken.yaml").write_text("evaluation: {attacks: [\n")
    one_error_line(evaluate(uri, sweep_id, "--attacks", str(tmp_path / "broken.yaml")), "not valid YAML")
    bad = attack_file(tmp_path, [{"name": "pgd", "eps": [0.3], "stepz": 3}, {"name": "nope", "eps": 0.1}],
                      name="bad.yaml")
    one_error_line(evaluate(uri, sweep_id, "--attacks", bad), "evaluation.attacks.0 (pgd)", "stepz",
                   "evaluation.attacks.1 (nope)", "unknown attack name")
    one_error_line(evaluate(uri, sweep_id), "--attacks FILE.yaml")
    one_error_line(evaluate(uri, sweep_id, "--attacks", fgsm, "--name", "a/b"), "--name")


def test_autoattack_shorthand_is_one_attack_like_the_others():
    assert autoattack_block("standard", [0.1, 0.3]) == {
        "attacks": [{"name": "autoattack", "version": "standard", "eps": [0.1, 0.3], "norm": "linf"}]}
    with pytest.raises(EvaluateError, match="--eps"):
        load_evaluation(autoattack="standard")
    with pytest.raises(EvaluateError, match="numbers"):
        load_evaluation(autoattack="standard", eps="0.1,x")
    try:  # validated like any attack: until the registry has autoattack, its error names the field
        ev = load_evaluation(autoattack="standard", eps="0.1,0.3")
    except EvaluateError as err:
        assert "evaluation.attacks.0 (autoattack)" in str(err) and str(err).startswith("--autoattack: ")
    else:
        assert ev.name == "autoattack" and [c.label() for c in ev.configs()] == ["autoattack", "autoattack"]
        assert ev.expected_keys("val")[-1] == "val/robust_acc/worst_case_autoattack/eps_0.3"
