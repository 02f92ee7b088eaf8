"""Sweeps on a real two-node Ray cluster (head + worker started with ``ray start`` as separate processes on this
machine): trials on both nodes, a node killed mid-sweep, the head killed and the sweep resumed.

The kill moments are random (seed printed, ``GCE_FAULT_SEED`` replays one); after each fault the exactly-once
invariants are checked: one run per trial, all FINISHED, every epoch's metrics once, the final metrics once,
nothing left RUNNING.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import yaml
from mlflow import MlflowClient

from benchmarks.cluster import LocalCluster
from benchmarks.faults import descendants, kill_all
from gce.metrics import EPOCH
from sweeps.trainable import ATTEMPT_TAG, NODE_TAG, NODES_TAG
from tracking.logger import ROLE_TAG, SWEEP_TAG, TRIAL_TAG

pytestmark = pytest.mark.slow

EPOCHS = 12
SPEC = {
    "name": "cluster", "experiment": "test-cluster",
    "base": {"data": {"dataset": "mnist5k", "limit": 1024}, "model": {"name": "lenet5"},
             "optim": {"name": "adam", "lr": 2e-3}, "epochs": EPOCHS, "batch_size": 64, "max_batches": 8},
    "space": {"loss.name": ["ce", "gce"]},
    "seeds": [0, 1],
    "evaluation": {"max_examples": 64, "attacks": [{"name": "fgsm", "eps": [0.1]}]},
    "resources": {"cpu": 1}, "max_concurrent_trials": 2, "max_failures": 2,
    "system_metrics": {"enabled": False},
}


@pytest.fixture
def cluster():
    c = LocalCluster().start(workers=1)
    yield c
    c.stop()


@pytest.fixture
def seed(record_property):
    value = int(os.environ.get("GCE_FAULT_SEED", random.randrange(2**31)))
    print(f"fault seed {value} (replay: GCE_FAULT_SEED={value})")
    record_property("fault_seed", value)
    return value


def _env(mlflow_server, tmp_path) -> dict[str, str]:
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    return {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "GCE_RAY_RESULTS": str(tmp_path / "ray"),
            "RAY_AUTH_MODE": "disabled", "COLUMNS": "200", "RAY_gcs_rpc_server_reconnect_timeout_s": "5"}


def _start(args: list[str], env: dict, tmp_path, name: str) -> subprocess.Popen:
    log = (tmp_path / f"{name}.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "sweeps.cli", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)


def _runs(client: MlflowClient, sweep_id: str | None = None):
    exp = client.get_experiment_by_name("test-cluster")
    if exp is None:
        return []
    where = f"tags.`{ROLE_TAG}` = 'trial'" + (f" AND tags.`{SWEEP_TAG}` = '{sweep_id}'" if sweep_id else "")
    return client.search_runs([exp.experiment_id], where)


def _sweep_id(tmp_path) -> str | None:
    found = [p.name for p in (tmp_path / "ray").glob("cluster-*")] if (tmp_path / "ray").exists() else []
    return found[0] if found else None


def _log(tmp_path, name: str) -> str:
    return (tmp_path / f"{name}.log").read_text(errors="replace")


def check_exactly_once(client: MlflowClient, sweep_id: str) -> dict[str, object]:
    """The invariants after a sweep (asserted); returns its trial runs by trial id."""
    runs = _runs(client, sweep_id)
    per_trial = Counter(r.data.tags[TRIAL_TAG] for r in runs)
    assert len(per_trial) == 4 and set(per_trial.values()) == {1}, per_trial
    for run in runs:
        assert run.info.status == "FINISHED", (run.info.run_id, run.info.status, run.data.tags.get("error"))
        for key in EPOCH:
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, EPOCHS + 1)), (run.info.run_id, key, steps)
        assert len(client.get_metric_history(run.info.run_id, "time/trial_s")) == 1
        assert "val/robust_acc/worst_case" in run.data.metrics
    exp = client.get_experiment_by_name("test-cluster")
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    return {r.data.tags[TRIAL_TAG]: r for r in runs}


def test_sweep_runs_on_both_nodes_with_loopback_tracking(cluster, mlflow_server, tmp_path):
    """All nodes are this machine, so the embedded server's loopback URI serves them; every trial's run names
    its node, and the trials ran on both."""
    env = _env(mlflow_server, tmp_path)
    proc = _start(["run", "spec.yaml", "--address", cluster.address], env, tmp_path, "run")
    assert proc.wait(timeout=400) == 0, _log(tmp_path, "run")[-3000:]
    console = _log(tmp_path, "run")
    assert "4 trial(s), 0 failed" in console and "Traceback" not in console
    runs = check_exactly_once(MlflowClient(mlflow_server.url), _sweep_id(tmp_path))
    nodes = {r.data.tags[NODE_TAG] for r in runs.values()}
    assert nodes == {n.node_id for n in cluster.nodes}, nodes
    assert all(r.data.tags[ATTEMPT_TAG] == "1" for r in runs.values())


def test_node_killed_mid_trial_is_retried_on_the_survivor(cluster, mlflow_server, tmp_path, seed):
    """SIGKILL the worker node's raylet at a random moment of a trial it runs: Tune retries the trial on the
    head from its last checkpoint, in the same MLflow run, which records both attempts' nodes."""
    rng = random.Random(seed)
    env = _env(mlflow_server, tmp_path)
    client = MlflowClient(mlflow_server.url)
    worker = cluster.workers[0]
    proc = _start(["run", "spec.yaml", "--address", cluster.address], env, tmp_path, "run")
    try:
        victim, logged = _kill_when_running_on(worker, cluster, client, tmp_path, proc, rng.uniform(0, 8))
        assert proc.wait(timeout=500) == 0, _log(tmp_path, "run")[-3000:]
    finally:
        if proc.poll() is None:
            kill_all([proc.pid, *descendants(proc.pid)])
    console = _log(tmp_path, "run")
    assert "4 trial(s), 0 failed" in console and "Traceback" not in console, console[-3000:]
    runs = check_exactly_once(client, _sweep_id(tmp_path))
    run = runs[victim]
    tags = run.data.tags
    assert int(tags[ATTEMPT_TAG]) >= 2, tags
    history = tags[NODES_TAG].split(",")
    assert history[0].startswith(worker.node_id[:12]) and history[-1].startswith(cluster.head.node_id[:12]), history
    assert tags[NODE_TAG] == cluster.head.node_id
    if logged >= 2:  # the checkpoint of epoch `logged - 1` at least was on storage when the node died
        assert int(tags.get("gce.restored_from_epoch", 0)) >= logged - 1, (logged, tags)


def test_head_killed_then_resume_continues(mlflow_server, tmp_path, seed):
    """The head machine is lost (head processes and the driver on it, SIGKILL) at a random moment; the cluster
    is started again on the same address and `gce-sweep resume` finishes the sweep exactly once."""
    rng = random.Random(seed)
    env = _env(mlflow_server, tmp_path)
    client = MlflowClient(mlflow_server.url)
    cluster = LocalCluster().start(workers=1)
    try:
        proc = _start(["run", "spec.yaml", "--address", cluster.address], env, tmp_path, "run")
        moment = rng.uniform(0, 20)  # the sweep takes ~45 s here: the kill lands while it runs
        started = time.time()
        while time.time() - started < moment and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, "the sweep ended before the head was killed"
        kill_all([proc.pid, *descendants(proc.pid)])
        cluster.kill_node(cluster.head)
        proc.wait(timeout=30)
        # The worker node loses its GCS: its raylet gives up (5 s here) and takes its trial workers with it.
        assert cluster.wait_gone(cluster.workers[0], 90), "the worker node outlived its head"
        cluster.stop()
        sweep_id = _sweep_id(tmp_path)
        cluster = LocalCluster(port=cluster.port).start(workers=1)
        # Killed before the launch wrote its record (the first second), nothing was started: the user runs again.
        args, name = (["resume", sweep_id], "resume") if sweep_id else (["run", "spec.yaml"], "rerun")
        print(f"head killed at {moment:.1f} s; then `gce-sweep {args[0]}`")
        again = _start(args, env, tmp_path, name)
        assert again.wait(timeout=500) == 0, _log(tmp_path, name)[-3000:]
        console = _log(tmp_path, name)
        assert "4 trial(s), 0 failed" in console and "Traceback" not in console, console[-3000:]
        check_exactly_once(client, sweep_id or _sweep_id(tmp_path))
    finally:
        cluster.stop()


def _kill_when_running_on(node, cluster, client, tmp_path, proc, delay: float) -> tuple[str, int]:
    """Wait until a trial runs on ``node``, then ``delay`` s more, then SIGKILL the node's raylet while that
    trial still runs there. Returns (its trial id, the epochs its run had logged)."""
    deadline = time.time() + 300
    first_seen: dict[str, float] = {}
    while time.time() < deadline:
        assert proc.poll() is None, f"the sweep ended before a kill: {_log(tmp_path, 'run')[-2000:]}"
        for run in _runs(client):
            if run.info.status == "RUNNING" and run.data.tags.get(NODE_TAG) == node.node_id:
                trial = run.data.tags[TRIAL_TAG]
                first_seen.setdefault(trial, time.time())
                if time.time() - first_seen[trial] < delay:
                    continue
                # Freeze the node, then look again: its trial could otherwise end between the look and the kill.
                os.killpg(node.session, signal.SIGSTOP)
                try:
                    now = client.get_run(run.info.run_id)
                    if now.info.status == "RUNNING":
                        assert cluster.kill_raylet(node)
                        print(f"killed node {node.node_id[:12]} after {delay:.1f} s of trial {trial}")
                        return trial, int(now.data.metrics.get("epoch", 0))
                finally:
                    os.killpg(node.session, signal.SIGCONT)  # its workers must run to notice their raylet died
        time.sleep(0.1)
    raise AssertionError("no trial ever ran on the worker node")


def test_only_nodes_of_other_machines_count_as_remote():
    import psutil

    from sweeps.runtime import foreign

    here = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family.name == "AF_INET" and not a.address.startswith("127.")]
    assert here, "this machine has no non-loopback IPv4 address to test with"
    assert foreign(["127.0.0.1", "127.0.1.1", here[0], "::1", "203.0.113.9"]) == ["203.0.113.9"]


def test_loopback_tracking_is_refused_for_a_cluster_with_remote_nodes(monkeypatch):
    """The refusal names the nodes that could not reach the URI; a cluster of this machine only passes."""
    import sweeps.runtime
    from sweeps.launcher import refuse_loopback
    from sweeps.spec import SpecError

    monkeypatch.setattr(sweeps.runtime, "remote_nodes", lambda address: ["203.0.113.9"])
    with pytest.raises(SpecError, match=r"203\.0\.113\.9.*MLFLOW_TRACKING_URI"):
        refuse_loopback("203.0.113.1:6379", "http://127.0.0.1:5000", "trials")
    refuse_loopback("203.0.113.1:6379", "http://mlflow.example:5000", "trials")  # a reachable server: fine
    monkeypatch.setattr(sweeps.runtime, "remote_nodes", lambda address: [])
    refuse_loopback("127.0.0.1:6379", "http://127.0.0.1:5000", "trials")


def test_a_storage_uri_is_refused_before_anything_starts(tmp_path):
    env = {**os.environ, "GCE_RAY_RESULTS": str(tmp_path / "ray"), "COLUMNS": "200"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    out = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", "spec.yaml", "--storage", "s3://bucket/sweeps"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "storage" in out.stdout + out.stderr and "shared filesystem" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert not (tmp_path / "ray").exists()
