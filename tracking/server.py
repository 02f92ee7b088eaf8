"""The MLflow tracking server: its one command line and the embedded default's lifecycle.

``server_command`` is the only place the ``mlflow server`` argv is written. The embedded default (a laptop
without Docker), the compose file's ``mlflow`` service and the tests all run what it returns; a test holds the
compose ``command:`` equal to it. Stdlib only (no mlflow import) so the CLI can find a running server fast.

    python -m tracking.server start|stop|status [--dir DIR] [--port P]
    python -m tracking.server compose     # the compose services' commands, to paste into docker-compose.yml
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tracking.connection import TrackingUnavailable, free_port, http_status, port_is_free

DEFAULT_PORT = 5000
# No job consumers: with them MLflow starts 7 extra processes (≈1.5 GB); a sweep needs none of them.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
STATE_FILE = "server.json"
# The compose stack (docker-compose.yml): the password reaches libpq as PGPASSWORD from .env, never in argv.
COMPOSE_BACKEND = "postgresql://mlflow@postgres:5432/mlflow"
COMPOSE_ARTIFACTS = "/mlflow/artifacts"
# Host headers the stack answers: service names (trials in the `cluster` profile) and the host's loopback.
COMPOSE_ALLOWED_HOSTS = ("mlflow:5000", "mlflow-auth:5000", "localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*")


def server_command(backend_store_uri: str, artifacts_destination: str, host: str = "127.0.0.1",
                   port: int = DEFAULT_PORT, workers: int = 1, *, allowed_hosts: Sequence[str] = (),
                   app_name: str | None = None, executable: str = "mlflow") -> list[str]:
    """The ``mlflow server`` argv. Artifacts are always proxied (``--serve-artifacts``) so that remote trials
    upload over HTTP and never need storage credentials; one worker keeps the server at two processes."""
    argv = [executable, "server", "--backend-store-uri", backend_store_uri,
            "--serve-artifacts", "--artifacts-destination", artifacts_destination,
            "--host", host, "--port", str(port), "--workers", str(workers)]
    if allowed_hosts:  # replaces MLflow's localhost-only default, e.g. for a compose service name
        argv += ["--allowed-hosts", ",".join(allowed_hosts)]
    if app_name:
        argv += ["--app-name", app_name]
    return argv


def upgrade_command(backend_store_uri: str, executable: str = "mlflow") -> list[str]:
    """``mlflow db upgrade``: creates the schema on an empty database, migrates an old one (compose runs it once)."""
    return [executable, "db", "upgrade", backend_store_uri]


def compose_commands() -> dict[str, list[str]]:
    """The ``command:`` of each MLflow service in docker-compose.yml (a test holds the file equal to this)."""
    server = {"backend_store_uri": COMPOSE_BACKEND, "artifacts_destination": COMPOSE_ARTIFACTS, "host": "0.0.0.0",
              "port": DEFAULT_PORT, "allowed_hosts": COMPOSE_ALLOWED_HOSTS}
    return {"mlflow-db-upgrade": upgrade_command(COMPOSE_BACKEND), "mlflow": server_command(**server),
            "mlflow-auth": server_command(**server, app_name="basic-auth")}


def mlflow_executable() -> str:
    """The ``mlflow`` script of this interpreter's environment (a venv's bin/ need not be on PATH)."""
    beside = Path(sys.executable).with_name("mlflow")
    found = str(beside) if beside.exists() else shutil.which("mlflow")
    if not found:
        raise TrackingUnavailable("the `mlflow` command is not installed in this environment (pip install mlflow)")
    return found


def default_root() -> Path:
    """Where the embedded server keeps its SQLite store and artifacts: $GCE_TRACKING_DIR or ./.gce-sweeps/mlflow."""
    return Path(os.environ.get("GCE_TRACKING_DIR") or Path.cwd() / ".gce-sweeps" / "mlflow").resolve()


@dataclass(frozen=True)
class ServerInfo:
    """A running embedded server, as recorded in ``<root>/server.json``."""

    url: str
    pid: int
    port: int
    root: str
    reused: bool = False


def ensure_server(root: Path | str | None = None, *, port: int = DEFAULT_PORT, host: str = "127.0.0.1",
                  timeout: float = 120.0) -> ServerInfo:
    """The embedded server for ``root``: the one already running there, or a new one on ``port`` (another free
    port when that one is taken). A file lock makes concurrent callers share one server."""
    root = Path(root or default_root()).resolve()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        info = running_server(root)
        if info is not None:
            return replace(info, reused=True)
        return _start(root, port, host, timeout)


def running_server(root: Path | str | None = None) -> ServerInfo | None:
    """The server recorded for ``root`` if its process is alive and answers /health; stale records are removed."""
    state = Path(root or default_root()).resolve() / STATE_FILE
    try:
        info = ServerInfo(**{k: v for k, v in json.loads(state.read_text()).items() if k != "reused"})
    except (OSError, ValueError, TypeError):
        return None
    if pid_alive(info.pid) and http_status(f"{info.url}/health", timeout=2.0) == 200:
        return info
    state.unlink(missing_ok=True)
    return None


def revive_server(root: Path | str, port: int) -> ServerInfo | None:
    """Start the embedded server of ``root`` again, on ``port`` (the address its clients know), when its
    recorded process has died; a live server is left alone however slowly it answers. The new one, or None."""
    root = Path(root).resolve()
    with _locked(root):
        try:
            pid = int(json.loads((root / STATE_FILE).read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            pid = None
        # Alive, or something (a surviving worker of the dead one) still holds the port: nothing to start; never
        # a second server elsewhere on the same store.
        if (pid is not None and pid_alive(pid)) or not port_is_free("127.0.0.1", port):
            return None
        return _start(root, port, "127.0.0.1", timeout=120.0, exact=True)


def stop_server(root: Path | str | None = None, timeout: float = 20.0) -> bool:
    """Stop the embedded server of ``root`` (SIGTERM to its process group, SIGKILL after ``timeout``)."""
    root = Path(root or default_root()).resolve()
    with _locked(root):
        # The recorded process, healthy or not: a server too busy to answer /health in time (a loaded CI
        # machine) is still ours to stop - asking ``running_server`` would drop its record and orphan it.
        try:
            pid = int(json.loads((root / STATE_FILE).read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if not pid_alive(pid):
            (root / STATE_FILE).unlink(missing_ok=True)
            return False
        info = ServerInfo(url="", pid=pid, port=0, root=str(root))
        _signal_group(info.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(info.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(info.pid):
            _signal_group(info.pid, signal.SIGKILL)
        (root / STATE_FILE).unlink(missing_ok=True)
        return True


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url``/health until it answers 200; fail early, with the log's tail, if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_status(f"{url}/health", timeout=2.0) == 200:
            return
        if proc is not None and proc.poll() is not None:
            raise TrackingUnavailable(f"mlflow server for {url} exited with code {proc.returncode}{_tail(log)}")
        time.sleep(0.2)
    raise TrackingUnavailable(f"mlflow server at {url} did not answer /health within {timeout:.0f} s{_tail(log)}")


def _start(root: Path, port: int, host: str, timeout: float, exact: bool = False) -> ServerInfo:
    """Start the server on ``port`` (another free one when it is taken, unless ``exact``) and record it."""
    artifacts = root / "artifacts"
    artifacts.mkdir(exist_ok=True)
    log = root / "server.log"
    for attempt in range(1 if exact else 3):  # a free port can be taken between our check and the server's bind
        chosen = port if exact or (attempt == 0 and port_is_free(host, port)) else free_port(host)
        argv = server_command(f"sqlite:///{root / 'mlflow.db'}", str(artifacts), host, chosen,
                              executable=mlflow_executable())
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=root, env={**os.environ, **SERVER_ENV}, start_new_session=True)
        url = f"http://{host}:{chosen}"
        try:
            wait_healthy(url, timeout, proc, log)
        except TrackingUnavailable:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGKILL)
            if exact or port_is_free(host, chosen) or attempt == 2:
                raise
            continue
        info = ServerInfo(url=url, pid=proc.pid, port=chosen, root=str(root))
        (root / STATE_FILE).write_text(json.dumps(asdict(info), indent=2))
        return info
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    with (root / "server.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs. A zombie (killed, not yet reaped by a parent that is not us) is dead: a
    server started by another long-lived process and killed would otherwise look alive for good."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child that exited: reap it
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # Linux: the state follows the parenthesised command name
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """The server was started in its own session, so its process group is exactly the server and its workers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    return "; log " + str(log) + ":\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="The embedded MLflow server (SQLite + artifacts folder).")
    parser.add_argument("action", choices=["start", "stop", "status", "compose"])
    parser.add_argument("--dir", type=Path, default=None, help="default: $GCE_TRACKING_DIR or ./.gce-sweeps/mlflow")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    if args.action == "compose":
        for service, argv in compose_commands().items():
            print(f"{service}:\n    command: {json.dumps(argv)}")
    elif args.action == "start":
        info = ensure_server(args.dir, port=args.port)
        print(f"{'running' if info.reused else 'started'}: {info.url} (pid {info.pid}, {info.root})")
    elif args.action == "stop":
        print("stopped" if stop_server(args.dir) else "no server running")
    else:
        info = running_server(args.dir)
        print(f"running: {info.url} (pid {info.pid})" if info else "no server running")
        sys.exit(0 if info else 1)


if __name__ == "__main__":
    main()
