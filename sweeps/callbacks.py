"""Driver-side Tune callbacks: close trial runs the trainable could not close, and print live progress.

A trial's own code ends its MLflow run, except when its actor dies (OOM, node lost) or the scheduler stops it
between reports; the driver sees every trial end, so it closes what is still RUNNING — never left open.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ray.tune import Callback
from rich.console import Console

from sweeps.record import SweepRecord
from sweeps.search import describe, trial_assignment
from sweeps.spec import SweepSpec

__all__ = ["CURRENT_TRACKING_ENV", "ProgressCallback", "RunClosingCallback"]

#: Set by the driver: the tracking server the sweep logs to now (a resumed sweep's may have moved).
CURRENT_TRACKING_ENV = "GCE_SWEEP_TRACKING_URI"


class RunClosingCallback(Callback):
    def __init__(self, record: SweepRecord):
        self.record = record
        self._logger = None

    @property
    def logger(self):
        if self._logger is None:
            from tracking.logger import RunLogger

            self._logger = RunLogger(self._uri, self.record.experiment)
        return self._logger

    @property
    def _uri(self) -> str:
        return os.environ.get(CURRENT_TRACKING_ENV) or self.record.tracking_uri

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment state
        return {**self.__dict__, "_logger": None}

    def _close(self, trial, status: str, profile: bool = False, **kwargs: Any) -> None:
        run = self.logger.find_run(self.record.sweep_id, trial.trial_id)
        if run is not None and run.info.status == "RUNNING":
            result = trial.last_result or {}
            if profile:  # the trial's own profile up to its stop (the trial could not log it: it was stopped)
                times = {k: v for k, v in result.items() if k.startswith(("time/", "mem/"))}
                if times:
                    self.logger.log_metrics(run.info.run_id, times, step=int(result.get("epoch", 0)))
            self.logger.end_run(run.info.run_id, status, **kwargs)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        epoch = (trial.last_result or {}).get("epoch", "?")
        reason = f"stopped early by the {self.record.sweep_spec.scheduler.name} scheduler after epoch {epoch}"
        self._close(trial, "FINISHED", profile=True, stop_reason=reason)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        if "TrackingUnavailable" in _error_text(trial):  # the trial waited out the outage bound: not again here
            from tracking.connection import MAX_OUTAGE_ENV
            from tracking.delivery import outage_spent

            outage_spent(self._uri, float(os.environ[MAX_OUTAGE_ENV]))
        self._close(trial, "FAILED", error=f"trial {trial.trial_id} errored: {trial.error_file or 'see Ray logs'}")


class ProgressCallback(Callback):
    """One line per finished trial: counts (done / running / failed / stopped early) and the best so far."""

    def __init__(self, spec: SweepSpec, console: Console | None = None):
        self.spec = spec
        self.objectives = [(o.metric, o.mode) for o in spec.objectives]
        self.total = spec.trial_count()
        self.console = console or Console(soft_wrap=True)
        self.done = self.failed = self.stopped = 0
        self.best: tuple[float, str] | None = None

    def __getstate__(self) -> dict[str, Any]:  # a Console holds locks; a restored driver makes a new one
        return {k: v for k, v in self.__dict__.items() if k != "console"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, console=Console(soft_wrap=True))

    def _assignment(self, config: dict[str, Any]) -> str:
        return describe(*trial_assignment(config, self.spec))

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.console.print(f"[dim]start[/]  {trial.trial_id}  {self._assignment(trial.config)}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        result = trial.last_result or {}
        metric, mode = self.objectives[0]
        value = result.get(metric)
        if value is None:
            self.stopped += 1
            what = f"stopped early at epoch {result.get('epoch', '?')}"
        else:
            self.done += 1
            what = "  ".join(f"{m}={result.get(m, math.nan):.4f}" for m, _ in self.objectives)
            better = self.best is None or (value > self.best[0] if mode == "max" else value < self.best[0])
            if better:
                self.best = (value, f"{trial.trial_id} ({self._assignment(trial.config)})")
        self._line(trials, trial, f"{trial.trial_id}  {what}")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.console.print(f"[yellow]retry[/]  {trial.trial_id}  failed ({_why(trial)}); it continues from its "
                           "last checkpoint, in the same run")

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.failed += 1
        self._line(trials, trial, f"[red]{trial.trial_id} failed[/] ({_why(trial)}): {trial.error_file}")

    def _line(self, trials: list, trial, what: str) -> None:
        # The trial being reported is still RUNNING in Tune's list while its callbacks run.
        running = sum(1 for t in trials if t.status == "RUNNING" and t is not trial)
        metric, _ = self.objectives[0]
        best = f"best {metric}={self.best[0]:.4f} {self.best[1]}" if self.best else "best: none yet"
        self.console.print(f"[{self.done + self.failed + self.stopped}/{self.total}] done {self.done}, running "
                           f"{running}, failed {self.failed}, stopped early {self.stopped} | {what} | {best}")


def _error_text(trial) -> str:
    try:
        return Path(trial.error_file).read_text()
    except (OSError, TypeError):
        return ""


def _why(trial) -> str:
    """The error line of a trial's error file: what failed, without Ray's traceback."""
    lines = [line.strip() for line in _error_text(trial).splitlines()
             if line.strip() and not line.startswith("Failure #")]
    if not lines:
        return "see Ray's logs"
    errors = [line for line in lines if "Error" in line or "Exception" in line]
    if errors and errors[-1].startswith("raise "):  # a source line of the traceback, not the error itself
        errors = [line for line in errors if not line.startswith("raise ")]
    return (errors or lines)[-1][:200]
