"""Launch and resume sweeps: tracking first, then Ray Tune with the searcher and scheduler the spec names.

The tracking server is resolved (and the embedded one started) before Ray, so an unreachable URI fails in
seconds with its name, not after the first trial. A sweep's Tune state lives in <storage>/<sweep id> beside
its record (``sweeps.record``: spec, parent run, tracking server), which is all ``resume`` needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

from sweeps.callbacks import CURRENT_TRACKING_ENV
from sweeps.record import SweepRecord, SweepResult, default_storage
from sweeps.runtime import check_address, init_ray, reap_dead_sessions
from sweeps.spec import SpecError, SweepSpec

__all__ = ["SweepResult", "default_storage", "resume_sweep", "run_sweep"]


def run_sweep(spec: SweepSpec, *, address: str | None = None, tracking_uri: str | None = None,
              storage: str | Path | None = None, sweep_id: str | None = None, console=None) -> SweepResult:
    """Run every trial of ``spec`` and return where its results are; the spec must already be validated."""
    from sweeps.validate import check_resources
    from tracking.connection import resolve_tracking

    address = address or spec.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_address(address)  # a cluster that is not there fails now, in seconds, naming it
    problems = check_resources(spec, address)
    if problems:
        raise SpecError("resources cannot be met:\n" + "\n".join(f"  - {p}" for p in problems))
    storage = storage or spec.storage_path
    if storage is not None and re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", str(storage)):  # s3://, gs://, file://
        raise SpecError(f"storage: {storage!r} is a URI; give a filesystem path (on a multi-node cluster, a shared "
                        "filesystem mounted at the same path on every node): object stores are not supported yet")
    tracking = resolve_tracking(tracking_uri)
    refuse_loopback(address, tracking.uri, "trials")
    sweep_id = sweep_id or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    # The record before anything else: a driver killed at any later moment leaves a sweep `resume` continues.
    record = SweepRecord(sweep_id, "", tracking.uri, spec.experiment,
                         str(Path(storage or default_storage()).absolute()),
                         spec.model_dump(mode="json"), address, tracking.embedded_root)
    record.save()
    record, logger = _open_parent(record)
    _announce(console, record, logger.experiment_id)
    return _execute(record, restore=False, console=console)


def resume_sweep(sweep: str, *, storage: str | Path | None = None, console=None) -> SweepResult:
    """Continue a sweep after its driver died: finished trials are kept, unfinished ones continue from their
    last checkpoint, and runs orphaned by the dead driver are closed as KILLED before trials reopen theirs."""
    from tracking.connection import resolve_tracking
    from tracking.logger import RunLogger

    record = SweepRecord.load(sweep, storage)
    # The embedded server this sweep logged to is restarted on its own data (its port may have changed),
    # wherever resume is called from; MLFLOW_TRACKING_URI, when set, wins.
    tracking = resolve_tracking(saved=None if record.tracking_dir else record.tracking_uri, root=record.tracking_dir)
    record = record.with_tracking(tracking.uri, tracking.embedded_root)
    refuse_loopback(record.address, tracking.uri, "trials")
    found = RunLogger(record.tracking_uri, record.experiment).find_run(record.sweep_id)
    if record.parent_run_id and (found is None or found.info.run_id != record.parent_run_id):
        raise SpecError(f"sweep {record.sweep_id}: its parent run {record.parent_run_id} is not on "
                        f"{record.tracking_uri}; point MLFLOW_TRACKING_URI at the server the sweep logged to")
    reaped = reap_dead_sessions(record.folder)
    record, logger = _open_parent(record)  # reopened (or created, when the driver died before it could)
    restore = _restorable(record.folder)
    # Without Tune's state the sweep starts afresh under its id: runs of trials Tune never recorded cannot be
    # continued (a new Tuner names its trials anew), so they are discarded rather than left beside the new ones.
    discarded = [] if restore else logger.discard_trials(record.sweep_id)
    closed = logger.close_orphans(record.sweep_id)
    if console is not None:
        how = "continuing from Tune's state" if restore else \
            f"Tune had saved no state yet: starting afresh, {len(discarded)} unrecorded trial run(s) discarded"
        console.print(f"resuming sweep {record.sweep_id}: {how}; closed {len(closed)} orphaned run(s) as KILLED"
                      + (f"; ended {reaped} process(es) left by the dead driver's Ray" if reaped else ""))
        _announce(console, record, logger.experiment_id)
    return _execute(record, restore=restore, console=console)


def _open_parent(record: SweepRecord):
    """The sweep's parent run, RUNNING: created once (then found by the sweep id) with the spec and the sweep's
    params; its id goes into the record. Returns (record, RunLogger)."""
    from tracking.logger import RunLogger, spec_hash

    spec = record.sweep_spec
    logger = RunLogger(record.tracking_uri, record.experiment)
    parent = logger.start_sweep(record.sweep_id, spec_name=spec.name, spec_hash=spec_hash(record.spec),
                                ray_address=record.address)
    if parent != record.parent_run_id:
        logger.log_spec(parent, record.spec)
        logger.log_params(parent, {"sweep.trials": spec.trial_count(), "sweep.search": spec.search.algorithm,
                                   "sweep.scheduler": spec.scheduler.name, "sweep.seeds": spec.seeds})
        record = replace(record, parent_run_id=parent)
        _describe(record, logger)
        record.save()
    return record, logger


def _describe(record: SweepRecord, logger) -> None:
    """The parent run's description and the sweep's view in the UI (tracking.views): its trials, with the
    factors and the objective as columns."""
    from tracking.queries import held_out_metric
    from tracking.views import dimension_text, encode, sweep_description, sweep_view, view_tag

    spec = record.sweep_spec
    flat = spec.trial_config({}, spec.seeds[0]).to_flat()
    factors = [k if k in flat else f"train.{k}" if f"train.{k}" in flat else k for k in spec.space]
    objectives = [(o.metric, o.mode) for o in spec.objectives]
    metrics = [m for m, _ in objectives] + [held_out_metric(m) for m, _ in objectives] + ["val/clean_acc"]
    view = sweep_view(record.sweep_id, [*factors, "train.seed"], [m for m in metrics if m],
                      objectives[0][0], objectives[0][1] == "min")
    logger.share_view(view_tag(record.sweep_id), encode(view))
    logger.set_description(record.parent_run_id, sweep_description(
        name=spec.name, description=spec.description, sweep_id=record.sweep_id, experiment=record.experiment,
        parent_run_id=record.parent_run_id, trials=spec.trial_count(), search=spec.search.algorithm,
        scheduler=spec.scheduler.name, seeds=spec.seeds, objectives=objectives,
        space={k: dimension_text(d.kind, d.values, d.when) for k, d in spec.space.items()}))


def _restorable(folder: Path) -> bool:
    """Whether Tune saved enough to restore: a readable tuner.pkl (a kill can cut its writing short) and at
    least one experiment state."""
    from ray import cloudpickle

    try:
        cloudpickle.loads((folder / "tuner.pkl").read_bytes())
    except Exception:  # missing, truncated or unreadable: nothing Tune can restore from
        return False
    return any(folder.glob("experiment_state-*.json"))


def _announce(console, record: SweepRecord, experiment_id: str) -> None:
    if console is None:
        return
    from tracking.views import sweep_url

    spec = record.sweep_spec
    console.print(f"sweep {record.sweep_id}: {spec.trial_count()} trial(s){spec.stacks_text()}, "
                  f"search {spec.search.algorithm}, scheduler {spec.scheduler.name}")
    console.print(f"MLflow UI: {sweep_url(record.tracking_uri, experiment_id, record.sweep_id)}", soft_wrap=True)
    console.print(f"parent run: {record.parent_run_id}")


def _execute(record: SweepRecord, *, restore: bool, console) -> SweepResult:
    """Ray up, the Tuner built (or restored), fitted, and the sweep's runs closed as its outcome says."""
    # The driver's callbacks (restored from Tune's pickled state on resume) log to where the sweep is now.
    os.environ[CURRENT_TRACKING_ENV] = record.tracking_uri
    try:
        _init_ray(record)
        tuner = _tuner(record, restore, console)
        with _embedded_server_kept_up(record):
            grid = tuner.fit()
    except BaseException as err:  # the driver itself failed or was interrupted: nothing stays RUNNING
        _close_interrupted(record, f"the sweep driver stopped: {type(err).__name__}: {err}")
        raise
    result = _result(record, grid)
    if result.unfinished:  # e.g. Ctrl-C: Tune returns early
        _close_interrupted(record, f"{result.unfinished} trial(s) did not finish; `gce-sweep resume "
                                   f"{record.sweep_id}` continues them")
    else:
        _close_parent(result)
    return result


@contextlib.contextmanager
def _embedded_server_kept_up(record: SweepRecord, every_s: float = 2.0) -> Iterator[None]:
    """While the sweep runs, the embedded server it logs to is started again on its port if its process dies:
    trials buffer their metrics through the outage (tracking.delivery) and reconnect to the same address."""
    if not record.tracking_dir:  # a server of the user's (docker stack, remote): theirs to keep up
        yield
        return
    from tracking.server import revive_server

    port = urlparse(record.tracking_uri).port
    if port is None:
        yield
        return
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(every_s):
            try:
                revive_server(record.tracking_dir, port)
            except Exception:  # e.g. the port was taken meanwhile: try again next round; trials keep buffering
                continue

    thread = threading.Thread(target=watch, name="gce-embedded-server", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()  # a server it is starting gets recorded before the driver goes


def _init_ray(record: SweepRecord) -> None:
    """A local Ray (or the record's cluster) whose workers log in to the tracking server like the driver."""
    from tracking.connection import configure_client

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # keep finished trials across a driver kill
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 is silent; ProgressCallback prints instead
    # Robust metrics (the usual objective) exist only in a trial's last report, not in its per-epoch ones: the
    # spec validator checks objectives against the metric schema instead.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # A failed trial is one console line (ProgressCallback) and its traceback is in its run, not on the screen.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    # A trial killed before its first result has no result file: restoring it is normal, not a warning.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    env = {**configure_client(), "MLFLOW_TRACKING_URI": record.tracking_uri}
    env |= {k: os.environ[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                       "MLFLOW_TRACKING_TOKEN") if os.environ.get(k)}
    init_ray(record, env)


def _tuner(record: SweepRecord, restore: bool, console):
    from ray import tune

    from sweeps.callbacks import RunClosingCallback
    from sweeps.progress import ProgressCallback
    from sweeps.search import param_space, scheduler, searcher
    from sweeps.trainable import train_trial

    spec = record.sweep_spec
    trainable = tune.with_resources(tune.with_parameters(train_trial, record=record),
                                    {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    if restore:
        return tune.Tuner.restore(str(record.folder), trainable, resume_unfinished=True, resume_errored=True)
    callbacks = [RunClosingCallback(record), ProgressCallback(spec, console) if console is not None else None]
    run_config = tune.RunConfig(
        name=record.sweep_id, storage_path=record.storage, verbose=0,
        callbacks=[c for c in callbacks if c is not None],
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # Tune deletes nothing: its deletions race the experiment state (written every second, synced to
        # storage after) so that a killed driver's state could name a checkpoint already gone. Trials prune
        # their own old checkpoints instead (sweeps.trainable._prune_checkpoints).
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None))
    return tune.Tuner(trainable, param_space=param_space(spec), run_config=run_config,
                      tune_config=tune.TuneConfig(search_alg=searcher(spec), scheduler=scheduler(spec),
                                                  num_samples=spec.search.num_samples, reuse_actors=True,
                                                  max_concurrent_trials=spec.max_concurrent_trials))


def _result(record: SweepRecord, grid) -> SweepResult:
    """Counted in trials: a stack of K trials (one Ray trial) counts K, its diverged members as errors."""
    objective = record.sweep_spec.objectives[0]
    metric = objective.metric
    finished = [r for r in grid if r.error is None and r.metrics and metric in r.metrics]
    best = None
    if finished:
        top = (max if objective.mode == "max" else min)(finished, key=lambda r: r.metrics[metric])
        config = top.config
        if "members" in config:  # a stack reports its best member's metrics, and which member that is
            config = config["members"][int(top.metrics.get("stack/best_member", 0))]
        best = {"metric": metric, "value": top.metrics[metric], "config": config}

    def size(r) -> int:
        return len((r.config or {}).get("members") or [None])

    trials = sum(size(r) for r in grid)
    errors = sum(size(r) for r in grid if r.error is not None) + \
        sum(int((r.metrics or {}).get("stack/failed", 0)) for r in grid if r.error is None)
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    if record.sweep_spec.resources.stack > 1:  # in trials: a stack that ended reported its size
        unfinished = sum(size(r) for r in grid if r.error is None and "stack/size" not in (r.metrics or {}))
    return SweepResult(record, trials, errors, best, unfinished)


def refuse_loopback(address: str | None, uri: str, who: str) -> None:
    """Workers on a Ray cluster cannot log to this machine's loopback: refuse before anything starts, unless
    every node of the cluster is this machine (a workstation's own ``ray start --head``, a test's cluster)."""
    if not address or not _loopback(uri):
        return
    from sweeps.runtime import remote_nodes

    remote = remote_nodes(address)
    if remote:
        raise SpecError(f"tracking: {who} on the Ray cluster {address} cannot reach {uri} (this machine's "
                        f"loopback) from its node(s) at {', '.join(remote)}; set MLFLOW_TRACKING_URI to a server "
                        "the workers can reach (e.g. the docker stack's)")


def _loopback(uri: str) -> bool:
    host = uri.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost", "[::1]")


def _close_interrupted(record: SweepRecord, reason: str) -> None:
    """End every RUNNING run of the sweep as KILLED, parent included, with how to resume."""
    from tracking.logger import RunLogger

    logger = RunLogger(record.tracking_uri, record.experiment)
    logger.close_orphans(record.sweep_id)
    logger.set_tags(record.parent_run_id, {"gce.resume": f"gce-sweep resume {record.sweep_id}"})
    logger.end_run(record.parent_run_id, "KILLED", error=reason)


def _close_parent(result: SweepResult) -> None:
    from gce.metrics import SWEEP_BEST, SWEEP_ERRORS, SWEEP_TRIALS
    from tracking.logger import RunLogger

    record = result.record
    logger = RunLogger(record.tracking_uri, record.experiment)
    # Once per value: a resumed sweep (or one whose driver died while closing) logs only what changed, at the
    # step of its resume count, so no (metric, step) is ever stored twice.
    run = logger.run(record.parent_run_id)
    values = {SWEEP_TRIALS: result.trials, SWEEP_ERRORS: result.errors,
              **({SWEEP_BEST: result.best["value"]} if result.best else {})}
    changed = {k: v for k, v in values.items() if run.data.metrics.get(k) != v}
    if changed:
        logger.log_metrics(record.parent_run_id, changed, step=int(run.data.tags.get("gce.resumes", 0)))
    logger.log_spec(record.parent_run_id, result.summary(), "sweep_result.json")
    logger.end_run(record.parent_run_id, "FINISHED" if result.errors == 0 else "FAILED",
                   error=f"{result.errors} trial(s) failed" if result.errors else None)
