"""The team stack is closed by default: the basic-auth server process (the compose `auth` profile's command and
shipped ini) lets nobody in without a valid login, nobody can sign up anonymously or make themselves admin, the
server refuses to start without its secrets, and the compose stack carries no secret of its own.

Credentials checks against docker-compose.yml use the real Compose v2 parser (tests/test_tracking_compose.py)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import pytest
import requests
from conftest import AUTH_ADMIN_PASSWORD
from test_tracking_compose import COMPOSE_FILE, ROOT, compose

from tracking.connection import free_port
from tracking.server import SERVER_ENV, mlflow_executable, server_command

ADMIN = ("admin", AUTH_ADMIN_PASSWORD)
API = "/api/2.0/mlflow"
# (method, path, JSON body): reading and writing tracking data, the UI, signing up, the artifact proxy.
PROTECTED = [
    ("GET", f"{API}/experiments/search?max_results=1", None),
    ("POST", f"{API}/experiments/create", {"name": "intruder"}),
    ("POST", f"{API}/runs/search", {"experiment_ids": ["0"]}),
    ("GET", "/", None),
    ("GET", "/signup", None),
    ("POST", f"{API}/users/create", {"username": "mallory", "password": "mallory-password-1"}),
    ("POST", "/ajax-api/2.0/mlflow/users/create", {"username": "mallory", "password": "mallory-password-1"}),
    ("GET", "/api/2.0/mlflow-artifacts/artifacts/0", None),
]


def call(url: str, method: str, path: str, body=None, auth=None) -> requests.Response:
    return requests.request(method, url + path, json=body, auth=auth, timeout=20)


def user_exists(url: str, username: str) -> bool:
    got = call(url, "GET", f"{API}/users/get?username={username}", auth=ADMIN)
    assert got.status_code in (200, 404), got.text
    return got.status_code == 200


@pytest.mark.parametrize("credentials", [None, ("admin", "wrong-password-123"), ("nobody", AUTH_ADMIN_PASSWORD)],
                         ids=["anonymous", "wrong-password", "unknown-user"])
def test_requests_without_a_valid_login_are_refused(auth_server, credentials):
    for method, path, body in PROTECTED:
        answer = call(auth_server, method, path, body, auth=credentials)
        assert answer.status_code == 401, f"{method} {path}: {answer.status_code} {answer.text[:200]}"
        assert answer.headers.get("WWW-Authenticate", "").startswith("Basic")
    assert call(auth_server, "GET", "/health").status_code == 200  # the only door open: liveness, no data
    assert call(auth_server, "GET", f"{API}/experiments/search?max_results=1", auth=ADMIN).status_code == 200
    assert not user_exists(auth_server, "mallory")
    names = {e["name"] for e in call(auth_server, "GET", f"{API}/experiments/search?max_results=100",
                                     auth=ADMIN).json().get("experiments", [])}
    assert "intruder" not in names


def test_no_anonymous_signup_and_no_self_promotion(auth_server):
    """Only an admin creates users; a logged-in ordinary user can neither create accounts nor become admin."""
    alice = f"alice{uuid.uuid4().hex[:6]}"
    alice_auth = (alice, "alice-password-123")
    made = call(auth_server, "POST", f"{API}/users/create", {"username": alice, "password": alice_auth[1]}, ADMIN)
    assert made.status_code == 200, made.text
    assert call(auth_server, "GET", f"{API}/experiments/search?max_results=1", auth=alice_auth).status_code == 200

    mallory = f"mallory{uuid.uuid4().hex[:6]}"
    for path in (f"{API}/users/create", "/ajax-api/2.0/mlflow/users/create"):
        answer = call(auth_server, "POST", path, {"username": mallory, "password": "mallory-password-1"}, alice_auth)
        assert answer.status_code == 403, f"{path}: {answer.status_code} {answer.text[:200]}"
    assert call(auth_server, "GET", "/signup", auth=alice_auth).status_code == 403
    promote = call(auth_server, "PATCH", f"{API}/users/update-admin", {"username": alice, "is_admin": True}, alice_auth)
    assert promote.status_code == 403
    assert not user_exists(auth_server, mallory)
    me = call(auth_server, "GET", f"{API}/users/get?username={alice}", auth=ADMIN).json()["user"]
    assert me["is_admin"] is False


def test_server_info_is_public_but_carries_no_secret(auth_server):
    info = call(auth_server, "GET", "/api/3.0/mlflow/server-info")  # public by design (capability discovery)
    assert info.status_code == 200, info.text[:200]
    assert "test-secret-key" not in info.text and AUTH_ADMIN_PASSWORD not in info.text


@pytest.mark.slow
@pytest.mark.parametrize("missing, needle", [
    ({"MLFLOW_FLASK_SERVER_SECRET_KEY": ""}, "MLFLOW_FLASK_SERVER_SECRET_KEY"),
    ({"MLFLOW_AUTH_ADMIN_PASSWORD": ""}, "MLFLOW_AUTH_ADMIN_PASSWORD"),
], ids=["no-secret-key", "no-admin-password"])
def test_the_auth_server_refuses_to_start_without_its_secrets(tmp_path, missing, needle):
    """What the compose `mlflow-auth` service does when .env leaves a secret empty (compose passes ''):
    the process exits with an error naming the setting, and never answers."""
    shipped = (ROOT / "docker" / "basic_auth.ini").read_text()
    assert "admin_password =" not in shipped.replace("# admin_password =", ""), "no admin password in the image"
    ini = "\n".join(f"database_uri = sqlite:///{tmp_path}/auth.db" if line.startswith("database_uri") else line
                    for line in shipped.splitlines())
    (tmp_path / "auth.ini").write_text(ini + "\n")
    port = free_port()
    argv = server_command(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"), port=port,
                          app_name="basic-auth", executable=mlflow_executable())
    env = {**os.environ, **SERVER_ENV, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32, "MLFLOW_AUTH_ADMIN_PASSWORD": "p" * 16, **missing}
    started = time.monotonic()
    try:
        done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              start_new_session=True)
    except subprocess.TimeoutExpired:  # pragma: no cover - it started: the failure that matters
        pytest.fail(f"the auth server started without {needle}")
    assert done.returncode != 0 and needle in done.stdout + done.stderr, (done.stdout + done.stderr)[-2000:]
    assert time.monotonic() - started < 120


def test_compose_has_no_default_secrets_and_the_database_password_only_in_the_environment(tmp_path):
    password, secret = f"pg-{uuid.uuid4().hex}", f"key-{uuid.uuid4().hex}"
    env_file = tmp_path / ".env"
    env_file.write_text(f"POSTGRES_PASSWORD={password}\nMLFLOW_FLASK_SERVER_SECRET_KEY={secret}\n")
    done = compose("--profile", "*", "config", "--format", "json", env_file=env_file)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    # Secret-looking settings take their value from .env or are empty: no default anywhere in the file.
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in ("PASSWORD", "SECRET", "TOKEN")):
                assert value in ("", password, secret), f"{name}.{key} has a default: {value!r}"
    assert services["mlflow-auth"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == ""  # unset: the server refuses
    assert services["ray-head"]["environment"]["RAY_AUTH_TOKEN"] == ""  # unset: require-env refuses
    # The database password reaches the services as an environment variable only: never in an argv, a URI,
    # a healthcheck or a label.
    for name, service in services.items():
        outside_env = json.dumps({k: v for k, v in service.items() if k != "environment"})
        assert password not in outside_env, f"{name}: the PostgreSQL password leaks outside its environment"
        env = service.get("environment") or {}
        if "PGPASSWORD" in env or "POSTGRES_PASSWORD" in env:
            assert password in (env.get("PGPASSWORD"), env.get("POSTGRES_PASSWORD"))
    raw = COMPOSE_FILE.read_text()
    assert password not in raw and "${POSTGRES_PASSWORD:?" in raw
    published = [(name, p) for name, s in services.items() for p in s.get("ports", [])]
    assert published and all(p["host_ip"] == "127.0.0.1" for _, p in published), published
    for ignore in (".gitignore", ".dockerignore"):  # a filled-in .env is neither committed nor sent to a build
        assert ".env" in (ROOT / ignore).read_text().split(), ignore
