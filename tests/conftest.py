"""Shared fixtures: real tracking servers as processes, started once per session.

- ``mlflow_server``: the embedded default (``tracking.server.ensure_server``: SQLite + artifacts folder).
- ``postgres``: a throw-away PostgreSQL cluster on a free loopback port (Debian's binaries; as root via runuser).
- ``mlflow_postgres``: ``mlflow db upgrade`` then ``server_command(...)`` on that cluster, the way the compose
  stack runs them, with the password in PGPASSWORD as in the stack.
- ``own_server``: a fresh embedded server per test, for tests that stop, crash (``crash_server``) and restart it.
- ``auth_server``: the compose `auth` profile's basic-auth server, with the shipped ini, on SQLite.
- ``tracking_uri``: parametrised over both, for contract tests that every storage backend must pass.

Outside CI a missing PostgreSQL skips with the reason; under CI=true it fails instead.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("true", "1")


def require(ok: bool, reason: str) -> None:
    """Skip with ``reason`` unless ``ok``; under CI=true a missing dependency is a failure, not a skip."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def fast_tmp():
    """A scratch folder in RAM when the machine has /dev/shm: SQLite's schema migrations fsync ≈ 200 times."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="gce-tests-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(fast_tmp):
    """The embedded default server, as ``gce-sweep ui`` starts it."""
    from tracking.server import ensure_server, stop_server

    root = fast_tmp / "embedded"
    info = ensure_server(root, port=_free_port())
    yield info
    stop_server(root)


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str
    dbname: str

    @property
    def uri(self) -> str:
        """Without the password, which libpq reads from PGPASSWORD (kept out of argv, as in the stack)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    @property
    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password}


def postgres_bindir() -> Path | None:
    """Debian's versioned folder (newest first), else whatever pg_ctl is on PATH."""
    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True):
        return Path(initdb).parent
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and (Path(found).parent / "initdb").exists() else None


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL cluster with password (scram) auth, role and database ``mlflow``; durability off for speed."""
    bindir = postgres_bindir()
    require(bindir is not None, "PostgreSQL server binaries not found (apt-get install postgresql)")
    try:
        import psycopg
    except ImportError:
        require(False, "psycopg is not installed (pip install 'psycopg[binary]')")
    root = Path(tempfile.mkdtemp(prefix="gce-pg-"))
    as_pg = _runas_postgres(root)
    superpass, password, port = "super-" + os.urandom(6).hex(), "mlflow-" + os.urandom(6).hex(), _free_port()
    (root / "pw").write_text(superpass)
    if as_pg:
        shutil.chown(root / "pw", "postgres")
    data = root / "data"
    _run([*as_pg, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
          f"--pwfile={root / 'pw'}", "-E", "UTF8", "--no-sync"])
    options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off "
               "-c full_page_writes=off")
    _run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options, "-w", "start"])
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=superpass, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE ROLE mlflow LOGIN PASSWORD '{password}'")
            conn.execute("CREATE DATABASE mlflow OWNER mlflow")
        yield Postgres("127.0.0.1", port, "mlflow", password, "mlflow")
    finally:
        subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_postgres(postgres, fast_tmp):
    """The compose stack's two steps on a real PostgreSQL: the one-shot schema upgrade, then the server."""
    from tracking.connection import free_port
    from tracking.server import SERVER_ENV, mlflow_executable, server_command, upgrade_command, wait_healthy

    env = {**os.environ, **SERVER_ENV, **postgres.env}
    exe = mlflow_executable()
    upgrade = subprocess.run(upgrade_command(postgres.uri, executable=exe), env=env, capture_output=True, text=True)
    assert upgrade.returncode == 0, upgrade.stderr[-3000:]
    root = fast_tmp / "pg-server"
    root.mkdir()
    port = free_port()
    log = root / "server.log"
    argv = server_command(postgres.uri, str(root / "artifacts"), "127.0.0.1", port, executable=exe)
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 120, proc, log)
        yield url
    finally:
        stop_group(proc)


@pytest.fixture
def own_server(fast_tmp):
    """(root, ServerInfo) of a fresh embedded server that the test may stop, crash and restart on its port."""
    import uuid

    from tracking.server import ensure_server, stop_server

    root = fast_tmp / f"own-{uuid.uuid4().hex[:8]}"
    info = ensure_server(root, port=_free_port())
    yield root, info
    stop_server(root)


def crash_server(pid: int) -> None:
    """kill -9 a server's whole process group (tracking.server starts it in its own session), as a crash would,
    and wait until it is gone."""
    import time

    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # our own child: reap it, or its zombie keeps the group alive
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"server process group {pid} survived SIGKILL")


AUTH_ADMIN_PASSWORD = "admin-password-123"


@pytest.fixture(scope="session")
def auth_server(fast_tmp):
    """The compose `auth` profile's server: the same command plus --app-name basic-auth, with the shipped
    docker/basic_auth.ini (only its user database moved to a scratch folder), on SQLite."""
    from tracking.connection import free_port
    from tracking.server import SERVER_ENV, mlflow_executable, server_command, wait_healthy

    root = fast_tmp / "auth"
    root.mkdir()
    shipped = (Path(__file__).resolve().parents[1] / "docker" / "basic_auth.ini").read_text()
    ini = "\n".join(f"database_uri = sqlite:///{root}/auth.db" if line.startswith("database_uri") else line
                    for line in shipped.splitlines())
    (root / "auth.ini").write_text(ini + "\n")
    port = free_port()
    argv = server_command(f"sqlite:///{root}/mlflow.db", str(root / "artifacts"), port=port, app_name="basic-auth",
                          executable=mlflow_executable())
    env = {**os.environ, **SERVER_ENV, "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key", "MLFLOW_AUTH_ADMIN_PASSWORD": AUTH_ADMIN_PASSWORD}
    with (root / "server.log").open("wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                                start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 120, proc, root / "server.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc)


@pytest.fixture(params=["sqlite", "postgresql"])
def tracking_uri(request) -> str:
    """The URL of a tracking server on each storage backend: one contract, every backend."""
    if request.param == "sqlite":
        return request.getfixturevalue("mlflow_server").url
    return request.getfixturevalue("mlflow_postgres")


def _runas_postgres(root: Path) -> list[str]:
    """initdb refuses to run as root: hand the folder to the postgres user and run the binaries as it."""
    if os.geteuid() != 0:
        return []
    require(shutil.which("runuser") is not None, "running as root, and runuser is missing")
    shutil.chown(root, "postgres", "postgres")
    return ["runuser", "-u", "postgres", "--"]


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


def _free_port() -> int:
    from tracking.connection import free_port

    return free_port()


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM a server's process group, SIGKILL it if it has not gone within 20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray with 2 CPUs for the sweep tests of one module, shut down after it."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def mnist5k():
    """MNIST-5k with the validation split of seed 0 (a module may define its own)."""
    from gce.data import load_dataset

    return load_dataset("mnist5k", seed=0)


@pytest.fixture(scope="module")
def model(mnist5k):
    """A LeNet-5 trained one epoch with CE on it, in eval mode: a model that attacks can fool, quickly."""
    from gce.config import TrainConfig
    from gce.train import fit

    cfg = TrainConfig.from_dict({"data": {"dataset": "mnist5k"}, "model": {"name": "lenet5"}, "loss": {"name": "ce"},
                                 "epochs": 1, "batch_size": 64, "seed": 0, "device": "cpu"})
    return fit(cfg, data=mnist5k).model.eval()
