"""Which tracking server to use, whether it answers, and how long the MLflow client may retry.

Stdlib only: checked before any trial starts, so a wrong URI fails in seconds with a message naming it rather
than after MLflow's default four minutes of retries inside every trial.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

# The one place the client is configured. MLflow's own retries are short (≈ 2-4 s of back-off for a refused
# connection, 30 s per request at most): tracking.logger.RunLogger retries on top of them for as long as
# GCE_TRACKING_MAX_OUTAGE_S allows (metric points buffered meanwhile, the trial training on), so one failed
# call returns within seconds instead of MLflow's default four minutes. Ending a run would otherwise fetch it
# again only to print its URL, and usage telemetry would call out from every trial. The launcher hands these
# to every trial, GCE_TRACKING_MAX_OUTAGE_S included.
MAX_OUTAGE_ENV = "GCE_TRACKING_MAX_OUTAGE_S"
CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    MAX_OUTAGE_ENV: "300",
}


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached or started."""


class TrackingAuthError(TrackingUnavailable):
    """The tracking server answered but refused our credentials."""


def configure_client(environ: dict | None = None) -> dict[str, str]:
    """Apply CLIENT_ENV to ``environ`` (os.environ by default) where the user has not set a value; return the
    effective settings so a launcher can hand the same ones to remote trials."""
    environ = os.environ if environ is None else environ
    for key, value in CLIENT_ENV.items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in CLIENT_ENV}


@dataclass(frozen=True)
class Resolved:
    """The tracking server to use, and the embedded server behind it when that is what was chosen."""

    uri: str
    server: Any = None  # tracking.server.ServerInfo of the embedded server, else None

    @property
    def embedded_root(self) -> str | None:
        return None if self.server is None else self.server.root


def resolve_tracking(uri: str | None = None, *, saved: str | None = None, root: str | None = None,
                     port: int | None = None, start: bool = True) -> Resolved:
    """The one decision of which tracking server a command uses, checked to answer: ``uri`` (given
    explicitly), else $MLFLOW_TRACKING_URI, else ``saved`` (the server a resumed sweep logged to), else the
    embedded server of ``root`` (default: ``tracking.server.default_root()``), started when ``start``."""
    for candidate in (uri, os.environ.get("MLFLOW_TRACKING_URI", "").strip(), saved):
        if candidate:
            check_server(candidate)
            return Resolved(candidate)
    from tracking.server import DEFAULT_PORT, ensure_server, running_server

    info = ensure_server(root, port=port or DEFAULT_PORT) if start else running_server(root)
    if info is None:
        raise TrackingUnavailable("no MLFLOW_TRACKING_URI is set and no embedded server is running (gce-sweep ui)")
    return Resolved(info.url, info)


def check_server(uri: str, attempts: int = 3, timeout: float = 3.0) -> None:
    """Raise TrackingUnavailable naming ``uri`` unless its /health answers within ``attempts`` tries, then
    TrackingAuthError if the API refuses the credentials from MLFLOW_TRACKING_USERNAME/PASSWORD.
    Non-HTTP URIs (a local SQLite file, a folder) have no server to check."""
    if not uri.startswith(("http://", "https://")):
        return
    base = uri.rstrip("/")
    start, error = time.monotonic(), ""
    for attempt in range(attempts):
        status, error = _request(f"{base}/health", timeout)
        if status == 200:
            break
        if attempt < attempts - 1:
            time.sleep(2.0**attempt)
    else:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is unreachable ({error or f'HTTP {status}'}; {attempts} attempts in "
            f"{time.monotonic() - start:.0f} s). Start it (docker compose up -d) or unset MLFLOW_TRACKING_URI "
            "to use the embedded server.")
    status, error = _request(f"{base}/api/2.0/mlflow/experiments/search", timeout, {"max_results": 1})
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401:
        who = f"user {user!r}" if user else "no credentials (set MLFLOW_TRACKING_USERNAME and _PASSWORD)"
        raise TrackingAuthError(f"MLflow tracking server {uri} rejected the login: {who} (HTTP 401)")
    if status == 403:
        raise TrackingAuthError(f"MLflow tracking server {uri}: user {user!r} may not search experiments (HTTP 403)")
    if status != 200:
        raise TrackingUnavailable(f"MLflow tracking server {uri} answers /health but its API fails: "
                                  f"{error or f'HTTP {status}'}")


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of a GET, or None when nothing answers."""
    return _request(url, timeout)[0]


def _request(url: str, timeout: float, body: dict | None = None) -> tuple[int | None, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    request.add_header("Content-Type", "application/json")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, ""
    except urllib.error.HTTPError as err:
        return err.code, f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        return None, str(getattr(err, "reason", err))


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (we could bind it). SO_REUSEADDR as the server itself binds, so
    a server restarted on its old port is not sent elsewhere by the old connections' TIME_WAIT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (another process may still take it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
