"""Live progress of a sweep in the driver: a line per trial event, and between events a live panel (a terminal)
or a plain status line every few seconds (CI, nohup), so that a long study is never silent.

A Tune callback like ``sweeps.callbacks.RunClosingCallback``, kept apart because it only shows: nothing here may
stop a sweep. Tune pickles its callbacks (``tuner.pkl``) by class path; ``sweeps.callbacks`` still resolves
``ProgressCallback`` for sweeps started before this module existed.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback
from rich.console import Console

from sweeps.callbacks import _why
from sweeps.search import assignment_text, describe, trial_assignment
from sweeps.spec import SweepSpec

__all__ = ["PROGRESS_EVERY_ENV", "ProgressCallback"]

#: Seconds between plain status lines when stdout is not a terminal (default 30).
PROGRESS_EVERY_ENV = "GCE_PROGRESS_EVERY_S"


def _guarded(hook: Callable[..., None]) -> Callable[..., None]:
    """A progress hook that cannot raise into Tune's loop: a display must not end a 10-hour sweep."""

    @functools.wraps(hook)
    def safe(self, *args: Any, **kwargs: Any) -> None:
        try:
            hook(self, *args, **kwargs)
        except Exception:
            self._failed(hook.__name__)

    return safe


class ProgressCallback(Callback):
    """What the sweep is doing, in the driver: a line per trial event, and between events either a live panel
    (a terminal) or a plain status line every ``every_s`` seconds (CI, nohup), so a long study is never silent.

    Nothing it shows may stop a sweep: every hook is guarded, and a panel that fails to render falls back to
    plain lines. Times come from ``clock`` (injectable for tests); elapsed time survives pickling.
    """

    def __init__(self, spec: SweepSpec, console: Console | None = None, *, every_s: float | None = None,
                 refresh_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.spec = spec
        self.objectives = [(o.metric, o.mode) for o in spec.objectives]
        self.total = spec.ray_trial_count()  # Ray trials: a stack of trials counts once
        self.console = console or Console(soft_wrap=True)
        self.done = self.failed = self.stopped = 0
        self.best: tuple[float, str] | None = None
        self.every_s = every_s if every_s is not None else _env_seconds(PROGRESS_EVERY_ENV, 30.0)
        self.refresh_s = refresh_s
        self._clock = clock
        self._t0 = clock()
        self._last_shown = self._t0
        self._running: dict[str, _TrialView] = {}
        self._ended: set[str] = set()
        self._durations: list[float] = []  # of trials that ran to their end (done or stopped early)
        self._peak = 0  # most trials seen running at once: the sweep's concurrency, for the ETA
        self._live = None
        self._plain = False  # set when the panel failed: plain lines from then on

    def __getstate__(self) -> dict[str, Any]:
        # A Console holds locks and a Live a terminal: a restored driver makes new ones. Clock readings become
        # ages, since a restored driver's clock starts elsewhere.
        now = self._clock()
        state = {k: v for k, v in self.__dict__.items() if k not in ("console", "_live")}
        state["_t0"] = now - self._t0
        state["_running"] = {k: dataclasses.replace(v, started=now - v.started) for k, v in self._running.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, console=Console(soft_wrap=True), _live=None)
        now = self._clock()
        self._t0 = self._last_shown = now - state["_t0"]
        self._running = {k: dataclasses.replace(v, started=now - v.started) for k, v in state["_running"].items()}

    def _assignment(self, config: dict[str, Any]) -> str:
        return assignment_text(config, self.spec)

    # --- events: one line each, above the panel when there is one -----------------------------------------
    @_guarded
    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._view(trial)
        self.console.print(f"[dim]start[/]  {trial.trial_id}  {self._assignment(trial.config)}")

    @_guarded
    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        self._view(trial).update(result, self._shown_metric(result))

    @_guarded
    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        view = self._end(trial)
        if view is not None:
            self._durations.append(self._clock() - view.started)
        self._count_ended(trial)
        result = trial.last_result or {}
        if result.get(self.objectives[0][0]) is None:
            what = f"stopped early at epoch {result.get('epoch', '?')}"
        else:
            what = "  ".join(f"{m}={_number(result.get(m))}" for m, _ in self.objectives)
        self._line(trials, trial, f"{trial.trial_id}  {what}")

    @_guarded
    def on_trial_recover(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.console.print(f"[yellow]retry[/]  {trial.trial_id}  failed ({_why(trial)}); it continues from its "
                           "last checkpoint, in the same run")

    @_guarded
    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._end(trial)
        self._count_ended(trial, failed=True)
        self._line(trials, trial, f"[red]{trial.trial_id} failed[/] ({_why(trial)}): {trial.error_file}")

    def _line(self, trials: list, trial, what: str) -> None:
        # The trial being reported is still RUNNING in Tune's list while its callbacks run.
        running = sum(1 for t in trials if t.status == "RUNNING" and t is not trial)
        self.console.print(f"[{len(self._ended)}/{self.total}] done {self.done}, running {running}, failed "
                           f"{self.failed}, stopped early {self.stopped} | {what} | {self._best_text()}")

    # --- between events: the panel, or a status line -----------------------------------------------------
    @_guarded
    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """Called every loop of Tune's driver (about ten a second): shows at most every refresh_s / every_s."""
        self._sync(trials)
        now = self._clock()
        if self._live_mode():
            if self._live is None:
                self._start_live()
            elif now - self._last_shown >= self.refresh_s:
                self._last_shown = now
                self._live.update(self.panel(), refresh=True)
        elif now - self._last_shown >= self.every_s:
            self._last_shown = now
            self.console.print(self.status_line(), markup=False, highlight=False)

    @_guarded
    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._sync(trials)
        if self._live is not None:
            self._live.update(self.panel(), refresh=True)
        self._stop_live()

    def status_line(self) -> str:
        """One plain line: counts, each running trial's epoch and metric, elapsed time, ETA and the best."""
        running = "; ".join(f"{v.trial_id} epoch {v.epoch_text()}{v.metric_text(' ')}"
                            for v in self._running.values())
        ended = f"{len(self._ended)}/{self.total} ended (done {self.done}, stopped early {self.stopped}, " \
                f"failed {self.failed})"
        return (f"[{time.strftime('%H:%M:%S')}] {ended}, {len(self._running)} running"
                f"{f' ({running})' if running else ''}, {self._pending()} pending | elapsed "
                f"{_duration(self._elapsed())}, {self._eta_text()} | {self._best_text()}")

    def panel(self):
        """The live panel: counts and times, a row per running trial, the best so far."""
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        head = Text(f"{len(self._ended)}/{self.total} ended: done {self.done}, stopped early {self.stopped}, "
                    f"failed {self.failed} · {len(self._running)} running · {self._pending()} pending · elapsed "
                    f"{_duration(self._elapsed())} · {self._eta_text()}")
        table = Table(box=None, pad_edge=False, expand=False)
        for column, justify in (("trial", "left"), ("assignment", "left"), ("epoch", "right"),
                                ("latest", "left"), ("time", "right")):
            table.add_column(column, justify=justify, style="dim" if column == "time" else None)
        now = self._clock()
        for v in self._running.values():
            table.add_row(v.trial_id, v.assignment, v.epoch_text(), v.metric_text(), _duration(now - v.started))
        body = [head, table] if self._running else [head]
        return Panel(Group(*body, Text(self._best_text(), style="bold")), title=f"sweep {self.spec.name}",
                     title_align="left")

    # --- bookkeeping --------------------------------------------------------------------------------------
    def _view(self, trial) -> _TrialView:
        view = self._running.get(trial.trial_id)
        if view is None:
            view = _TrialView(trial.trial_id, self._assignment(trial.config), self._epochs(trial.config),
                              self._clock())
            if trial.last_result:  # a trial the driver restored mid-way: what it last reported
                view.update(trial.last_result, self._shown_metric(trial.last_result))
            self._running[trial.trial_id] = view
            self._peak = max(self._peak, len(self._running))
        return view

    def _end(self, trial) -> _TrialView | None:
        return self._running.pop(trial.trial_id, None)

    def _count_ended(self, trial, failed: bool = False) -> None:
        """Count a trial's end once (a restored driver's list holds ends it has not seen), and keep the best."""
        if trial.trial_id in self._ended:
            return
        self._ended.add(trial.trial_id)
        if failed:
            self.failed += 1
            return
        metric, mode = self.objectives[0]
        value = (trial.last_result or {}).get(metric)
        if value is None:
            self.stopped += 1
            return
        self.done += 1
        if not _finite(value):  # a diverged trial (NaN) is done, but a NaN best would never be beaten
            return
        if self.best is None or (value > self.best[0] if mode == "max" else value < self.best[0]):
            self.best = (value, self._best_label(trial))

    def _best_label(self, trial) -> str:
        """The trial and its assignment; of a stack, its best member's (the one its result reports)."""
        members = (trial.config or {}).get("members")
        if not members:
            return f"{trial.trial_id} ({self._assignment(trial.config)})"
        i = int((trial.last_result or {}).get("stack/best_member", 0))
        return f"{trial.trial_id}.{i} ({describe(members[i]['point'], members[i]['seed'])})"

    def _sync(self, trials: list) -> None:
        """Tune's list is the truth: trials a restored driver ended before, or runs without a start event."""
        for t in trials:
            if t.status == "RUNNING" and t.trial_id not in self._running and t.trial_id not in self._ended:
                self._view(t)
            elif t.status in ("TERMINATED", "ERROR") and t.trial_id not in self._ended:
                self._end(t)
                self._count_ended(t, failed=t.status == "ERROR")

    def _epochs(self, config: dict[str, Any]) -> int | None:
        try:
            return int(self.spec.trial_config(*trial_assignment(config, self.spec)).epochs)
        except Exception:  # a config the spec cannot rebuild: the base's epochs, if it names them
            epochs = self.spec.base.get("epochs")
            return int(epochs) if isinstance(epochs, int | float) else None

    def _shown_metric(self, result: dict[str, Any]) -> str | None:
        """The objective once a trial has it (its final report), else what per-epoch reports carry."""
        for key in (*(m for m, _ in self.objectives), self.spec.scheduler.metric, "val/clean_acc", "train/loss"):
            if isinstance(result.get(key), int | float):
                return key
        return None

    def _pending(self) -> int:
        return max(self.total - len(self._ended) - len(self._running), 0)

    def _elapsed(self) -> float:
        return self._clock() - self._t0

    def _eta_text(self) -> str:
        """Mean duration of the trials that ran to their end × the work left, over the concurrency seen."""
        if not self._durations:
            return "ETA –"
        mean = sum(self._durations) / len(self._durations)
        now = self._clock()
        left = self._pending() * mean + sum(max(mean - (now - v.started), 0.0) for v in self._running.values())
        return f"ETA {_duration(left / max(self._peak, 1))}"

    def _best_text(self) -> str:
        metric, _ = self.objectives[0]
        return f"best {metric}={self.best[0]:.4f} {self.best[1]}" if self.best else "best: none yet"

    # --- the live panel -----------------------------------------------------------------------------------
    def _live_mode(self) -> bool:
        return self.console.is_terminal and not self._plain

    def _start_live(self) -> None:
        from rich.live import Live

        # Not auto-refreshed: the driver's loop refreshes it, so no thread reads state while hooks change it.
        self._live = Live(self.panel(), console=self.console, auto_refresh=False, transient=False)
        self._live.start(refresh=True)
        atexit.register(self._stop_live)  # a driver that dies past Tune's cleanup still gets its cursor back

    def _stop_live(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            atexit.unregister(self._stop_live)
            live.stop()

    def _failed(self, hook: str) -> None:
        """A hook raised: log it once, and leave the panel for plain lines (the sweep goes on regardless)."""
        if not self._plain:
            logging.getLogger(__name__).warning("progress display failed in %s; plain lines from now on", hook,
                                                exc_info=True)
        self._plain = True
        with contextlib.suppress(Exception):
            self._stop_live()


@dataclasses.dataclass
class _TrialView:
    """What the progress display knows of a running trial: small, so it pickles with the callback."""

    trial_id: str
    assignment: str
    epochs: int | None
    started: float
    epoch: int | None = None
    metric: str | None = None
    value: float | None = None

    def update(self, result: dict[str, Any], metric: str | None) -> None:
        if isinstance(result.get("epoch"), int | float):
            self.epoch = int(result["epoch"])
        if metric is not None:
            self.metric, self.value = metric, float(result[metric])

    def epoch_text(self) -> str:
        """``3/20``; ``20/20 evaluating`` once the last epoch is in (the robust evaluation can take longer than
        the training did, so a trial sitting at its last epoch is not stuck)."""
        done = "?" if self.epoch is None else str(self.epoch)
        if self.epochs is None:
            return done
        return f"{done}/{self.epochs}" + (" evaluating" if self.epoch == self.epochs else "")

    def metric_text(self, sep: str = "") -> str:
        return "" if self.metric is None else f"{sep}{self.metric}={self.value:.4f}"


def _env_seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _number(value: Any) -> str:
    """A metric for a status line: 4 decimals, or as it is (None, a secondary objective not reported)."""
    return f"{value:.4f}" if isinstance(value, int | float) else str(value)


def _duration(seconds: float) -> str:
    """45s, 9m12s, 1h05m: as short as a status line needs."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
