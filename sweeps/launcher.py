"""Launch and resume sweeps: tracking first, then Ray Tune with the searcher and scheduler the spec names.

The tracking server is resolved (and the embedded one started) before Ray, so an unreachable URI fails in
seconds with its name, not after the first trial. A sweep's Tune state lives in <storage>/<sweep id> beside
``gce_sweep.json`` (spec, parent run, tracking URI), which is all ``resume`` needs.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sweeps.spec import SpecError, SweepSpec

__all__ = ["SweepResult", "default_storage", "resume_sweep", "run_sweep"]

STATE_FILE = "gce_sweep.json"


@dataclass
class SweepResult:
    sweep_id: str
    parent_run_id: str
    tracking_uri: str
    experiment: str
    storage: str
    trials: int
    errors: int
    best: dict[str, Any] | None
    unfinished: int = 0  # trials neither finished nor failed (the sweep was interrupted): resume them


def default_storage() -> Path:
    return Path(os.environ.get("GCE_RAY_RESULTS", ".gce-sweeps/ray_results")).absolute()


def run_sweep(spec: SweepSpec, *, address: str | None = None, tracking_uri: str | None = None,
              storage: str | Path | None = None, sweep_id: str | None = None, console=None) -> SweepResult:
    """Run every trial of ``spec`` and return where its results are; the spec must already be validated."""
    from sweeps.validate import check_resources
    from tracking.connection import resolve_tracking_uri
    from tracking.logger import RunLogger, spec_hash
    from tracking.server import default_root

    address = address or spec.address or os.environ.get("RAY_ADDRESS") or None
    problems = check_resources(spec, address)
    if problems:
        raise SpecError("resources cannot be met:\n" + "\n".join(f"  - {p}" for p in problems))
    embedded = tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri or resolve_tracking_uri()
    if address and _loopback(uri):
        raise SpecError(f"tracking: trials on the Ray cluster {address} cannot reach {uri} (this machine's loopback); "
                        "set MLFLOW_TRACKING_URI to a server the workers can reach (e.g. the docker stack's)")
    storage = Path(storage or spec.storage_path or default_storage()).absolute()
    sweep_id = sweep_id or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    logger = RunLogger(uri, spec.experiment)
    parent = logger.start_sweep(sweep_id, spec_name=spec.name, spec_hash=spec_hash(spec.model_dump(mode="json")),
                                ray_address=address)
    logger.log_spec(parent, spec.model_dump(mode="json"))
    logger.log_params(parent, {"sweep.trials": spec.trial_count(), "sweep.search": spec.search.algorithm,
                               "sweep.scheduler": spec.scheduler.name, "sweep.seeds": spec.seeds})
    state = {"sweep_id": sweep_id, "parent_run_id": parent, "tracking_uri": uri, "address": address,
             "tracking_dir": str(default_root()) if embedded else None,
             "spec": spec.model_dump(mode="json")}
    (storage / sweep_id).mkdir(parents=True, exist_ok=True)
    (storage / sweep_id / STATE_FILE).write_text(json.dumps(state, indent=2))
    _announce(console, uri, logger, parent, sweep_id, spec)
    return _execute(state, storage, restore=False, console=console)


def resume_sweep(sweep: str, *, storage: str | Path | None = None, console=None) -> SweepResult:
    """Continue a sweep after its driver died: finished trials are kept, unfinished ones continue from their
    last checkpoint, and runs orphaned by the dead driver are closed as KILLED before trials reopen theirs."""
    from tracking.connection import check_server
    from tracking.logger import RunLogger

    storage = Path(storage or default_storage()).absolute()
    folder = Path(sweep) if Path(sweep).is_dir() else storage / sweep
    if not (folder / STATE_FILE).exists():
        known = sorted(p.name for p in storage.iterdir() if (p / STATE_FILE).exists()) if storage.exists() else []
        raise SpecError(f"sweep {sweep!r}: no {STATE_FILE} in {folder}; sweeps in {storage}: {known}")
    state = json.loads((folder / STATE_FILE).read_text())
    spec = SweepSpec.model_validate(state["spec"])
    if os.environ.get("MLFLOW_TRACKING_URI"):
        state["tracking_uri"] = os.environ["MLFLOW_TRACKING_URI"]
    elif state.get("tracking_dir"):
        # The embedded server this sweep logged to: restart it on its own data (its port may have changed),
        # wherever resume is called from.
        from tracking.server import ensure_server

        state["tracking_uri"] = ensure_server(state["tracking_dir"]).url
    check_server(state["tracking_uri"])
    logger = RunLogger(state["tracking_uri"], spec.experiment)
    parent = logger.find_run(state["sweep_id"])
    if parent is None or parent.info.run_id != state["parent_run_id"]:
        raise SpecError(f"sweep {state['sweep_id']}: its parent run {state['parent_run_id']} is not on "
                        f"{state['tracking_uri']}; point MLFLOW_TRACKING_URI at the server the sweep logged to")
    logger.start_sweep(state["sweep_id"], spec_name=spec.name, spec_hash="")  # reopens the parent run
    closed = logger.close_orphans(state["sweep_id"])
    if console is not None:
        console.print(f"resuming sweep {state['sweep_id']} (closed {len(closed)} orphaned run(s) as KILLED)")
    return _execute(state, folder.parent, restore=True, console=console)


def _announce(console, uri: str, logger, parent: str, sweep_id: str, spec: SweepSpec) -> None:
    if console is None:
        return
    url = f"{uri.rstrip('/')}/#/experiments/{logger.experiment_id}/runs/{parent}" if uri.startswith("http") else uri
    console.print(f"sweep {sweep_id}: {spec.trial_count()} trial(s), search {spec.search.algorithm}, "
                  f"scheduler {spec.scheduler.name}")
    console.print(f"MLflow UI: {url}\nparent run: {parent}")


def _execute(state: dict[str, Any], storage: Path, *, restore: bool, console) -> SweepResult:
    import ray
    from ray import tune

    from sweeps.callbacks import ProgressCallback, RunClosingCallback
    from sweeps.search import param_space, scheduler, searcher
    from sweeps.trainable import SweepContext, train_trial
    from tracking.connection import configure_client

    spec = SweepSpec.model_validate(state["spec"])
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # keep finished trials across a driver kill
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 is silent; ProgressCallback prints instead
    # Robust metrics (the usual objective) exist only in a trial's last report, not in its per-epoch ones.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    env = {**configure_client(), "MLFLOW_TRACKING_URI": state["tracking_uri"]}
    env |= {k: os.environ[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                       "MLFLOW_TRACKING_TOKEN") if os.environ.get(k)}  # trials log in like the driver
    if not ray.is_initialized():
        if state["address"]:
            ray.init(address=state["address"], runtime_env={"env_vars": env}, logging_level="WARNING")
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(include_dashboard=False, runtime_env={"env_vars": env}, logging_level="WARNING")
    context = SweepContext(state["spec"], state["sweep_id"], state["parent_run_id"], state["tracking_uri"],
                           spec.experiment)
    trainable = tune.with_resources(tune.with_parameters(train_trial, context=context),
                                    {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    objectives = [(o.metric, o.mode) for o in spec.objectives]
    callbacks = [RunClosingCallback(state["tracking_uri"], spec.experiment, state["sweep_id"], spec.scheduler.name),
                 ProgressCallback(objectives, spec.trial_count(), console) if console is not None else None]
    run_config = tune.RunConfig(
        name=state["sweep_id"], storage_path=str(storage), verbose=0,
        callbacks=[c for c in callbacks if c is not None],
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # Two, not one: the experiment state written before a driver dies may still name the previous
        # checkpoint, which must then still exist for `resume`.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2))
    if restore:
        tuner = tune.Tuner.restore(str(storage / state["sweep_id"]), trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space(spec), run_config=run_config,
                           tune_config=tune.TuneConfig(search_alg=searcher(spec), scheduler=scheduler(spec),
                                                       num_samples=spec.search.num_samples, reuse_actors=True,
                                                       max_concurrent_trials=spec.max_concurrent_trials))
    try:
        grid = tuner.fit()
    except BaseException as err:  # the driver itself failed or was interrupted: nothing stays RUNNING
        _close_interrupted(state, spec, f"the sweep driver stopped: {type(err).__name__}: {err}")
        raise
    unfinished = len(grid) - grid.num_terminated - grid.num_errors  # e.g. Ctrl-C: Tune returns early
    best = None
    metric, mode = objectives[0]
    finished = [r for r in grid if r.error is None and r.metrics and metric in r.metrics]
    if finished:
        top = (max if mode == "max" else min)(finished, key=lambda r: r.metrics[metric])
        best = {"metric": metric, "value": top.metrics[metric], "config": top.config}
    result = SweepResult(state["sweep_id"], state["parent_run_id"], state["tracking_uri"], spec.experiment,
                         str(storage / state["sweep_id"]), len(grid), grid.num_errors, best, unfinished)
    if unfinished:
        _close_interrupted(state, spec, f"{unfinished} trial(s) did not finish; `gce-sweep resume "
                                        f"{state['sweep_id']}` continues them")
    else:
        _close_parent(state, spec, result)
    return result


def _loopback(uri: str) -> bool:
    host = uri.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost", "[::1]")


def _close_interrupted(state: dict[str, Any], spec: SweepSpec, reason: str) -> None:
    """End every RUNNING run of the sweep as KILLED, parent included, with how to resume."""
    from tracking.logger import RunLogger

    logger = RunLogger(state["tracking_uri"], spec.experiment)
    logger.close_orphans(state["sweep_id"])
    logger.set_tags(state["parent_run_id"], {"gce.resume": f"gce-sweep resume {state['sweep_id']}"})
    logger.end_run(state["parent_run_id"], "KILLED", error=reason)


def _close_parent(state: dict[str, Any], spec: SweepSpec, result: SweepResult) -> None:
    from tracking.logger import RunLogger

    logger = RunLogger(state["tracking_uri"], spec.experiment)
    logger.log_metrics(state["parent_run_id"], {"sweep/trials": result.trials, "sweep/errors": result.errors,
                                                **({"sweep/best": result.best["value"]} if result.best else {})})
    logger.log_spec(state["parent_run_id"], asdict(result), "sweep_result.json")
    logger.end_run(state["parent_run_id"], "FINISHED" if result.errors == 0 else "FAILED",
                   error=f"{result.errors} trial(s) failed" if result.errors else None)
