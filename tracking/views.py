"""What the MLflow UI shows of a sweep: its trials table (filtered to the sweep, factor and objective columns)
and the parent run's description.

MLflow's UI keeps the columns a user picked in the browser's storage, so a fresh browser sees none of our
params or metrics. It also reads a *shared view* from an experiment tag (``mlflow.sharedViewState.<key>``,
opened with ``?viewStateShareKey=<key>``): the launcher stores one per sweep, and the URL it prints opens it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from urllib.parse import quote

from tracking.logger import ROLE_TAG, SHARED_VIEW_PREFIX, SWEEP_TAG

__all__ = ["WORKFLOW", "column", "sweep_description", "sweep_url", "sweep_view"]

#: MLflow 3's sidebar starts in its GenAI mode (traces, judges, prompts) in a fresh browser; this URL parameter
#: opens the "Model training" one (runs, models) instead.
WORKFLOW = "workflowType=machine_learning"


def column(kind: str, key: str) -> str:
    """The UI's column id: ``params.`loss.name```, ``metrics.`val/clean_acc```, ``attributes.`Dataset```."""
    return f"{kind}.`{key}`"


def sweep_view(sweep_id: str, factors: Iterable[str], metrics: Iterable[str], order_by: str, ascending: bool) -> dict:
    """The shared view of one sweep: its trial runs only (the parent is one click away and would fold them
    away), the factors, seed and metrics as columns, sorted by the objective."""
    metrics = list(dict.fromkeys(metrics))
    columns = [column("attributes", "Dataset"), *(column("params", f) for f in dict.fromkeys(factors)),
               *(column("metrics", m) for m in metrics)]
    return {"searchFilter": f"tags.`{SWEEP_TAG}` = '{sweep_id}' AND tags.`{ROLE_TAG}` = 'trial'",
            "orderByKey": column("metrics", order_by), "orderByAsc": ascending, "lifecycleFilter": "Active",
            "selectedColumns": columns}


def view_tag(sweep_id: str) -> str:
    """The sweep id is the share key: letters, digits, _ . - (the spec name's pattern, a timestamp, hex), which a
    tag name allows."""
    return SHARED_VIEW_PREFIX + sweep_id


def sweep_url(tracking_uri: str, experiment_id: str, sweep_id: str) -> str:
    """The runs table of the sweep (its shared view), or the URI itself for a non-HTTP store."""
    if not tracking_uri.startswith("http"):
        return tracking_uri
    base = tracking_uri.rstrip("/")
    return (f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={quote(sweep_id)}"
            f"&{WORKFLOW}")


def sweep_description(*, name: str, description: str, sweep_id: str, experiment: str, parent_run_id: str,
                      trials: int, search: str, scheduler: str, space: Mapping[str, str], seeds: list[int],
                      objectives: list[tuple[str, str]]) -> str:
    """The parent run's description (Markdown): what the sweep is and how to query it."""
    factors = "\n".join(f"  - `{k}`: {v}" for k, v in space.items()) or "  - none (the base config only)"
    objective = ", ".join(f"`{m}` ({mode})" for m, mode in objectives)
    return (f"**{name}**" + (f": {description}" if description else "") + "\n\n"
            f"- sweep `{sweep_id}`: {trials} trial(s), search {search}, scheduler {scheduler}\n"
            f"- factors:\n{factors}\n  - seeds: {', '.join(map(str, seeds))}\n"
            f"- objective: {objective}\n"
            f"- query: `gce-sweep best {experiment}` · `gce-sweep ablate {parent_run_id}` · "
            f"`gce-sweep report {parent_run_id}` · after a crash: `gce-sweep resume {sweep_id}`\n")


def dimension_text(kind: str, values: list, when: Mapping | None) -> str:
    """``{ce, cot, gce}``, ``loguniform [0.0001, 0.01]``, ``… (when loss.name = gce)``."""
    text = "{" + ", ".join(map(str, values)) + "}" if kind in ("grid", "choice") else f"{kind} {values}"
    if when:
        text += " (when " + ", ".join(f"{k} = {v}" for k, v in when.items()) + ")"
    return text


def encode(view: Mapping) -> str:
    return json.dumps(view, separators=(",", ":"))
