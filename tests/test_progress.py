"""ProgressCallback driven by hand: fake trials through Tune's hooks, a fake clock, a console into a string."""

from __future__ import annotations

import io
import pickle
import re
import sys
from types import SimpleNamespace

import pytest
from rich.console import Console

from sweeps.loading import load_spec
from sweeps.progress import PROGRESS_EVERY_ENV, ProgressCallback

OBJECTIVE = "val/robust_acc/worst_case"


class Clock:
    """A clock the test moves; a class (not a lambda) so the callback still pickles with it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def spec():
    # With an attack the objective defaults to the worst-case robust accuracy.
    return load_spec({"name": "prog", "experiment": "test-prog", "base": {"epochs": 4},
                      "space": {"loss.name": ["ce", "cot", "gce"]},
                      "evaluation": {"attacks": [{"name": "fgsm", "eps": [0.1]}]}})


def trial(trial_id: str, loss: str, status: str = "RUNNING", **result):
    return SimpleNamespace(trial_id=trial_id, status=status, config={"point": {"loss.name": loss}, "seed": 0},
                           last_result=result or None, error_file=None)


def make(spec, terminal: bool, **kwargs):
    out = io.StringIO()
    # A terminal without colours: the panel's text stays searchable between the cursor moves.
    console = Console(file=out, force_terminal=terminal, width=200, soft_wrap=True,
                      **({"color_system": None} if terminal else {}))
    clock = Clock()
    return ProgressCallback(spec, console, clock=clock, **kwargs), out, clock


def report(cb, t, **result) -> None:
    t.last_result = {**(t.last_result or {}), **result}
    cb.on_trial_result(0, [], t, dict(t.last_result))


def status_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"\[\d\d:\d\d:\d\d\] ", line)]


def test_plain_mode_prints_a_status_line_every_period_with_epochs_eta_and_best(spec, tmp_path):
    cb, out, clock = make(spec, terminal=False, every_s=30)
    a, b, c = trial("t_a", "ce"), trial("t_b", "cot"), trial("t_c", "gce", status="PENDING")
    trials = [a, b, c]
    for t in (a, b):
        cb.on_trial_start(0, trials, t)
    report(cb, a, epoch=1, **{"val/clean_acc": 0.9125, "train/loss": 0.31})
    report(cb, b, epoch=2, **{"train/loss": 0.5})  # no validation metric: the loss is what it shows
    clock.now += 10
    cb.on_step_end(1, trials)
    assert status_lines(out.getvalue()) == []  # not before the period

    clock.now += 25
    cb.on_step_end(2, trials)
    [line] = status_lines(out.getvalue())
    assert "0/3 ended (done 0, stopped early 0, failed 0), 2 running" in line
    assert "t_a epoch 1/4 val/clean_acc=0.9125" in line and "t_b epoch 2/4 train/loss=0.5000" in line
    assert "evaluating" not in line
    assert "1 pending" in line and "elapsed 35s" in line and "ETA –" in line and "best: none yet" in line

    # t_a ends at 60 s with its objective; t_c starts in its slot.
    clock.now = 1060.0
    report(cb, a, epoch=4, **{OBJECTIVE: 0.42})
    cb.on_trial_complete(3, trials, a)
    a.status, c.status = "TERMINATED", "RUNNING"
    cb.on_trial_start(3, trials, c)
    assert "[1/3] done 1, running 1, failed 0, stopped early 0 | t_a  val/robust_acc/worst_case=0.4200 | best " \
           "val/robust_acc/worst_case=0.4200 t_a (loss.name=ce, seed=0)" in out.getvalue()

    clock.now = 1100.0
    report(cb, b, epoch=4, **{"val/clean_acc": 0.95})  # its last epoch: the robust evaluation runs now
    cb.on_step_end(4, trials)
    line = status_lines(out.getvalue())[-1]
    assert "1/3 ended (done 1, stopped early 0, failed 0), 2 running" in line and "0 pending" in line
    assert "t_b epoch 4/4 evaluating val/clean_acc=0.9500" in line
    assert "t_a" not in line.split("|")[0]  # no longer listed as running
    # Mean 60 s; t_b (100 s old) is due, t_c (40 s old) has 20 s left, over the 2 seen running at once.
    assert "elapsed 1m40s, ETA 10s" in line
    assert "best val/robust_acc/worst_case=0.4200 t_a (loss.name=ce, seed=0)" in line

    error = tmp_path / "error.txt"
    error.write_text("Failure # 1\nTraceback ...\nValueError: boom\n")
    b.error_file = str(error)
    cb.on_trial_error(5, trials, b)
    b.status = "ERROR"
    c.last_result = {"epoch": 1}
    cb.on_trial_complete(6, trials, c)
    c.status = "TERMINATED"
    text = out.getvalue()
    assert "t_b failed (ValueError: boom)" in text and "t_c  stopped early at epoch 1" in text
    assert "[3/3] done 1, running 0, failed 1, stopped early 1" in text
    clock.now += 30
    cb.on_step_end(7, trials)
    assert "3/3 ended (done 1, stopped early 1, failed 1), 0 running, 0 pending" in status_lines(out.getvalue())[-1]
    cb.on_experiment_end(trials)
    assert "\x1b" not in out.getvalue()  # no ANSI when stdout is not a terminal


def test_the_period_comes_from_the_environment(spec, monkeypatch):
    monkeypatch.setenv(PROGRESS_EVERY_ENV, "5")
    assert make(spec, terminal=False)[0].every_s == 5
    monkeypatch.setenv(PROGRESS_EVERY_ENV, "soon")
    assert make(spec, terminal=False)[0].every_s == 30


def test_live_mode_renders_a_panel_with_running_trials_and_counts(spec):
    cb, out, clock = make(spec, terminal=True, refresh_s=1)
    a, b = trial("t_a", "ce"), trial("t_b", "gce", status="PENDING")
    trials = [a, b, trial("t_c", "cot", status="PENDING")]
    stdout = sys.stdout
    try:
        cb.on_trial_start(0, trials, a)
        cb.on_step_end(1, trials)  # starts the panel
        assert cb._live is not None and "1 running" in out.getvalue()
        b.status = "RUNNING"
        cb.on_trial_start(1, trials, b)
        report(cb, a, epoch=3, **{"val/clean_acc": 0.9712})
        clock.now += 0.5
        cb.on_step_end(2, trials)
        assert "t_b" not in out.getvalue().split("start  t_b")[-1]  # throttled: not redrawn yet
        clock.now += 1
        cb.on_step_end(3, trials)
        panel = out.getvalue().split("start  t_b")[-1]  # the event line is printed above the panel
        assert "sweep prog" in panel and "0/3 ended" in panel and "2 running" in panel and "1 pending" in panel
        assert re.search(r"t_a\s+loss\.name=ce, seed=0\s+3/4\s+val/clean_acc=0\.9712", panel)
        assert re.search(r"t_b\s+loss\.name=gce, seed=0\s+\?/4", panel) and "ETA –" in panel
        a.last_result[OBJECTIVE] = 0.5
        cb.on_trial_complete(4, trials, a)
        a.status = "TERMINATED"
    finally:
        cb.on_experiment_end(trials)
    assert cb._live is None and sys.stdout is stdout  # stopped, stdout given back
    final = out.getvalue().split("[1/3] done 1")[-1]
    assert "1/3 ended" in final and "best val/robust_acc/worst_case=0.5000 t_a" in final


def test_a_display_that_fails_falls_back_to_plain_lines_and_never_raises(spec, monkeypatch):
    cb, out, clock = make(spec, terminal=True, every_s=30)
    a = trial("t_a", "ce")
    cb.on_trial_start(0, [a], a)
    monkeypatch.setattr(ProgressCallback, "panel", lambda self: 1 / 0)
    cb.on_step_end(1, [a])  # the panel cannot render: no exception into Tune's loop
    assert cb._live is None and cb._plain
    clock.now += 31
    cb.on_step_end(2, [a])
    assert "0/3 ended" in status_lines(out.getvalue())[-1]
    broken = SimpleNamespace(trial_id="t_x", status="RUNNING", config=None, last_result=None, error_file=None)
    cb.on_trial_start(3, [a, broken], broken)  # a trial it cannot describe: nothing raised either


def test_pickled_mid_sweep_it_resumes_counts_and_still_prints(spec, capsys):
    cb, out, clock = make(spec, terminal=True)
    a, b = trial("t_a", "ce"), trial("t_b", "cot")
    trials = [a, b]
    try:
        for t in trials:
            cb.on_trial_start(0, trials, t)
        cb.on_step_end(1, trials)  # a live panel is up: it must not be pickled
        report(cb, a, epoch=4, **{OBJECTIVE: 0.3})
        cb.on_trial_complete(2, trials, a)
        a.status = "TERMINATED"
        report(cb, b, epoch=2, **{"val/clean_acc": 0.8})
        clock.now += 90
        restored = pickle.loads(pickle.dumps(cb))
    finally:
        cb.on_experiment_end(trials)
    restored._clock.now += 30  # the restored driver's clock runs on
    assert (restored.done, restored.total, restored._live) == (1, 3, None)
    restored.on_step_end(3, trials)  # plain now: pytest's stdout is no terminal
    c = trial("t_c", "gce")
    restored.on_trial_start(4, trials + [c], c)
    b.last_result = {"epoch": 4}
    restored.on_trial_complete(5, trials + [c], b)
    printed = capsys.readouterr().out
    line = status_lines(printed)[0]
    assert "1/3 ended" in line and "t_b epoch 2/4 val/clean_acc=0.8000" in line and "elapsed 2m00s" in line
    assert "start  t_c" in printed and "[2/3] done 1, running 1, failed 0, stopped early 1" in printed
    assert "best val/robust_acc/worst_case=0.3000 t_a" in printed


def test_a_restored_driver_counts_the_trials_that_ended_before_it(spec):
    cb, out, clock = make(spec, terminal=False, every_s=1)
    trials = [trial("t_a", "ce", status="TERMINATED", epoch=4, **{OBJECTIVE: 0.25}),
              trial("t_b", "cot", status="ERROR", epoch=1),
              trial("t_c", "gce", epoch=2, **{"val/clean_acc": 0.7})]
    clock.now += 1
    cb.on_step_end(1, trials)
    cb.on_step_end(2, trials)  # seen twice, counted once
    clock.now += 1
    cb.on_step_end(3, trials)
    line = status_lines(out.getvalue())[-1]
    assert "2/3 ended (done 1, stopped early 0, failed 1), 1 running (t_c epoch 2/4 val/clean_acc=0.7000)" in line
    assert "best val/robust_acc/worst_case=0.2500 t_a" in line


def test_a_callback_pickled_under_its_old_path_sweeps_callbacks_still_loads(spec):
    """Tune pickles a sweep's callbacks by class path when it starts (tuner.pkl): a sweep started before the display
    moved to sweeps.progress names sweeps.callbacks.ProgressCallback, and must still resume."""
    cb, _, _ = make(spec, terminal=False)
    new = pickle.dumps(cb, protocol=2)  # protocol 2 names a class as "c<module>\n<name>\n": easy to rewrite
    assert b"csweeps.progress\nProgressCallback\n" in new
    old = new.replace(b"csweeps.progress\nProgressCallback\n", b"csweeps.callbacks\nProgressCallback\n")
    restored = pickle.loads(old)
    assert isinstance(restored, ProgressCallback) and restored.total == 3


def test_a_trial_whose_objective_is_nan_is_done_but_never_the_best(spec):
    cb, out, _ = make(spec, terminal=False)
    a, b = trial("t_a", "ce", epoch=4, **{OBJECTIVE: float("nan")}), trial("t_b", "gce", epoch=4, **{OBJECTIVE: 0.4})
    for t in (a, b):
        cb.on_trial_start(0, [a, b], t)
        cb.on_trial_complete(1, [a, b], t)
    assert cb.done == 2 and cb.best[0] == 0.4
    assert "best val/robust_acc/worst_case=0.4000 t_b" in out.getvalue().splitlines()[-1]
