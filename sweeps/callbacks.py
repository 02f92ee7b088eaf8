"""Driver-side Tune callbacks: close trial runs the trainable could not close, and print live progress.

A trial's own code ends its MLflow run, except when its actor dies (OOM, node lost) or the scheduler stops it
between reports; the driver sees every trial end, so it closes what is still RUNNING — never left open.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune import Callback
from rich.console import Console

from sweeps.record import SweepRecord
from sweeps.search import describe, trial_assignment
from sweeps.spec import SweepSpec

__all__ = ["ProgressCallback", "RunClosingCallback"]


class RunClosingCallback(Callback):
    def __init__(self, record: SweepRecord):
        self.record = record
        self._logger = None

    @property
    def logger(self):
        if self._logger is None:
            from tracking.logger import RunLogger

            self._logger = RunLogger(self.record.tracking_uri, self.record.experiment)
        return self._logger

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment state
        return {**self.__dict__, "_logger": None}

    def _close(self, trial, status: str, **kwargs: Any) -> None:
        run = self.logger.find_run(self.record.sweep_id, trial.trial_id)
        if run is not None and run.info.status == "RUNNING":
            self.logger.end_run(run.info.run_id, status, **kwargs)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        epoch = (trial.last_result or {}).get("epoch", "?")
        reason = f"stopped early by the {self.record.sweep_spec.scheduler.name} scheduler after epoch {epoch}"
        self._close(trial, "FINISHED", stop_reason=reason)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
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
        self._line(trials, f"{trial.trial_id}  {what}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.failed += 1
        self._line(trials, f"[red]{trial.trial_id} failed[/]: {trial.error_file}")

    def _line(self, trials: list, what: str) -> None:
        running = sum(1 for t in trials if t.status == "RUNNING")
        metric, _ = self.objectives[0]
        best = f"best {metric}={self.best[0]:.4f} {self.best[1]}" if self.best else "best: none yet"
        self.console.print(f"[{self.done + self.failed + self.stopped}/{self.total}] done {self.done}, running "
                           f"{running}, failed {self.failed}, stopped early {self.stopped} | {what} | {best}")

