"""The embedded server's lifecycle and the bad-input paths: port taken, unreachable URI, wrong credentials."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import AUTH_ADMIN_PASSWORD
from typer.testing import CliRunner

from sweeps.cli import app
from tracking.connection import (
    TrackingAuthError,
    TrackingUnavailable,
    check_server,
    free_port,
    http_status,
    resolve_tracking,
)
from tracking.server import (
    default_root,
    ensure_server,
    stop_server,
)

runner = CliRunner()


def group_size(pgid: int) -> int:
    """Processes in a process group (the server runs in its own session)."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            count += fields[0] != "Z" and int(fields[2]) == pgid
    return count


def test_embedded_server_takes_another_port_then_is_reused_and_stopped(fast_tmp, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = fast_tmp / "lifecycle"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        info = ensure_server(root, port=busy)
        assert info.port != busy and not info.reused
        assert http_status(f"{info.url}/health") == 200
        assert (root / "mlflow.db").exists() and (root / "artifacts").is_dir()
        assert group_size(info.pid) <= 2, "lean server: the CLI and one uvicorn worker, no job consumers"

        again = ensure_server(root, port=busy)
        assert again.reused and (again.pid, again.url) == (info.pid, info.url)
        shown = runner.invoke(app, ["ui", "--dir", str(root)])
        assert shown.exit_code == 0 and info.url in shown.output and "running" in shown.output
        assert runner.invoke(app, ["server", "status", "--dir", str(root)]).exit_code == 0

    stopped = runner.invoke(app, ["server", "stop", "--dir", str(root)])
    assert stopped.exit_code == 0 and "stopped" in stopped.output
    assert http_status(f"{info.url}/health") is None and group_size(info.pid) == 0
    assert runner.invoke(app, ["server", "status", "--dir", str(root)]).exit_code == 1
    assert stop_server(root) is False


def test_a_server_too_busy_to_answer_is_still_stopped(fast_tmp, monkeypatch):
    """Seen after a CI run: a fault-campaign server, slow under load, lost its record to a failed /health check
    in stop_server and kept running. The recorded process is stopped whether or not it answers."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = fast_tmp / "busy"
    info = ensure_server(root, port=free_port())
    for pid in group_pids(info.pid):  # frozen: /health times out, as on an overloaded machine
        os.kill(pid, signal.SIGSTOP)
    try:
        assert stop_server(root, timeout=1.0) is True
        deadline = time.monotonic() + 10
        while group_size(info.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert group_size(info.pid) == 0
        assert not (root / "server.json").exists()
    finally:
        for pid in group_pids(info.pid):
            os.kill(pid, signal.SIGKILL)


def group_pids(pgid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                out.append(int(entry))
    return out


def test_default_root_is_project_local_or_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("GCE_TRACKING_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_root() == tmp_path.resolve() / ".gce-sweeps" / "mlflow"
    monkeypatch.setenv("GCE_TRACKING_DIR", str(tmp_path / "elsewhere"))
    assert default_root() == (tmp_path / "elsewhere").resolve()


def test_resolve_uses_the_configured_server_else_the_embedded_one(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    assert resolve_tracking().uri == mlflow_server.url
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("GCE_TRACKING_DIR", mlflow_server.root)
    assert resolve_tracking().uri == mlflow_server.url  # found running, not started again


def test_an_unreachable_uri_fails_fast_and_names_it(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=uri):
        resolve_tracking()
    assert time.monotonic() - start < 15
    result = runner.invoke(app, ["best", "some-study"])
    assert result.exit_code == 1 and uri in result.output and "Traceback" not in result.output


def test_wrong_or_missing_credentials_are_a_clear_auth_error(auth_server, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(TrackingAuthError, match="no credentials"):
        check_server(auth_server)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(TrackingAuthError, match=f"{auth_server}.*'admin'.*401"):
        check_server(auth_server)
    result = runner.invoke(app, ["best", "x", "--tracking-uri", auth_server])
    assert result.exit_code == 1 and "rejected the login" in result.output
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", AUTH_ADMIN_PASSWORD)
    check_server(auth_server)


def test_tracking_imports_neither_ray_nor_torch_and_the_cli_no_mlflow():
    modules = ["tracking.server", "tracking.connection", "tracking.logger", "tracking.plots", "tracking.queries",
               "tracking.tables"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch', 'gce', 'sweeps'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = "import sys, sweeps.cli, tracking.server; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "the CLI and the server helpers must not pay for importing mlflow"


def test_a_killed_server_not_yet_reaped_counts_as_dead():
    """A server started by another long-lived process and killed stays a zombie until that process reaps it:
    it must count as dead, or nothing would ever start the server again (found by the fault campaign)."""
    from tracking.server import pid_alive

    # The parent never reaps (a shell could, if it had not yet exec'd when the kill landed: a race seen in CI).
    parent = "import subprocess, time; print(subprocess.Popen(['sleep', '30']).pid, flush=True); time.sleep(10)"
    shell = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        orphan = int(shell.stdout.readline())
        assert pid_alive(orphan)
        os.kill(orphan, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not pid_alive(orphan)  # a zombie whose parent (the shell) has not reaped it
    finally:
        shell.kill()
        shell.wait()
