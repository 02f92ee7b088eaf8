"""A fault campaign: kill the sweep driver, a trial's worker, the embedded MLflow server, or the server and
then the driver (an outage cut short), at uniformly random moments, resume as a user would, and check the
exactly-once invariants after every sweep.

    python -m benchmarks.faults --kills 30 [--seed S] [--targets driver,worker,server,outage] [--stacks 1,2]

Each sweep is a fresh ``gce-sweep run`` of a small spec, as a process, on the embedded server (no
MLFLOW_TRACKING_URI: what a new user gets). A kill lands at a moment drawn uniformly from [0, T) of the
killed command's life, T measured by an unkilled calibration run; a sweep takes up to ``--per-sweep`` kills
(driver kills hit the first ``run`` or a later ``resume``), then ``gce-sweep resume`` runs it to the end.
Invariants, after each sweep: one parent and one child run per trial, all FINISHED; every per-epoch metric
exactly once per epoch; the final metrics on every child, once; no RUNNING run in the experiment; no
process of the sweep's Ray sessions left; no traceback in anything the commands printed. The seed is
printed first, so that a failure replays.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# "outage": the embedded server killed, then the driver a few seconds later, while trials still hold metrics
# they could not send: what a restored trial's checkpoint ledger must deliver.
TARGETS = ("driver", "worker", "server", "outage")
EPOCHS = 3
SPEC = {
    "name": "faults", "experiment": "gce-faults", "description": "fault campaign",
    "base": {"data": {"dataset": "mnist5k", "limit": 1024}, "model": {"name": "lenet5"},
             "optim": {"name": "adam", "lr": 2e-3}, "epochs": EPOCHS, "batch_size": 64, "max_batches": 12},
    "space": {"loss.name": ["ce", "gce", "cot"]},
    "evaluation": {"max_examples": 64, "plots": True,
                   "attacks": [{"name": "fgsm", "eps": [0.1, 0.3]}, {"name": "pgd", "eps": [0.3], "steps": 5}]},
    "resources": {"cpu": 1}, "max_concurrent_trials": 2,
    "max_failures": 2,  # a killed worker is retried by the running driver, from its last checkpoint
}
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|Exception ignored in")


@dataclass
class Kill:
    sweep: int
    target: str
    command: str  # run | resume
    moment_s: float
    phase: str = "missed"  # where the command was when the kill landed (missed: it had already ended)


@dataclass
class Campaign:
    seed: int
    kills: list[Kill] = field(default_factory=list)
    sweeps: int = 0
    violations: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        landed = [k for k in self.kills if k.phase != "missed"]
        return {"seed": self.seed, "sweeps": self.sweeps, "kills": len(landed), "missed": len(self.kills) - len(landed),
                "by target": dict(Counter(k.target for k in landed)),
                "by phase": dict(Counter(f"{k.command}/{k.phase}" for k in landed)),
                "violations": len(self.violations)}


class Sandbox:
    """One campaign's folders and environment: the embedded server and Ray results under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.spec = root / "faults.yaml"
        self.spec.write_text(yaml.safe_dump(SPEC))
        self.tracking = root / "mlflow"
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
        self.env = env | {"GCE_TRACKING_DIR": str(self.tracking), "RAY_AUTH_MODE": "disabled", "COLUMNS": "200",
                          "GCE_TRACKING_MAX_OUTAGE_S": "120"}

    def spec_for(self, sweep: int, stack: int) -> Path:
        """The spec of one sweep: the campaign's, its trials in stacks of ``stack`` (1: unstacked)."""
        if stack == 1:
            return self.spec
        path = self.root / f"faults-{sweep}.yaml"
        path.write_text(yaml.safe_dump({**SPEC, "resources": {**SPEC["resources"], "stack": stack}}))
        return path

    def spec_of(self, sweep: int) -> Path:
        path = self.root / f"faults-{sweep}.yaml"
        return path if path.exists() else self.spec

    def results(self, sweep: int) -> Path:
        return self.root / f"ray_results_{sweep}"

    def start(self, args: list[str], sweep: int, log: Path) -> subprocess.Popen:
        env = self.env | {"GCE_RAY_RESULTS": str(self.results(sweep))}
        with log.open("ab") as out:  # the child keeps its own copy of the descriptor
            return subprocess.Popen([sys.executable, "-m", "sweeps.cli", *args], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root)

    def sweep_id(self, sweep: int) -> str | None:
        found = [p.name for p in self.results(sweep).glob("*") if (p / "gce_sweep.json").exists()]
        return found[0] if found else None


def phase_of(log: Path, command: str, results: Path) -> str:
    """Where a command stood, from what it had printed and what its trials had reported to Tune: launch, ray+tune
    start, training (some trial mid-epochs), evaluation (every running trial past its last epoch), shutdown."""
    text = log.read_text(errors="replace") if log.exists() else ""
    started = "resuming sweep" in text if command == "resume" else "MLflow UI:" in text
    if not started:
        return "launch"
    if "start  " not in text:
        return "ray+tune start"
    counts = re.findall(r"\[(\d+)/(\d+)\]", text)
    if counts and counts[-1][0] == counts[-1][1]:
        return "shutdown"
    reports = [len(p.read_text().splitlines()) for p in results.glob("*/*/result.json")]
    return "evaluation" if EPOCHS in reports and all(n >= EPOCHS for n in reports) else "training"


def descendants(pid: int) -> list[int]:
    table = [line.split()[:2] for line in subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True,
                                                         text=True).stdout.splitlines()]
    children: dict[int, list[int]] = {}
    for child, parent in table:
        children.setdefault(int(parent), []).append(int(child))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def trial_workers(driver: int) -> list[int]:
    """The driver's Ray processes that run a trial (Ray titles them ``ray::ImplicitFunc.train``)."""
    pids = []
    for pid in descendants(driver):
        with contextlib.suppress(OSError):
            if b"ImplicitFunc" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
    return pids


def kill(target: str, proc: subprocess.Popen, sandbox: Sandbox, rng: random.Random) -> bool:
    """Deliver one kill; False when there was nothing to kill (e.g. no trial running at that moment)."""
    if target == "driver":
        proc.send_signal(signal.SIGKILL)
        return True
    if target == "outage":
        if not kill("server", proc, sandbox, rng):
            return False
        time.sleep(rng.uniform(0.5, 4.0))
        proc.send_signal(signal.SIGKILL)
        return True
    if target == "worker":
        workers = trial_workers(proc.pid)
        if not workers:
            return False
        os.kill(rng.choice(workers), signal.SIGKILL)
        return True
    state = sandbox.tracking / "server.json"
    try:
        pid = json.loads(state.read_text())["pid"]
        os.killpg(pid, signal.SIGKILL)
    except (OSError, ValueError, KeyError):
        return False
    return True


def run_command(sandbox: Sandbox, args: list[str], sweep: int, log: Path, kill_plan: Kill | None,
                rng: random.Random, timeout: float = 900) -> int:
    """Run a CLI command; with a kill plan, deliver it at the planned moment (or as soon as a target exists)."""
    proc = sandbox.start(args, sweep, log)
    start = time.monotonic()
    try:
        if kill_plan is not None:
            while time.monotonic() - start < kill_plan.moment_s and proc.poll() is None:
                time.sleep(0.05)
            while proc.poll() is None:
                phase = phase_of(log, kill_plan.command, sandbox.results(sweep))
                if kill(kill_plan.target, proc, sandbox, rng):
                    kill_plan.phase = phase
                    break
                time.sleep(0.2)  # no trial worker yet: the next one that appears is hit
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def check(sandbox: Sandbox, sweep: int, logs: list[Path]) -> list[str]:
    """The invariants of one sweep; each violation as a line."""
    from mlflow import MlflowClient

    from gce.metrics import EPOCH
    from sweeps.loading import load_spec
    from sweeps.runtime import SESSIONS_FILE, _holding
    from sweeps.validate import expected_metrics
    from tracking.logger import ROLE_TAG, SWEEP_TAG, TRIAL_TAG
    from tracking.server import ensure_server

    problems = []
    sweep_id = sandbox.sweep_id(sweep)
    spec = load_spec(sandbox.spec_of(sweep))
    if sweep_id is None:
        return [f"sweep {sweep}: no sweep record at the end"]
    server = ensure_server(sandbox.tracking)  # as a user opening the UI would, if the last kill took it down
    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name(spec.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep_id}'")
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    children = [r for r in runs if r.data.tags.get(ROLE_TAG) == "trial"]
    if len(parents) != 1 or parents[0].info.status != "FINISHED":
        problems.append(f"{sweep_id}: parents {[p.info.status for p in parents]} (want one FINISHED)")
    trials = Counter(r.data.tags.get(TRIAL_TAG) for r in children)
    if len(trials) != spec.trial_count() or set(trials.values()) != {1}:
        problems.append(f"{sweep_id}: child runs per trial {dict(trials)} (want {spec.trial_count()} trials, once)")
    final = expected_metrics(spec).exact - set(EPOCH)
    for run in children:
        rid = run.info.run_id[:8]
        if run.info.status != "FINISHED":
            problems.append(f"{sweep_id}: trial run {rid} is {run.info.status}")
        for key in EPOCH:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            if sorted(steps) != list(range(1, EPOCHS + 1)):
                problems.append(f"{sweep_id}: run {rid} {key} at steps {sorted(steps)} (want 1..{EPOCHS} once)")
        missing = final - set(run.data.metrics)
        if missing:
            problems.append(f"{sweep_id}: run {rid} lacks final metrics {sorted(missing)[:5]}")
        for key in ("time/trial_s", "val/robust_acc/worst_case"):
            points = client.get_metric_history(run.info.run_id, key)
            if len(points) != 1:
                problems.append(f"{sweep_id}: run {rid} {key} stored {len(points)} times")
        contexts = sorted(t.value for i in run.inputs.dataset_inputs for t in i.tags)
        if contexts != ["test", "train", "validation"]:  # its data lineage, once per split
            problems.append(f"{sweep_id}: run {rid} dataset inputs {contexts} (want train, validation, test once)")
    running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    if running:
        problems.append(f"{sweep_id}: {len(running)} run(s) left RUNNING in the experiment")
    sessions_file = sandbox.results(sweep) / sweep_id / SESSIONS_FILE
    sessions = json.loads(sessions_file.read_text()) if sessions_file.exists() else []
    time.sleep(2)  # the last driver's own shutdown
    left = [pid for s in sessions for pid in _holding(s["session_dir"])]
    if left:
        problems.append(f"{sweep_id}: Ray processes left behind: {left}")
    for log in logs:
        text = log.read_text(errors="replace")
        if TRACEBACK.search(text):
            snippet = text[TRACEBACK.search(text).start():][:400]
            problems.append(f"{sweep_id}: a traceback reached the console of {log.name}: {snippet!r}")
    return problems


def calibrate(sandbox: Sandbox) -> float:
    """Seconds an unkilled `run` of the spec takes (and its invariants, as sweep 0)."""
    log = sandbox.root / "sweep0-run.log"
    start = time.monotonic()
    rc = run_command(sandbox, ["run", str(sandbox.spec)], 0, log, None, random.Random(0))
    seconds = time.monotonic() - start
    if rc != 0:
        raise RuntimeError(f"the calibration sweep failed (exit {rc}); see {log}")
    return seconds


def campaign(kills: int, seed: int, root: Path, targets=TARGETS, per_sweep: int = 2, say=print,
             max_sweeps: int | None = None, stacks: tuple[int, ...] = (1,)) -> Campaign:
    """Sweeps with random kills until ``kills`` have landed (or ``max_sweeps``, default 3 × kills, ran); the
    sweeps' trials in stacks of the sizes in ``stacks`` in turn, from the second (``resources.stack``; 1:
    unstacked), so that a campaign of two sweeps or more meets every size."""
    max_sweeps = max_sweeps or 3 * kills
    rng = random.Random(seed)
    sandbox = Sandbox(root)
    result = Campaign(seed)
    say(f"fault campaign: seed {seed}, {kills} kills of {', '.join(targets)} (replay: --seed {seed})")
    lives = [calibrate(sandbox)]

    def duration() -> float:  # the median life of an unkilled `run` (the first, cold one only until others ran)
        warm = sorted(lives[1:] or lives)
        return warm[len(warm) // 2]

    problems = check(sandbox, 0, [root / "sweep0-run.log"])
    result.violations += problems
    say(f"calibration sweep: {lives[0]:.1f} s, invariants: {problems or 'ok'}")
    sweep = 0
    while len([k for k in result.kills if k.phase != "missed"]) < kills and sweep < max_sweeps:
        sweep += 1
        logs, command = [], "run"
        stack = stacks[sweep % len(stacks)]  # in turn (not drawn): a short campaign meets every size
        spec = sandbox.spec_for(sweep, stack)
        for _ in range(rng.randint(1, per_sweep)):
            plan = Kill(sweep, rng.choice(targets), command, rng.uniform(0, duration()))
            log = root / f"sweep{sweep}-{len(logs)}-{command}.log"
            logs.append(log)
            args = ["run", str(spec)] if command == "run" else ["resume", sandbox.sweep_id(sweep)]
            started = time.monotonic()
            rc = run_command(sandbox, args, sweep, log, plan, rng)
            if plan.phase == "missed" and args[0] == "run":
                lives.append(time.monotonic() - started)  # a whole run: the moments' range follows what runs take
            result.kills.append(plan)
            say(f"  sweep {sweep}{f' (stacks of {stack})' if stack > 1 else ''}: kill {plan.target} at "
                f"{plan.moment_s:.1f} s of `{command}` -> {plan.phase} "
                f"(exit {rc})")
            if rc == 0:
                break  # the command ended by itself (the fault was survived, or came too late): nothing to resume
            command = "resume" if sandbox.sweep_id(sweep) else "run"
        # After a driver kill the user resumes, even if the sweep had printed its end: that resume must finish
        # the sweep without doing anything twice, and end what the dead driver's Ray left behind.
        killed_driver = any(k.sweep == sweep and k.target in ("driver", "outage") and k.phase != "missed"
                            for k in result.kills)
        if killed_driver or not _finished(logs[-1]):
            log = root / f"sweep{sweep}-final-resume.log"
            logs.append(log)
            args = ["resume", sandbox.sweep_id(sweep)] if sandbox.sweep_id(sweep) else ["run", str(spec)]
            rc = run_command(sandbox, args, sweep, log, None, rng)
            if rc != 0:
                result.violations.append(f"sweep {sweep}: the final `{args[0]}` exited {rc}; see {log}")
        problems = check(sandbox, sweep, logs)
        result.violations += problems
        result.sweeps = sweep
        say(f"  sweep {sweep}: invariants {problems or 'ok'}")
    say(f"summary: {json.dumps(result.summary())}")
    return result


def _finished(log: Path) -> bool:
    return bool(re.search(r"\d+ trial\(s\), 0 failed", log.read_text(errors="replace")))


def main(argv: list[str] | None = None) -> Campaign:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--per-sweep", type=int, default=2)
    parser.add_argument("--stacks", default="1,2", help="stack sizes of the sweeps in turn (1: unstacked)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a new temporary one)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    root = args.dir or Path(subprocess.check_output(["mktemp", "-d", "/tmp/gce-faults.XXXX"], text=True).strip())
    root.mkdir(parents=True, exist_ok=True)
    result = campaign(args.kills, seed, root, tuple(args.targets.split(",")), args.per_sweep,
                      stacks=tuple(int(k) for k in args.stacks.split(",")))
    from tracking.server import stop_server

    stop_server(root / "mlflow")
    for line in result.violations:
        print(f"VIOLATION {line}")
    return result


if __name__ == "__main__":
    sys.exit(1 if main().violations else 0)
