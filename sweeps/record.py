"""The sweep record: who a sweep is, written at launch (before anything else) and read by all that acts on it.

One frozen record carries a sweep's identity — id, parent run, tracking server, experiment, Ray address,
storage, the resolved spec — to the driver's steps, to every trial (through Ray's object store) and to
``resume`` (it is the resume file, ``<storage>/<sweep id>/gce_sweep.json``, beside Tune's own state).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from sweeps.spec import SpecError, SweepSpec

__all__ = ["RECORD_FILE", "SweepRecord", "SweepResult", "default_storage"]

RECORD_FILE = "gce_sweep.json"


def default_storage() -> Path:
    return Path(os.environ.get("GCE_RAY_RESULTS", ".gce-sweeps/ray_results")).absolute()


@dataclass(frozen=True)
class SweepRecord:
    sweep_id: str
    parent_run_id: str
    tracking_uri: str
    experiment: str
    storage: str  # Tune's storage_path: the sweep's state is in <storage>/<sweep_id>
    spec: dict[str, Any] = field(repr=False)  # SweepSpec.model_dump(mode="json"): plain data travels to workers
    address: str | None = None  # the Ray cluster; None = a local Ray
    tracking_dir: str | None = None  # the embedded server's folder, when that is where the sweep logs

    @cached_property
    def sweep_spec(self) -> SweepSpec:
        return SweepSpec.model_validate(self.spec)

    @property
    def folder(self) -> Path:
        return Path(self.storage) / self.sweep_id

    def save(self) -> Path:
        """Write the resume file (atomically: a kill never leaves half a record)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / RECORD_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, sweep: str | Path, storage: str | Path | None = None) -> SweepRecord:
        """The record of ``sweep`` (an id in ``storage``, or the sweep's folder); its storage is where it was
        found, so a moved results folder still resumes."""
        storage = Path(storage or default_storage()).absolute()
        folder = Path(sweep).absolute() if Path(sweep).is_dir() else storage / str(sweep)
        path = folder / RECORD_FILE
        if not path.exists():
            known = sorted(p.name for p in storage.iterdir() if (p / RECORD_FILE).exists()) if storage.exists() else []
            raise SpecError(f"sweep {str(sweep)!r}: no {RECORD_FILE} in {folder}; sweeps in {storage}: {known}")
        data = json.loads(path.read_text())
        data.setdefault("experiment", data["spec"]["experiment"])  # records written before the field existed
        data["storage"] = str(folder.parent)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def with_tracking(self, uri: str, embedded_root: str | None) -> SweepRecord:
        """The same sweep reached at another address: the embedded server restarted on another port, or the
        server MLFLOW_TRACKING_URI names (then no embedded server is the driver's to keep up)."""
        return replace(self, tracking_uri=uri, tracking_dir=embedded_root)


@dataclass
class SweepResult:
    """How a launch (or resume) of a sweep ended."""

    record: SweepRecord
    trials: int
    errors: int
    best: dict[str, Any] | None
    unfinished: int = 0  # trials neither finished nor failed (the sweep was interrupted): resume them

    sweep_id = property(lambda self: self.record.sweep_id)
    parent_run_id = property(lambda self: self.record.parent_run_id)
    experiment = property(lambda self: self.record.experiment)

    def summary(self) -> dict[str, Any]:
        """What the parent run keeps as sweep_result.json."""
        return {"sweep_id": self.record.sweep_id, "parent_run_id": self.record.parent_run_id,
                "storage": str(self.record.folder), "trials": self.trials, "errors": self.errors,
                "unfinished": self.unfinished, "best": self.best}
