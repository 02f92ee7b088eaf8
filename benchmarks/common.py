"""Shared helpers: wall-clock timing around device syncs, a table printer and JSON results."""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], int], device: torch.device, repeats: int = 3) -> float:
    """Best images/s over `repeats` calls of fn (which returns the number of images it processed)."""
    best = 0.0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        n = fn()
        sync(device)
        best = max(best, n / (time.perf_counter() - start))
    return best


@contextmanager
def fresh_tracking_server(prefix: str = "gce-bench-") -> Iterator[tuple[str, Path]]:
    """(URL, scratch folder) of a fresh embedded MLflow server (SQLite) in a temporary folder, stopped and
    removed afterwards: a benchmark measures an empty server, never the user's."""
    from tracking.connection import free_port
    from tracking.server import ensure_server, stop_server

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        root = Path(tmp) / "mlflow"
        server = ensure_server(root, port=free_port())
        try:
            yield server.url, Path(tmp)
        finally:
            stop_server(root)


def environment(device: torch.device) -> dict[str, str]:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
    }


def report(name: str, rows: list[dict], device: torch.device, out_dir: Path | None = None,
           title: str | None = None) -> list[dict]:
    """Print ``title`` and the rows as a table, write them with the environment to <out_dir>/<name>.json, and
    return the rows (every benchmark's last step)."""
    if title:
        print(title)
    keys = list(rows[0])
    widths = [max(len(k), *(len(_fmt(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(r[k]).ljust(w) for k, w in zip(keys, widths, strict=True)))
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(device), "rows": rows}, indent=2))
    print(f"written: {path}")
    return rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
