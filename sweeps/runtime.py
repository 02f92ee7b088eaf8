"""The Ray a sweep runs on: a local Ray of its own, or the cluster it names — and what a dead driver left.

- No address: a *new* local Ray (``address="local"``), never whatever cluster an earlier ``ray start`` recorded
  on the machine (a stopped one made ``init()`` hang for minutes).
- An address: checked to answer within seconds, else a one-line error that names it.
- A driver killed with SIGKILL leaves Ray's agents behind (they ignore SIGTERM for minutes). Each driver notes
  its local Ray session in the sweep's folder; ``resume`` ends the processes of sessions whose driver is dead.
- Worker output is not forwarded to the console: a trial's errors go to its MLflow run and one console line,
  and a worker's shutdown noise (its SIGTERM handler's SystemExit) never reaches the user's screen.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from pathlib import Path

from sweeps.record import SweepRecord
from sweeps.spec import SpecError
from tracking.server import pid_alive

__all__ = ["init_ray", "reap_dead_sessions"]

SESSIONS_FILE = "ray_sessions.json"


def init_ray(record: SweepRecord, env: dict[str, str]) -> None:
    """Ray for this driver, with ``env`` set in every worker (how trials reach the tracking server)."""
    import ray

    if ray.is_initialized():
        return
    options = dict(runtime_env={"env_vars": env}, logging_level="WARNING", log_to_driver=False)
    if record.address:
        check_address(record.address)
        ray.init(address=record.address, **options)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", include_dashboard=False, **options)
    _note_session(record.folder)


def check_address(address: str, timeout: float = 5.0) -> None:
    """SpecError naming ``address`` unless something listens there (``host:port`` or ``ray://host:port``);
    "auto" is resolved from the address an earlier ``ray start`` recorded on this machine."""
    target = address
    if address == "auto":
        recorded = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        target = recorded.read_text().strip() if recorded.exists() else ""
        if not target:
            raise SpecError("ray: --address auto, but no Ray cluster was started on this machine (ray start --head)")
    host, _, port = target.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as err:
        raise SpecError(f"ray: no Ray cluster answers at {address} ({err}); start it (ray start --head) or run "
                        "without --address for a local Ray") from None


def _note_session(folder: Path) -> None:
    """Append this driver's local Ray session (pid, session folder) to the sweep's list."""
    import ray._private.worker as ray_worker

    try:
        session = ray_worker._global_node.get_session_dir_path()
    except AttributeError:  # a Ray without the private node handle: nothing to note, nothing to reap
        return
    path = folder / SESSIONS_FILE
    _write_sessions(path, [*_sessions(path), {"pid": os.getpid(), "session_dir": session}])


def reap_dead_sessions(folder: Path) -> int:
    """SIGKILL every process left by a dead driver's local Ray session (known by the files it holds open in the
    session folder); returns how many were ended. Sessions of live drivers are left alone."""
    path = folder / SESSIONS_FILE
    sessions = _sessions(path)
    dead = [s for s in sessions if s["pid"] != os.getpid() and not pid_alive(s["pid"])]
    ended = 0
    for session in dead:
        for pid in _holding(session["session_dir"]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                ended += 1
    if dead:
        _write_sessions(path, [s for s in sessions if s not in dead])
    return ended


def _write_sessions(path: Path, sessions: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sessions, indent=2))
    tmp.replace(path)  # atomic: a kill never leaves half a list


def _sessions(path: Path) -> list[dict]:
    try:
        return list(json.loads(path.read_text()))
    except (OSError, ValueError):
        return []


def _holding(session_dir: str) -> list[int]:
    """Processes with a file open below ``session_dir`` (Linux /proc; elsewhere none are found)."""
    prefix = session_dir.rstrip("/") + "/"
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if any(_target(fd).startswith(prefix) for fd in (proc / "fd").iterdir()):
                found.append(int(proc.name))
    return [pid for pid in found if pid != os.getpid()]


def _target(fd: Path) -> str:
    try:
        return os.readlink(fd)
    except OSError:  # closed while we looked
        return ""
