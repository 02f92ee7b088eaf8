"""MLflow tracking: the server (embedded default and docker stack), run logging and queries.

The only package that imports mlflow, and only where it must: names are re-exported lazily, so that
``import tracking.server`` (the CLI finding a running server) does not pay for importing MLflow.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RunLogger": "tracking.logger",
    "metric_key": "tracking.logger",
    "spec_hash": "tracking.logger",
    "TrackingUnavailable": "tracking.connection",
    "TrackingAuthError": "tracking.connection",
    "configure_client": "tracking.connection",
    "check_server": "tracking.connection",
    "resolve_tracking": "tracking.connection",
    "server_command": "tracking.server",
    "ensure_server": "tracking.server",
    "stop_server": "tracking.server",
    "best_runs": "tracking.queries",
    "compare_runs": "tracking.queries",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tracking' has no attribute {name!r}")
