"""Delivery of run data to a tracking server that may go away (restarted, redeployed, network).

Metrics, params and tags are queued and sent in order; a call that fails for want of the server leaves them
queued and returns, so the trial keeps training, and the queue is retried (with back-off) on the next call and
before anything that depends on it (ending a run, artifacts, searches, which wait for the server themselves).
Nothing is dropped: the points arrive once the server is back, or, when it stays away longer than
``max_outage_s`` (``GCE_TRACKING_MAX_OUTAGE_S``, 300 s by default), a ``TrackingUnavailable`` names the server
and how much is not stored. Resending is safe: MLflow keeps one copy of a metric point (same key, value, step,
timestamp), and params and tags are idempotent.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable

import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tracking.connection import MAX_OUTAGE_ENV, TrackingUnavailable

# Server-side "try again" answers (SQLite's "database is locked" comes back as TEMPORARILY_UNAVAILABLE).
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
# What MLflow's http_request raises once its own retries are spent (refused, reset, timed out, 5xx after retries);
# an answer with an error status ("failed with error code 401") is not this.
_UNREACHED = re.compile(r"API request to \S+ failed with (timeout )?exception")
_MAX_BACKOFF_S = 10.0
# When each tracking server was first seen unreachable, shared by every Delivery of the process (a trial's and
# the driver's callbacks'), so that once one has waited out the bound the others fail at once, not again.
_DOWN_SINCE: dict[str, float] = {}
_DOWN_LOCK = threading.Lock()


class Delivery:
    """The outage queue of one ``client`` (of the server at ``tracking_uri``): ``send`` queues run data and
    sends what it can, ``call`` runs anything else once the queue is delivered, both retried up to
    ``max_outage_s`` (default $GCE_TRACKING_MAX_OUTAGE_S)."""

    def __init__(self, client: MlflowClient, tracking_uri: str, max_outage_s: float | None = None):
        self.client = client
        self.tracking_uri = tracking_uri
        self.max_outage_s = float(os.environ[MAX_OUTAGE_ENV] if max_outage_s is None else max_outage_s)
        self._pending: deque[tuple[str, str, list]] = deque()  # (run id, "metrics" | "params" | "tags", items)
        self._lock = threading.RLock()
        self._next_try = 0.0
        self._backoff = 1.0
        self.retries = 0  # failed attempts that were retried (an outage, a locked database)

    def send(self, run_id: str, kind: str, items: list, chunk: int) -> None:
        """Queue ``items`` ("metrics", "params" or "tags") in ``log_batch`` calls of ``chunk``, and send what the
        back-off allows now."""
        with self._lock:
            self._pending.extend((run_id, kind, items[i:i + chunk]) for i in range(0, len(items), chunk))
        self._flush(block=False)

    def flush(self) -> None:
        """Send everything queued, waiting for the server up to ``max_outage_s`` (TrackingUnavailable after)."""
        self._flush(block=True)

    @property
    def pending(self) -> dict[str, int]:
        """What is queued and not yet stored: metric points, params and tags."""
        with self._lock:
            counts = {"metrics": 0, "params": 0, "tags": 0}
            for _, kind, items in self._pending:
                counts[kind] += len(items)
            return counts

    def call(self, fn: Callable, *args, **kwargs):
        """``fn(*args)`` once the queue is delivered (a run ends after its last metrics), retried while the
        server is unreachable, up to the bound."""
        self._flush(block=True)
        with self._lock:
            while True:
                try:
                    result = fn(*args, **kwargs)
                except Exception as err:
                    if not _transient(err):
                        raise
                    time.sleep(self._failed(err))
                else:
                    self._recovered()
                    return result

    def _flush(self, block: bool) -> None:
        """Send the queue in order. Without ``block``, a failed attempt leaves the rest queued and returns (the
        next try waits for the back-off); with it, waits for the server. Past the bound: TrackingUnavailable."""
        with self._lock:
            while self._pending:
                if not block and time.monotonic() < self._next_try:
                    return
                run_id, kind, items = self._pending[0]
                try:
                    self.client.log_batch(run_id, **{kind: items})
                except Exception as err:
                    if not _transient(err):
                        self._pending.popleft()  # refused, not lost in transit: resending cannot help
                        raise
                    wait = self._failed(err)
                    if not block:
                        return
                    time.sleep(wait)
                else:
                    self._pending.popleft()
                    self._recovered()

    def _failed(self, err: Exception) -> float:
        """Note a failed attempt; the seconds to wait before the next, or TrackingUnavailable past the bound."""
        now = time.monotonic()
        with _DOWN_LOCK:
            since = _DOWN_SINCE.setdefault(self.tracking_uri, now)
        waited = now - since
        if waited >= self.max_outage_s:
            pending = self.pending
            runs = sorted({run_id for run_id, _, _ in self._pending})
            raise TrackingUnavailable(
                f"MLflow tracking server {self.tracking_uri} unreachable for {waited:.0f} s (the limit is "
                f"{self.max_outage_s:g} s, {MAX_OUTAGE_ENV}); not stored: {pending['metrics']} metric point(s), "
                f"{pending['params']} param(s), {pending['tags']} tag(s) of run(s) {', '.join(runs) or '-'}; "
                f"last error: {_first_line(err)}") from err
        self.retries += 1
        wait = min(self._backoff, self.max_outage_s - waited)
        self._backoff = min(self._backoff * 2, _MAX_BACKOFF_S)
        self._next_try = now + wait
        return max(wait, 0.0)

    def _recovered(self) -> None:
        self._backoff, self._next_try = 1.0, 0.0
        if self.tracking_uri in _DOWN_SINCE:
            with _DOWN_LOCK:
                _DOWN_SINCE.pop(self.tracking_uri, None)


def outage_spent(tracking_uri: str, max_outage_s: float) -> None:
    """Record that another process (a trial) already waited out the bound for ``tracking_uri``: this process's
    next failed call raises at once instead of waiting the whole bound a second time."""
    with _DOWN_LOCK:
        _DOWN_SINCE[tracking_uri] = time.monotonic() - max_outage_s


def _transient(err: BaseException) -> bool:
    """A failure that resending can cure: the server unreachable or timing out (MLflow wraps these after its
    own retries), a 5xx, or a server-side "try again" (a locked SQLite database)."""
    if isinstance(err, requests.ConnectionError | requests.Timeout):
        return True
    if isinstance(err, requests.HTTPError):
        return err.response is not None and err.response.status_code >= 500
    if isinstance(err, MlflowException):
        text = str(err)
        return err.error_code in _TRANSIENT_CODES or "database is locked" in text or bool(_UNREACHED.match(text))
    return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


__all__ = ["Delivery"]
