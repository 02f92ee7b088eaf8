"""Tracking under faults, with real server processes: a server crashed and restarted while a trial logs, a server
that never comes back, and eight trials writing at once to the embedded SQLite server.

Every test counts metric points: sent by the writers, stored on the server (read back per key), and - when the
server stays away - reported as not stored. They must add up: nothing silently dropped, nothing twice.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from conftest import crash_server
from mlflow import MlflowClient

from tracking.logger import RunLogger
from tracking.server import ensure_server, stop_server

pytestmark = pytest.mark.slow

KEYS = [f"train/m{k}" for k in range(6)]


def stored_points(client: MlflowClient, run_id: str, keys) -> dict[str, list[int]]:
    return {k: sorted(m.step for m in client.get_metric_history(run_id, k)) for k in keys}


def test_points_logged_through_a_server_crash_and_restart_all_arrive(own_server):
    root, info = own_server
    log = RunLogger(info.url, f"restart-{uuid.uuid4().hex[:6]}", max_outage_s=120)
    run = log.start_trial("sw", "t0", {"seed": 0})
    events: dict[str, float] = {}
    failures: list[BaseException] = []

    def crash_and_restart() -> None:
        try:
            crash_server(info.pid)
            events["down"] = time.time()
            time.sleep(4)  # down for a while, then the operator starts it again on the same store and port
            again = ensure_server(root, port=info.port)
            assert again.port == info.port and again.pid != info.pid
            events["up"] = time.time()
        except BaseException as err:  # surfaced in the test thread below
            failures.append(err)

    restarter = threading.Thread(target=crash_and_restart)
    sent, step, slowest, max_pending, after_up = 0, 0, 0.0, 0, 0
    while after_up < 5:  # "training": one log_batch an epoch, every 0.2 s, until 5 epochs after the restart
        step += 1
        started = time.monotonic()
        log.log_metrics(run, {k: step + i / 10 for i, k in enumerate(KEYS)}, step=step)
        slowest = max(slowest, time.monotonic() - started)
        sent += len(KEYS)
        max_pending = max(max_pending, log.pending["metrics"])
        if step == 5:
            restarter.start()
        if "up" in events:
            after_up += 1
        assert not failures, failures
        assert step < 2000, "the server never came back"
        time.sleep(0.2)
    restarter.join()
    log.end_run(run)  # waits for the queue: the run ends after its last point

    client = MlflowClient(info.url)
    stored = stored_points(client, run, KEYS)
    total = sum(len(steps) for steps in stored.values())
    during = [m for m in client.get_metric_history(run, KEYS[0])
              if events["down"] * 1000 <= m.timestamp <= events["up"] * 1000]
    print(f"\nFIGURES server crash+restart: {step} epochs, {sent} metric points sent, {total} stored, "
          f"{len(during)} epochs logged while it was down, up to {max_pending} points buffered, "
          f"{log.retries} retried attempts, slowest log call {slowest:.1f} s")
    assert total == sent and all(steps == list(range(1, step + 1)) for steps in stored.values())
    assert during and max_pending > 0, "the outage must have been trained through, with points buffered"
    assert slowest < 10, "a log call during the outage must not stall training for long"
    assert client.get_run(run).info.status == "FINISHED" and log.pending == {"metrics": 0, "params": 0, "tags": 0}


TRIAL = """
import sys, time
from tracking.logger import RunLogger
log = RunLogger(sys.argv[1], sys.argv[2])
run = log.start_trial("sw", "t0")
print("RUN", run, flush=True)
sent = 0
try:
    for step in range(1, 100000):
        sent += 2  # asked to log, whatever happens to the call
        log.log_metrics(run, {"train/loss": 1 / step, "train/acc": 0.5}, step=step)
        print("SENT", sent, flush=True)
        time.sleep(0.2)
finally:
    print("SENT", sent, flush=True)
"""


def test_a_server_that_never_comes_back_fails_the_trial_clearly_within_the_bound(own_server):
    root, info = own_server
    bound = 6
    env = {**os.environ, "GCE_TRACKING_MAX_OUTAGE_S": str(bound)}
    trial = subprocess.Popen([sys.executable, "-c", TRIAL, info.url, f"gone-{uuid.uuid4().hex[:6]}"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        run = trial.stdout.readline().split()[1]
        while int(trial.stdout.readline().split()[1]) < 10:  # a few epochs stored, then the server goes away
            pass
        stop_server(root)
        down = time.monotonic()
        out, err = trial.communicate(timeout=bound + 60)
        waited = time.monotonic() - down
    finally:
        if trial.poll() is None:
            os.killpg(trial.pid, signal.SIGKILL)
            trial.wait()
    sent = int(re.findall(r"SENT (\d+)", out)[-1])
    assert trial.returncode != 0 and "TrackingUnavailable" in err, err[-3000:]
    message = err.strip().splitlines()[-1]
    assert info.url in message and "GCE_TRACKING_MAX_OUTAGE_S" in message and f"limit is {bound} s" in message
    lost = int(re.search(r"not stored: (\d+) metric point", message).group(1))
    assert bound <= waited < bound + 20, f"failed after {waited:.0f} s for a bound of {bound} s"

    again = ensure_server(root, port=info.port)  # only to count what did arrive
    stored = sum(len(steps) for steps in stored_points(MlflowClient(again.url), run, ["train/loss", "train/acc"])
                 .values())
    print(f"\nFIGURES server gone: {sent} metric points sent, {stored} stored before it went, {lost} reported as "
          f"not stored; the trial failed {waited:.1f} s after the server stopped (bound {bound} s)")
    assert lost > 0 and stored + lost == sent


WRITER = """
import json, os, sys, time
from tracking.logger import RunLogger
uri, experiment, trial, epochs, keys, go = sys.argv[1:7]
log = RunLogger(uri, experiment)
run = log.start_trial("concurrency", trial, {"trial": trial, "seed": 0})
print("READY", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
sent, started = 0, time.monotonic()
for epoch in range(1, int(epochs) + 1):
    metrics = {f"train/m{k}": epoch + k / 100 for k in range(int(keys))}
    log.log_metrics(run, metrics, step=epoch)
    sent += len(metrics)
log.end_run(run)
print(json.dumps({"run": run, "sent": sent, "retries": log.retries, "seconds": time.monotonic() - started}))
"""


def test_eight_concurrent_trials_on_the_embedded_server_lose_nothing(mlflow_server, tmp_path):
    trials, epochs, keys = 8, 60, 20
    log_file = os.path.join(mlflow_server.root, "server.log")
    offset = os.path.getsize(log_file)
    experiment, go = f"concurrency-{uuid.uuid4().hex[:6]}", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, mlflow_server.url, experiment, f"t{i}", str(epochs),
                               str(keys), str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for i in range(trials)]
    try:
        for proc in procs:  # every writer has created its run (and raced the others to create the experiment)
            assert proc.stdout.readline().strip() == "READY", proc.stderr.read()[-3000:]
        started = time.monotonic()
        go.touch()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        seconds = time.monotonic() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    client = MlflowClient(mlflow_server.url)
    sent = stored = 0
    for result in results:
        steps = stored_points(client, result["run"], [f"train/m{k}" for k in range(keys)])
        sent += result["sent"]
        stored += sum(len(s) for s in steps.values())
        assert all(s == list(range(1, epochs + 1)) for s in steps.values())
        assert client.get_run(result["run"]).info.status == "FINISHED"
    with open(log_file, errors="replace") as fh:
        fh.seek(offset)
        server_log = fh.read()
    retries = sum(r["retries"] for r in results)
    print(f"\nFIGURES concurrency: {trials} writers x {epochs} log_batch calls x {keys} metrics: {sent} metric points "
          f"sent, {stored} stored in {seconds:.1f} s; {retries} retried attempts; "
          f"'database is locked' in the server log: {server_log.count('database is locked')}")
    assert len({r["run"] for r in results}) == trials and stored == sent == trials * epochs * keys
    assert "database is locked" not in server_log and retries == 0
