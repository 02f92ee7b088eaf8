"""Driver-side Tune callback that closes the trial runs the trainable could not close.

A trial's own code ends its MLflow run, except when its actor dies (OOM, node lost) or the scheduler stops it
between reports; the driver sees every trial end, so it closes what is still RUNNING — never left open. The
progress display, the driver's other callback, is ``sweeps.progress``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray.tune import Callback

from sweeps.record import SweepRecord

__all__ = ["CURRENT_TRACKING_ENV", "RunClosingCallback"]

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
        from sweeps.stacking import member_trial_ids

        for trial_id in member_trial_ids(trial):  # a stack's members each have their run
            run = self.logger.find_run(self.record.sweep_id, trial_id)
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


def __getattr__(name: str) -> Any:
    """``sweeps.callbacks.ProgressCallback``: where the progress display lived before ``sweeps.progress``. Tune
    pickles a sweep's callbacks by class path when the sweep starts (``tuner.pkl``), so resuming a sweep started
    before the move loads it from here. Lazy: ``sweeps.progress`` imports ``_why`` from this module."""
    if name == "ProgressCallback":
        from sweeps.progress import ProgressCallback

        return ProgressCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
