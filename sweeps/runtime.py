"""The Ray a sweep runs on: a local Ray of its own, or the cluster it names — and what a dead driver left.

- No address: a *new* local Ray (``address="local"``), never whatever cluster an earlier ``ray start`` recorded
  on the machine (a stopped one made ``init()`` hang for minutes).
- An address: checked to answer within seconds, else a one-line error that names it.
- A driver killed with SIGKILL leaves Ray's agents behind (they ignore SIGTERM for minutes). Each driver notes
  its local Ray session in the sweep's folder; ``resume`` ends the processes of sessions whose driver is dead.
- Plugins (``spec.plugins``, see gce.plugins) travel to the workers: the code of those that are not installed
  packages is copied into the sweep's folder (``gce_plugins/``, kept beside the results) and shipped with Ray's
  runtime environment (``py_modules``) when this driver starts or joins Ray; with a Ray the caller started (its
  runtime environment is fixed) trials import the copies from the sweep's folder, which they see on this machine
  or a shared filesystem. Installed packages are not shipped: they must be installed on every node.
- Worker output is not forwarded to the console: a trial's errors go to its MLflow run and one console line,
  and a worker's shutdown noise (its SIGTERM handler's SystemExit) never reaches the user's screen.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
from importlib.metadata import packages_distributions
from pathlib import Path
from types import ModuleType

from sweeps.record import SweepRecord
from sweeps.spec import SpecError
from tracking.server import pid_alive

__all__ = ["PLUGINS_DIR", "import_plugins", "init_ray", "reap_dead_sessions", "remote_nodes", "stage_plugins"]

SESSIONS_FILE = "ray_sessions.json"
PLUGINS_DIR = "gce_plugins"  # in the sweep's folder: the plugins' code as the driver imported it


def init_ray(record: SweepRecord, env: dict[str, str]) -> None:
    """Ray for this driver, with ``env`` set in every worker (how trials reach the tracking server)."""
    import ray

    shipped = stage_plugins(record)
    if ray.is_initialized():  # its runtime environment is the caller's: trials use the staged copies
        return
    runtime_env = {"env_vars": env} | ({"py_modules": [str(p) for p in shipped]} if shipped else {})
    options = dict(runtime_env=runtime_env, logging_level="WARNING", log_to_driver=False)
    _condense_cluster_errors()
    if record.address:
        check_address(record.address)
        ray.init(address=record.address, **options)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", include_dashboard=False, **options)
    _note_session(record.folder)


def _condense_cluster_errors() -> None:
    """Ray's driver prints every cluster error it hears of (a node lost, a raylet killed) with a forty-line state
    dump, sometimes twice: the sweep's console gets each once, as its first line (the trial's retry has its own
    line from the progress callback). Ray offers no option for this; its printer is wrapped once per process."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "_gce_condensed", False):
        return
    seen: set[str] = set()

    def condensed(data, ignore_prefix: bool):
        if data.get("pid") == "raylet":
            lines = []
            for message in data.get("lines", []):
                first = message.strip().splitlines()[0] if message.strip() else ""
                first = first if len(first) <= 240 else first[:237] + "..."
                if first and first not in seen:
                    seen.add(first)
                    lines.append(first)
            if not lines:
                return
            data = {**data, "lines": lines}
        original(data, ignore_prefix)

    condensed._gce_condensed = True
    ray_worker.print_to_stdstream = condensed


def stage_plugins(record: SweepRecord) -> list[Path]:
    """Copy the code of the spec's plugins that are not installed packages (a module file, or the top-level
    package's folder) into ``<sweep folder>/gce_plugins``; returns the copies, for Ray's ``py_modules``.

    A resumed sweep's driver may not find a plugin where the launch found it (another working directory): the
    copies staged at launch are its last resort, so the sweep continues with the code it started with."""
    from gce.plugins import PluginError, load_plugins

    folder = record.folder / PLUGINS_DIR
    if folder.is_dir() and str(folder) not in sys.path:
        sys.path.append(str(folder))  # appended: the plugin where the user keeps it comes first
    try:
        modules = load_plugins(record.sweep_spec.plugins)  # imported already when the spec was loaded: cheap
    except PluginError as err:
        raise SpecError("\n".join(err.problems)) from None
    if not modules:
        return []
    installed = packages_distributions()
    staged: list[Path] = []
    for top in dict.fromkeys(sys.modules[m.__name__.partition(".")[0]] for m in modules):
        if top.__name__ in sys.stdlib_module_names or top.__name__ in installed:
            continue
        source = _module_source(top)
        target = folder / source.name
        if source.resolve() != target.resolve():  # not imported from the staged copy itself (a resume)
            folder.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(source, target)
        staged.append(target)
    return staged


def _module_source(module: ModuleType) -> Path:
    """The file of a single-module plugin, the folder of a package."""
    path = list(getattr(module, "__path__", []))
    if path:
        if len(path) != 1:
            raise SpecError(f"plugins: the namespace package {module.__name__!r} spans {path}: it cannot be shipped "
                            "to Ray's workers; install it on every node, or make it a regular package")
        return Path(path[0])
    if not getattr(module, "__file__", None):
        raise SpecError(f"plugins: {module.__name__!r} has no source file to ship to Ray's workers")
    return Path(module.__file__)


def import_plugins(record: SweepRecord) -> None:
    """In a trial's worker, before its config is built: the spec's plugins imported, from what Ray's runtime
    environment shipped, else from the copies in the sweep's folder (a Ray the caller started)."""
    from gce.plugins import load_plugins

    staged = str(record.folder / PLUGINS_DIR)
    if Path(staged).is_dir() and staged not in sys.path:
        sys.path.insert(0, staged)  # the code the driver imported, before any same-named module on the path
    load_plugins(record.sweep_spec.plugins)


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


def remote_nodes(address: str) -> list[str]:
    """The IP addresses of the cluster's live nodes that are not this machine (connecting briefly when this
    process is not connected yet): a loopback tracking URI serves a cluster only when this list is empty."""
    import ray

    connected = ray.is_initialized()
    if not connected:
        check_address(address)  # a cluster that is down: the one-line refusal, not Ray's connection timeout
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    try:
        ips = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    finally:
        if not connected:
            ray.shutdown()
    return foreign(ips)


def foreign(ips) -> list[str]:
    """Those of ``ips`` that are not an address of this machine."""
    import psutil

    local = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return sorted(ip for ip in set(ips) if ip not in local and not ip.startswith("127.") and ip != "::1")


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
