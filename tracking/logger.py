"""Sweep and trial runs on ``MlflowClient`` with explicit run ids.

No fluent ``mlflow.start_run`` state: concurrent trials in one process (Ray actors, threads) would share it.
One experiment per study, one parent run per sweep, one child run per trial. Runs are found again by tags
(sweep id, trial id), so a resumed sweep or trial continues its own run and never creates a duplicate.

The server may go away mid-sweep: metrics, params and tags are queued and every call is retried through an
outage, up to ``max_outage_s`` (``tracking.delivery``), so a trial keeps training and nothing is dropped.

MLflow names allow only letters, digits and ``_ - . / space``: ``metric_key`` turns any other character into
``_``, so ``val/robust_acc/pgd/eps=0.3`` is stored (and queried) as ``val/robust_acc/pgd/eps_0.3``.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from tracking import plots
from tracking.connection import configure_client
from tracking.delivery import Delivery

SWEEP_TAG, TRIAL_TAG, ROLE_TAG = "gce.sweep_id", "gce.trial_id", "gce.role"
ENDED = ("FINISHED", "FAILED", "KILLED")
_BATCH = 100  # MLflow accepts at most 100 params or tags per log_batch call (and 1000 metrics)
_INVALID_NAME = re.compile(r"[^/\w.\- ]")  # MLflow's rule on every OS (colons are refused on Windows)
# MLflow 3's UI opens an experiment without this tag in its GenAI mode (traces, token usage); with it, on the
# training runs table.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
DATA_DIGEST_TAG = "gce.data_digest"  # the whole dataset's content hash: `compare` warns when runs differ in it
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # an experiment tag the UI reads for ?viewStateShareKey=<key>
_PACKAGES = ("gce-sweeps", "torch", "torchvision", "ray", "mlflow", "optuna", "numpy")


class RunLogger:
    """Logs one study (an MLflow experiment) to the server at ``tracking_uri``.

    ``max_outage_s``: how long calls may wait for an unreachable server before TrackingUnavailable (default
    $GCE_TRACKING_MAX_OUTAGE_S, else 300 s); meanwhile metrics, params and tags are buffered.
    """

    def __init__(self, tracking_uri: str, experiment: str, *, max_outage_s: float | None = None):
        configure_client()
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.delivery = Delivery(self.client, tracking_uri, max_outage_s)
        self.experiment_id = self.delivery.call(get_or_create_experiment, self.client, experiment)

    # --- runs ---------------------------------------------------------------------------------------------------
    def start_sweep(self, sweep_id: str, *, spec_name: str, spec_hash: str, ray_address: str | None = None,
                    tags: Mapping[str, str] | None = None) -> str:
        """The parent run of ``sweep_id`` (created once, set RUNNING again on resume), with its provenance."""
        all_tags = {SWEEP_TAG: sweep_id, ROLE_TAG: "sweep", "gce.spec_name": spec_name, "gce.spec_hash": spec_hash,
                    "gce.ray_address": ray_address or "local", **provenance(), **(tags or {})}
        run_id, found = self.delivery.call(self._find_or_create, sweep_id, None, all_tags, f"{spec_name}-{sweep_id}")
        return self._resume(found) if found is not None else run_id

    def start_trial(self, sweep_id: str, trial_id: str, params: Mapping[str, object] | None = None, *,
                    parent_run_id: str | None = None, run_name: str | None = None, description: str = "") -> str:
        """The child run of one trial: found by (sweep id, trial id) and continued, or created with ``params``
        (the flat config). Params are immutable in MLflow, so a resumed run keeps those it was created with."""
        tags = {SWEEP_TAG: sweep_id, TRIAL_TAG: trial_id, ROLE_TAG: "trial"}
        if description:
            tags[MLFLOW_RUN_NOTE] = description
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run_id, found = self.delivery.call(self._find_or_create, sweep_id, trial_id, tags, run_name or trial_id)
        if found is not None:
            return self._resume(found)
        if params:
            self.log_params(run_id, params)
        return run_id

    def find_run(self, sweep_id: str, trial_id: str | None = None):
        """The sweep's parent run (no ``trial_id``) or a trial's run, or None; the oldest if ever several."""
        return self.delivery.call(self._find, sweep_id, trial_id)

    def _find_or_create(self, sweep_id: str, trial_id: str | None, tags: dict, run_name: str):
        """(run id, the run found or None). Retried whole: a create whose answer was lost is found next time."""
        found = self._find(sweep_id, trial_id)
        if found is not None:
            return found.info.run_id, found
        return self.client.create_run(self.experiment_id, tags=tags, run_name=run_name).info.run_id, None

    def _find(self, sweep_id: str, trial_id: str | None):
        clauses = [f"tags.`{SWEEP_TAG}` = '{_quoted(sweep_id)}'"]
        clauses.append(f"tags.`{TRIAL_TAG}` = '{_quoted(trial_id)}'" if trial_id is not None
                       else f"tags.`{ROLE_TAG}` = 'sweep'")
        runs = self.client.search_runs([self.experiment_id], " AND ".join(clauses), ViewType.ACTIVE_ONLY,
                                       max_results=1, order_by=["attributes.start_time ASC"])
        return runs[0] if runs else None

    def end_run(self, run_id: str, status: str = "FINISHED", *, error: BaseException | str | None = None,
                stop_reason: str | None = None) -> None:
        """Close a run as FINISHED, FAILED (``error`` kept as a tag) or KILLED; ``stop_reason`` records why a
        scheduler stopped a trial early (it still ends FINISHED)."""
        if status not in ENDED:
            raise ValueError(f"run status must be one of {', '.join(ENDED)}, got {status!r}")
        tags = {}
        if error is not None:
            text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
            tags["error"] = text[-8000:]  # MLflow's tag limit; the end of a traceback says the most
        if stop_reason:
            tags["stop_reason"] = stop_reason
        if tags:
            self.set_tags(run_id, tags)
        self.delivery.call(self.client.set_terminated, run_id, status)  # after everything queued for the run

    def run(self, run_id: str):
        """The run as the server holds it (its latest metric values, tags, status)."""
        return self.delivery.call(self.client.get_run, run_id)

    def discard_trials(self, sweep_id: str) -> list[str]:
        """Delete (MLflow's soft delete) the sweep's trial runs: those of an attempt whose trials Tune never
        recorded, which a fresh start would otherwise leave beside its own. Returns the run ids."""
        runs = self._kill_trials(sweep_id, "", "discarded: its sweep restarted before Tune recorded it")
        for run_id in runs:
            self.delivery.call(self.client.delete_run, run_id)
        return runs

    def clear_error(self, run_id: str, run=None) -> None:
        """Drop the ``error`` tag of an earlier, failed attempt of a run that is being retried (``run``: the run
        as already fetched, to spare a request)."""
        if "error" in (run or self.run(run_id)).data.tags:
            self.delivery.call(self.client.delete_tag, run_id, "error")

    def close_orphans(self, sweep_id: str, keep: Iterable[str] = ()) -> list[str]:
        """End as KILLED the sweep's trial runs still RUNNING (their driver died), except ``keep``; a resumed
        trial then reopens its own run with ``start_trial``. Returns the closed run ids."""
        return self._kill_trials(sweep_id, " AND attributes.status = 'RUNNING'",
                                 "orphaned: its driver stopped without ending it", keep)

    def _kill_trials(self, sweep_id: str, condition: str, why: str, keep: Iterable[str] = ()) -> list[str]:
        """End the sweep's trial runs matching ``condition`` as KILLED, saying ``why``; their ids."""
        keep = set(keep)
        where = f"tags.`{SWEEP_TAG}` = '{_quoted(sweep_id)}' AND tags.`{ROLE_TAG}` = 'trial'{condition}"
        runs = [r.info.run_id for r in self._search_all(where) if r.info.run_id not in keep]
        for run_id in runs:
            self.set_tags(run_id, {"gce.closed_as": why})
            self.delivery.call(self.client.set_terminated, run_id, "KILLED")
        return runs

    # --- data ---------------------------------------------------------------------------------------------------
    def log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        items = [Param(metric_key(str(k)), _param_value(v)) for k, v in params.items()]
        self.delivery.send(run_id, "params", items, _BATCH)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0,
                    timestamp_ms: int | None = None) -> None:
        """All of an epoch's metrics in one request (one log_batch, not one call per metric). The timestamp is
        taken now, so points buffered through an outage keep the time they were measured."""
        ts = timestamp_ms or int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), ts, step) for k, v in metrics.items()]
        self.delivery.send(run_id, "metrics", items, 1000)

    def set_tags(self, run_id: str, tags: Mapping[str, object]) -> None:
        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        self.delivery.send(run_id, "tags", items, _BATCH)

    def share_view(self, tag: str, view: str) -> None:
        """An experiment tag holding a UI view (``tracking.views``)."""
        self.delivery.call(self.client.set_experiment_tag, self.experiment_id, tag, view)

    def set_description(self, run_id: str, text: str) -> None:
        """The run's description in the UI (Markdown)."""
        self.set_tags(run_id, {MLFLOW_RUN_NOTE: text})

    def monitor_system(self, run_id: str, interval_s: float):
        """MLflow's system-metrics sampler on ``run_id`` (``system/*``, one point per interval), continuing the
        run's step count (a retried trial appends, never overwrites). Returns it; ``.finish()`` stops it."""
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # no "started monitoring" lines
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                       tracking_uri=self.tracking_uri)
        monitor.start()
        return monitor

    def log_datasets(self, run_id: str, data) -> None:
        """The run's train, validation and test splits as MLflow dataset inputs (the UI's Datasets column,
        ``datasets.*`` search): each with a digest of its own content, its size and where it came from. The
        server keeps one input per (dataset, digest), so a retried trial logging them again adds nothing."""
        name = data.info.name
        inputs = []
        for context, split in (("train", data.train), ("validation", data.val), ("test", data.test)):
            profile = {"num_examples": len(split), "shape": list(split.images.shape[1:]),
                       "classes": data.info.num_classes, "dataset_digest": data.digest}
            source = json.dumps({"source": split.source or "unknown", "dataset": name})
            dataset = Dataset(f"{name}-{context}", split.digest, "gce", source, profile=json.dumps(profile))
            inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        for attempt in range(4):
            try:
                self.delivery.call(self.client.log_inputs, run_id, inputs)
                break
            except MlflowException as err:
                # Two trials on the same data logging at once: the server inserts the shared dataset row twice and
                # refuses the second (its check-then-insert is not atomic). Again, it finds the row and links it.
                if attempt == 3 or not _concurrent_insert(err):
                    raise
                time.sleep(0.1 * (attempt + 1))
        self.set_tags(run_id, {DATA_DIGEST_TAG: data.digest})

    def flush(self) -> None:
        """Send everything queued, waiting for the server up to ``max_outage_s`` (TrackingUnavailable after)."""
        self.delivery.flush()

    @property
    def pending(self) -> dict[str, int]:
        """What is queued and not yet stored: metric points, params and tags."""
        return self.delivery.pending

    @property
    def retries(self) -> int:
        """Failed attempts that were retried (an outage, a locked database)."""
        return self.delivery.retries

    @property
    def max_outage_s(self) -> float:
        return self.delivery.max_outage_s

    # --- artifacts ----------------------------------------------------------------------------------------------
    def log_spec(self, run_id: str, spec: Mapping, artifact_file: str = "spec.yaml") -> None:
        """The resolved spec, so the run can be reproduced from what it actually ran."""
        self.delivery.call(self.client.log_dict, run_id, json.loads(json.dumps(spec, default=str)), artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.delivery.call(self.client.log_text, run_id, text, artifact_file)

    def log_checkpoint(self, run_id: str, path: Path | str, artifact_path: str = "checkpoints") -> None:
        self.delivery.call(self.client.log_artifact, run_id, str(path), artifact_path)

    def log_figure(self, run_id: str, figure, name: str) -> None:
        self.delivery.call(self.client.log_figure, run_id, figure, f"plots/{name}")

    def log_robustness_curves(self, run_id: str, curves: Mapping[str, Mapping[float, float]],
                              clean_acc: float | None = None, name: str = "robustness_curves.png") -> None:
        self.log_figure(run_id, plots.robustness_curves(curves, clean_acc), name)

    def log_confusion_matrix(self, run_id: str, matrix, class_names=None, name: str = "confusion_matrix.png") -> None:
        self.log_figure(run_id, plots.confusion_matrix(matrix, class_names), name)

    def log_embedding(self, run_id: str, coords, labels, class_names=None, name: str = "embedding.png") -> None:
        self.log_figure(run_id, plots.embedding_scatter(coords, labels, class_names), name)

    def log_adversarial_grid(self, run_id: str, clean, adversarial, labels, clean_preds=None, adv_preds=None,
                             name: str = "adversarial_examples.png") -> None:
        self.log_figure(run_id, plots.adversarial_grid(clean, adversarial, labels, clean_preds, adv_preds), name)

    # --- helpers ------------------------------------------------------------------------------------------------
    def _resume(self, run) -> str:
        run_id = run.info.run_id
        resumes = int(run.data.tags.get("gce.resumes", "0")) + 1
        self.set_tags(run_id, {"gce.resumes": resumes})
        if run.info.status != "RUNNING":
            self.delivery.call(self.client.update_run, run_id, status="RUNNING")
        return run_id

    def _search_all(self, where: str) -> list:
        runs, token = [], None
        while True:
            page = self.delivery.call(self.client.search_runs, [self.experiment_id], where, ViewType.ACTIVE_ONLY,
                                      page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing (safe when trials race to create it)."""
    for _ in range(2):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage != "active":
                raise MlflowException(f"experiment {name!r} is deleted; restore it in the MLflow UI or choose "
                                      "another experiment name")
            if EXPERIMENT_KIND[0] not in experiment.tags:  # created before this tag, or by hand: a kind the user
                client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)  # chose is left alone
            return experiment.experiment_id
        try:
            return client.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
        except MlflowException as err:  # another trial created it between our lookup and create
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
    raise MlflowException(f"could not create or find experiment {name!r}")


def provenance() -> dict[str, str]:
    """Tags that say what code produced a sweep: git commit (and whether the tree was dirty), package versions."""
    tags = {"gce.python": sys.version.split()[0]}
    for package in _PACKAGES:
        try:
            tags[f"gce.version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags[MLFLOW_GIT_COMMIT] = tags["gce.git_commit"] = commit
        tags["gce.git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
    return tags


def metric_key(name: str) -> str:
    """``name`` with every character MLflow refuses in metric and param names replaced by ``_``."""
    return _INVALID_NAME.sub("_", name)


def spec_hash(spec: Mapping) -> str:
    """A short content hash of a resolved spec (key order does not matter)."""
    canonical = json.dumps(spec, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _concurrent_insert(err: MlflowException) -> bool:
    """The server lost a race to insert a row another request inserted first (SQLite's or PostgreSQL's words)."""
    text = str(err)
    return "UNIQUE constraint failed" in text or "duplicate key value" in text or "IntegrityError" in text


def _param_value(value: object) -> str:
    text = json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)
    return text if len(text) <= 6000 else text[:5990] + "…"


def _quoted(value: str) -> str:
    if "'" in value or "\\" in value:
        raise ValueError(f"ids used in run tags may not contain quotes or backslashes: {value!r}")
    return value


__all__ = ["DATA_DIGEST_TAG", "EXPERIMENT_KIND", "SHARED_VIEW_PREFIX", "RunLogger", "get_or_create_experiment",
           "metric_key", "provenance", "spec_hash"]
