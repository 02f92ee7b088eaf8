"""A real Ray cluster on this machine: a head and worker nodes as separate process trees, started with the same
``ray start`` commands a user runs (README, "A Ray cluster"), for the cluster tests and fault campaigns.

Each node is its own session (``start_new_session``): killing a node's raylet, or its whole process group,
is a node failure; ``stop`` ends only this cluster's processes (``ray stop`` would end every Ray on the machine).
Failure detection is shortened (health checks every 0.5 s, a lost GCS given up after 5 s) so that a test sees
a dead node within seconds, not Ray's default half minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LocalCluster", "RayNode"]

FAST_FAILURE_DETECTION = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "4",
    "RAY_gcs_rpc_server_reconnect_timeout_s": "5",
}


@dataclass
class RayNode:
    session: int  # the process group of its `ray start` (the node's daemons keep it)
    node_id: str
    head: bool

    def raylet(self) -> int | None:
        for pid, args in _processes():
            if "raylet/raylet" in args and f"--node_id={self.node_id}" in args:
                return pid
        return None

    def alive(self) -> bool:
        """Whether its raylet runs (the node's other daemons may linger a while after it)."""
        return self.raylet() is not None


@dataclass
class LocalCluster:
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    nodes: list[RayNode] = field(default_factory=list)

    def __post_init__(self):
        self.port = self.port or _free_port()
        base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env = base | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"} | FAST_FAILURE_DETECTION \
            | self.env

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, workers: int = 1, cpus: int = 1) -> LocalCluster:
        self.add_node(head=True, cpus=cpus)
        for _ in range(workers):
            self.add_node(cpus=cpus, resources={"worker_node": 1})
        return self

    def add_node(self, *, head: bool = False, cpus: int = 1, resources: dict | None = None) -> RayNode:
        ray = [sys.executable, "-m", "ray.scripts.scripts", "start", f"--num-cpus={cpus}",
               "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        ray += ["--head", f"--port={self.port}", "--include-dashboard=false"] if head else [f"--address={self.address}"]
        if resources:
            ray.append(f"--resources={json.dumps(resources)}")
        known = {n.node_id for n in self.nodes}
        proc = subprocess.Popen(ray, env=self.env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{out[-2000:]}")
        deadline = time.time() + 30
        while time.time() < deadline:
            ids = [a.split("--node_id=", 1)[1].split()[0] for pid, a in _processes()
                   if "raylet/raylet" in a and "--node_id=" in a and _pgid(pid) == proc.pid]
            fresh = [i for i in ids if i not in known]
            if fresh:
                node = RayNode(proc.pid, fresh[0], head)
                self.nodes.append(node)
                return node
            time.sleep(0.2)
        raise RuntimeError(f"ray start: no raylet of the new node appeared\n{out[-2000:]}")

    @property
    def head(self) -> RayNode:
        return next(n for n in self.nodes if n.head)

    @property
    def workers(self) -> list[RayNode]:
        return [n for n in self.nodes if not n.head]

    def kill_raylet(self, node: RayNode) -> bool:
        """SIGKILL the node's raylet (its workers die with it); False if it was gone already."""
        pid = node.raylet()
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return True

    def kill_node(self, node: RayNode) -> None:
        """Every process of the node at once (a machine lost)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.session, signal.SIGKILL)

    def wait_gone(self, node: RayNode, timeout: float = 60) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not node.alive():
                return True
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        for node in self.nodes:
            self.kill_node(node)
        # `ray start --head` records its address for `ray.init()` without one: not a dead cluster's.
        recorded = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        with contextlib.suppress(OSError):
            if recorded.read_text().strip().endswith(f":{self.port}"):
                recorded.unlink()
        deadline = time.time() + 10
        while time.time() < deadline and any(_pgid(pid) in {n.session for n in self.nodes} for pid, _ in _processes()):
            time.sleep(0.1)
        self.nodes.clear()


def _processes() -> list[tuple[int, str]]:
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            out.append((int(proc.name), (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")))
    return out


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
