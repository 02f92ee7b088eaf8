"""Best runs and seed-averaged comparisons of a study's trial runs.

"Best" ranks by the **final** (last logged) value of a metric, which is what MLflow's ``order_by`` sorts on
and what the server can rank without reading every metric history. That is the intended meaning here:
``val/robust_acc/*`` and other end-of-trial metrics are logged once, and a per-epoch metric's final value is
the model that was kept. Selection is on a validation metric; its ``test/`` twin is shown beside it, never
used to choose. Only FINISHED trial runs count (a running trial's last value is not final).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from tracking.connection import configure_client
from tracking.logger import ROLE_TAG, SWEEP_TAG, TRIAL_TAG, metric_key

DEFAULT_METRIC = "val/robust_acc/worst_case"
SEED_PARAM = re.compile(r"(^|[./_])seed$")  # "seed", "train.seed", "data.split_seed"…: what compare averages over
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_SWEEP_ID = re.compile(r"[\w.:-]+")  # what a sweep id may look like (and safe to quote in a filter)


class QueryError(LookupError):
    """An unknown experiment or a filter the server rejects."""


@dataclass
class Stat:
    mean: float
    std: float  # sample standard deviation (n-1); NaN when n < 2
    n: int


@dataclass
class Group:
    """Trial runs that share every parameter except the seed: one configuration, several seeds."""

    params: dict[str, str]
    runs: list = field(default_factory=list)

    def stat(self, metric: str) -> Stat:
        values = [r.data.metrics[metric] for r in self.runs if _finite(r.data.metrics.get(metric))]
        if not values:
            return Stat(math.nan, math.nan, 0)
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return Stat(statistics.fmean(values), std, len(values))


def client_for(tracking_uri: str) -> MlflowClient:
    configure_client()
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``; a QueryError listing the experiments that exist otherwise."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage != "active":
        raise _no_experiment(client, name)
    return experiment.experiment_id


def resolve_target(client: MlflowClient, target: str) -> tuple[str, str | None, str | None]:
    """(experiment, sweep id, parent run id) of what a user names for a report or an ablation: an experiment name,
    a sweep id (tag ``gce.sweep_id``) or a run id — a sweep's parent run, or a trial's, which stands for its sweep
    so that nothing is logged to a trial. A run outside any sweep stands for its experiment. QueryError otherwise."""
    if _RUN_ID.fullmatch(target):
        try:
            run = client.get_run(target)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise QueryError(f"no run {target} on the tracking server") from err
        experiment = client.get_experiment(run.info.experiment_id).name
        sweep_id = run.data.tags.get(SWEEP_TAG)
        if sweep_id is None:
            return experiment, None, None
        if run.data.tags.get(ROLE_TAG) == "sweep":
            return experiment, sweep_id, run.info.run_id
        parent = _sweep_parent(client, [run.info.experiment_id], sweep_id)
        return experiment, sweep_id, parent.info.run_id if parent else None
    found = client.get_experiment_by_name(target)
    if found is not None and found.lifecycle_stage == "active":
        return target, None, None
    if _SWEEP_ID.fullmatch(target):
        ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
        parent = _sweep_parent(client, ids, target) if ids else None
        if parent is not None:
            return client.get_experiment(parent.info.experiment_id).name, target, parent.info.run_id
    raise _no_experiment(client, target, " (nor is it a sweep id or a run id)")


def _sweep_parent(client: MlflowClient, experiment_ids: list[str], sweep_id: str):
    runs = client.search_runs(experiment_ids, f"tags.`{SWEEP_TAG}` = '{sweep_id}' AND tags.`{ROLE_TAG}` = 'sweep'",
                              max_results=1)
    return runs[0] if runs else None


def _no_experiment(client: MlflowClient, name: str, also: str = "") -> QueryError:
    known = sorted(e.name for e in client.search_experiments(max_results=200))
    return QueryError(f"no experiment {name!r} on the tracking server{also}; known: {', '.join(known) or 'none'}")


def held_out_metric(metric: str) -> str | None:
    """The held-out counterpart shown beside a validation metric: val/x → test/x."""
    return "test/" + metric[4:] if metric.startswith("val/") else None


def best_runs(client: MlflowClient, experiment: str, metric: str = DEFAULT_METRIC, mode: str = "max", top: int = 10,
              filter_string: str = "") -> list:
    """The ``top`` finished trial runs by the final value of ``metric`` (``mode`` max or min), best first.
    ``filter_string`` is MLflow's search syntax, e.g. ``params.`loss.name` = 'gce'``; runs without the
    metric are left out."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be max or min, got {mode!r}")
    metric = metric_key(metric)
    order = [f"metrics.`{metric}` {'DESC' if mode == 'max' else 'ASC'}", "attributes.start_time ASC"]
    chosen: list = []
    for run in _trial_runs(client, experiment_id(client, experiment), filter_string, order, page=max(top, 50)):
        if not _finite(run.data.metrics.get(metric)):
            break  # the server sorts runs without the metric (or NaN) last
        chosen.append(run)
        if len(chosen) == top:
            break
    return chosen


def compare_runs(client: MlflowClient, experiment: str, metric: str = DEFAULT_METRIC, mode: str = "max",
                 filter_string: str = "", ignore: Iterable[str] = ()) -> list[Group]:
    """Finished trial runs grouped by configuration (all params but seeds and ``ignore``), best mean first."""
    ignore, metric = set(ignore), metric_key(metric)
    groups: dict[tuple, Group] = {}
    for run in _trial_runs(client, experiment_id(client, experiment), filter_string, None):
        params = {k: v for k, v in run.data.params.items() if not SEED_PARAM.search(k) and k not in ignore}
        key = tuple(sorted(params.items()))
        groups.setdefault(key, Group(params)).runs.append(run)
    sign = -1.0 if mode == "max" else 1.0

    def rank(group: Group) -> tuple:
        mean = group.stat(metric).mean
        return (math.isnan(mean), sign * mean if not math.isnan(mean) else 0.0)

    return sorted(groups.values(), key=rank)


def sweep_filter(sweep_id: str | None) -> str:
    """The search filter of one sweep's runs ("" for a whole experiment)."""
    return f"tags.`{SWEEP_TAG}` = '{sweep_id}'" if sweep_id else ""


def data_mismatch(groups: Iterable[Group]) -> str | None:
    """A warning when the compared runs were trained on different data (their ``gce.data_digest`` differs:
    other files, another version of a package's data): their numbers are not comparable. None otherwise."""
    from tracking.logger import DATA_DIGEST_TAG

    runs: dict[str, int] = {}
    for group in groups:
        for run in group.runs:
            digest = run.data.tags.get(DATA_DIGEST_TAG)
            if digest:
                runs[digest] = runs.get(digest, 0) + 1
    if len(runs) < 2:
        return None
    counts = ", ".join(f"{d} ({n} run{'s' if n > 1 else ''})" for d, n in sorted(runs.items(), key=lambda t: -t[1]))
    return (f"warning: these runs were trained on different data ({DATA_DIGEST_TAG}: {counts}); narrow the "
            f"comparison with --filter \"tags.`{DATA_DIGEST_TAG}` = '<digest>'\"")


def varying_params(param_sets: Iterable[dict[str, str]]) -> list[str]:
    """Parameter names whose value differs between the given runs or groups (the ones worth a column)."""
    param_sets = list(param_sets)
    keys = sorted({k for p in param_sets for k in p})
    return [k for k in keys if len({p.get(k) for p in param_sets}) > 1]


def _trial_runs(client: MlflowClient, exp_id: str, filter_string: str, order_by: list[str] | None,
                page: int = 1000):
    """Finished runs of the experiment that are trials (or carry no role tag: runs logged by other tools)."""
    where = " AND ".join(c for c in ("attributes.status = 'FINISHED'", filter_string.strip()) if c)
    token = None
    while True:
        try:
            runs = client.search_runs([exp_id], where, ViewType.ACTIVE_ONLY, max_results=page, order_by=order_by,
                                      page_token=token)
        except MlflowException as err:
            if err.error_code != "INVALID_PARAMETER_VALUE":
                raise
            raise QueryError(f"the server rejected the search {where!r}: {err.message}") from err
        for run in runs:
            if run.data.tags.get(ROLE_TAG, "trial") == "trial" or TRIAL_TAG in run.data.tags:
                yield run
        token = runs.token
        if not token:
            return


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)
