"""Resume after the sweep driver is killed (-9): every trial once in MLflow, finished trials kept, the
interrupted trial continuing from its checkpoint, nothing left RUNNING. Real processes throughout."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import yaml
from mlflow import MlflowClient

from benchmarks.faults import descendants, kill_all
from tracking.logger import ROLE_TAG, SWEEP_TAG

pytestmark = pytest.mark.slow

EPOCHS = 20  # long enough a trial that Tune saves a checkpoint of it while it still trains
SPEC = {
    "name": "resume", "experiment": "test-resume",
    "base": {"data": {"dataset": "mnist5k", "limit": 1024}, "model": {"name": "mlp", "kwargs": {"hidden": 32}},
             "optim": {"name": "adam", "lr": 3e-3}, "epochs": EPOCHS, "batch_size": 32, "max_batches": 24},
    "space": {"loss.name": ["ce", "gce", "cot"]},
    "evaluation": {"max_examples": 64, "attacks": [{"name": "fgsm", "eps": [0.1]}]},
    "resources": {"cpu": 1}, "max_concurrent_trials": 1,
}


def trial_runs(client: MlflowClient, sweep_id: str):
    exp = client.get_experiment_by_name("test-resume")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep_id}' AND tags.`{ROLE_TAG}` = 'trial'")


def test_kill_driver_then_resume(mlflow_server, tmp_path, record_property):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    results = tmp_path / "ray_results"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "GCE_RAY_RESULTS": str(results),
           "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", str(spec_path)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = MlflowClient(mlflow_server.url)
    ray_pids: list[int] = []
    try:
        deadline = time.time() + 300
        sweep_id = None
        while time.time() < deadline:  # kill once one trial has finished and the next is mid-training
            time.sleep(0.2)
            if sweep_id is None:
                found = [p.name for p in results.glob("resume-*")] if results.exists() else []
                sweep_id = found[0] if found else None
                continue
            if not _kill_point(client, sweep_id, results):
                continue
            # Freeze the whole tree, then look again: a trial in its last epoch could otherwise finish (its
            # worker outlives the driver for a moment) between the look and the kill (seen once in CI).
            ray_pids = descendants(driver.pid)
            signal_all([driver.pid, *ray_pids], signal.SIGSTOP)
            if _kill_point(client, sweep_id, results):
                break
            signal_all([driver.pid, *ray_pids], signal.SIGCONT)
        else:
            pytest.fail("the sweep never reached the point to kill it")
        kill_all([driver.pid, *ray_pids])  # a dead driver's orphans ignore SIGTERM (ENVIRONMENT.md)
        driver.wait(timeout=30)
        before = {r.data.tags["gce.trial_id"]: r for r in trial_runs(client, sweep_id)}
        done_before = {t for t, r in before.items() if r.info.status == "FINISHED"}
        interrupted = {t for t, r in before.items() if r.info.status == "RUNNING"}
        assert done_before and interrupted

        resume = subprocess.run([sys.executable, "-m", "sweeps.cli", "resume", sweep_id], env=env,
                                capture_output=True, text=True, timeout=600, start_new_session=True)
        assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
        assert "closed 1 orphaned run(s) as KILLED" in resume.stdout
    finally:
        if driver.poll() is None:
            ray_pids += descendants(driver.pid)
            os.kill(driver.pid, signal.SIGKILL)
        kill_all(ray_pids)

    after = trial_runs(client, sweep_id)
    ids = Counter(r.data.tags["gce.trial_id"] for r in after)
    figures = {"trials": 3, "finished before the kill (kept)": len(done_before),
               "killed mid-training": len(interrupted),
               "resumed": sum(r.data.tags.get("gce.resumes") == "1" for r in after),
               "runs lost": 3 - len(ids), "runs duplicated": sum(n - 1 for n in ids.values()),
               "runs left RUNNING": sum(r.info.status == "RUNNING" for r in after),
               "Ray processes cleaned up by PID": len(set(ray_pids))}
    record_property("figures", figures)
    print(f"\nFIGURES driver kill -9 + resume: {figures}")
    assert len(ids) == 3 and set(ids.values()) == {1}  # every trial exactly once: no duplicate runs
    assert {r.info.status for r in after} == {"FINISHED"}  # none left RUNNING or KILLED
    for run in after:
        steps = Counter(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert sorted(steps) == list(range(1, EPOCHS + 1)) and set(steps.values()) == {1}  # exactly once
        trial = run.data.tags["gce.trial_id"]
        if trial in done_before:  # kept, not re-run
            assert set(steps.values()) == {1} and "gce.resumes" not in run.data.tags
        if trial in interrupted:  # continued from its checkpoint, its replayed epochs not logged again
            assert run.data.tags.get("gce.resumes") == "1"
            assert int(run.data.tags["gce.restored_from_epoch"]) >= 1  # from its checkpoint, not from scratch
    exp = client.get_experiment_by_name("test-resume")
    parents = client.search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep_id}' AND "
                                                      f"tags.`{ROLE_TAG}` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_kill_before_tune_saved_anything_then_resume(mlflow_server, tmp_path):
    """A driver killed in the first seconds (its record and parent run exist, Tune has written nothing yet):
    resume starts the Tune run afresh under the same sweep id and parent run, and finishes it."""
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({**SPEC, "base": {**SPEC["base"], "epochs": 2}}))
    results = tmp_path / "ray_results"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "GCE_RAY_RESULTS": str(results),
           "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", str(spec_path)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ray_pids: list[int] = []
    try:
        deadline, record = time.time() + 120, None
        while time.time() < deadline and record is None:  # the moment the parent run is in the record
            for path in results.glob("resume-*/gce_sweep.json"):
                with contextlib.suppress(ValueError):
                    if json.loads(path.read_text()).get("parent_run_id"):
                        record = path
            time.sleep(0.02)
        assert record is not None, "the sweep never wrote its record"
        ray_pids = descendants(driver.pid)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        kill_all(ray_pids)
        assert not (record.parent / "tuner.pkl").exists() or not list(record.parent.glob("experiment_state-*"))
        sweep_id = record.parent.name
        resume = subprocess.run([sys.executable, "-m", "sweeps.cli", "resume", sweep_id], env=env,
                                capture_output=True, text=True, timeout=600, start_new_session=True)
    finally:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
        kill_all(ray_pids)
    output = resume.stdout + resume.stderr
    assert resume.returncode == 0 and "Traceback" not in output, output[-3000:]
    assert "starting afresh" in resume.stdout and "3 trial(s), 0 failed" in resume.stdout
    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name("test-resume").experiment_id],
                              f"tags.`{SWEEP_TAG}` = '{sweep_id}'")
    assert Counter(r.data.tags[ROLE_TAG] for r in runs) == {"sweep": 1, "trial": 3}
    assert {r.info.status for r in runs} == {"FINISHED"}


def _kill_point(client: MlflowClient, sweep_id: str, results) -> bool:
    """One trial finished and the next mid-training with a checkpoint Tune's state already names."""
    runs = trial_runs(client, sweep_id)
    running = [r for r in runs if r.info.status == "RUNNING"]
    return any(r.info.status == "FINISHED" for r in runs) and bool(running) \
        and len(client.get_metric_history(running[0].info.run_id, "train/loss")) >= 2 \
        and _state_names_a_checkpoint(results / sweep_id, running[0].data.tags["gce.trial_id"])


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _state_names_a_checkpoint(folder, trial_id: str) -> bool:
    """Whether Tune's saved experiment state already names a checkpoint of the trial (then a resume must
    continue from it, not from scratch). Tune keeps each trial's checkpoint list cloudpickled, in hex."""
    for path in folder.glob("experiment_state-*.json"):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            for trial, meta in json.loads(path.read_text())["trial_data"]:
                if trial_id in str(trial):
                    manager = str(json.loads(meta)["checkpoint_manager"] if isinstance(meta, str) else meta)
                    packed = re.search(r"'value': '([0-9a-f]+)'", manager)
                    if packed and re.search(rb"checkpoint_\d+", bytes.fromhex(packed.group(1))):
                        return True
    return False
