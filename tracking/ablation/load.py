"""An ablation's observations from MLflow: one per finished trial run and ε.

The objective's robust-accuracy family is read at every ε (``<split>/robust_acc/worst_case/eps_<ε>`` for the
headline ``val/robust_acc/worst_case``), so ε is a factor beside the params that vary across the runs. The loss is
*one* factor, named as papers do (``CE``, ``GCE α=1/3``): α exists only for GCE, so a factor "α" across all runs
would be the loss name in disguise. When α takes several values, its effect is analysed again within the runs that
have it (``α``, GCE runs only).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import yaml
from mlflow.exceptions import MlflowException

from gce.metrics import SPLITS, format_eps, parse_robust, worst_case_key
from tracking.ablation.analysis import Ablation
from tracking.ablation.effects import EPS, LOSS, Factor, Observation, _natural
from tracking.labels import config_label, factor_label, value_label
from tracking.logger import ROLE_TAG, metric_key
from tracking.queries import (
    DEFAULT_METRIC,
    SEED_PARAM,
    QueryError,
    compare_runs,
    experiment_id,
    resolve_target,
    sweep_filter,
    varying_params,
)

__all__ = ["AblationError", "factors_of", "load_ablation"]

_PROGRESS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


class AblationError(QueryError):
    """An unknown target, no finished runs, no run with the metric, or nothing to ablate: the CLI prints it as one
    line, and the report a note in place of the ablation."""


def load_ablation(client, target: str, *, metric: str | None = None, split: str = "test",
                  reference: str | None = None) -> Ablation:
    """The observations of ``target`` (``tracking.queries.resolve_target``): its finished trial runs × the ε of
    ``metric`` (default: the sweep's objective). ``reference``: the loss every other is compared with (default
    CE; e.g. a control, ``LS ε=0.1``). AblationError when the target is unknown, there are no finished runs, none
    has the metric, nothing but the seed varies across them, or the reference is no loss of theirs."""
    try:
        experiment, sweep_id, parent = resolve_target(client, target)
    except QueryError as err:
        raise AblationError(str(err)) from err
    where = sweep_filter(sweep_id)
    runs = [r for g in compare_runs(client, experiment, filter_string=where) for r in g.runs]
    scope = f"sweep {sweep_id}" if sweep_id else f"experiment {experiment!r}"
    if not runs:
        raise AblationError(f"no finished trial runs in {scope}")
    notes = []
    objective = _objective(client, experiment, parent)
    if objective is None:
        notes.append(f"No sweep spec names one objective: {DEFAULT_METRIC} assumed.")
    objective = metric_key(objective or DEFAULT_METRIC)
    metric = metric_key(metric or objective)
    keys = {k for r in runs for k in r.data.metrics}
    split_used, described, pick = _family(metric, split, keys)
    picked = [(r, pick(r.data.metrics)) for r in runs]
    kept = [(r, values) for r, values in picked if values]
    if not kept:
        raise AblationError(f"no finished trial run in {scope} has {described}; available: {_available(keys)}")
    if len(kept) < len(runs):
        notes.append(f"{len(runs) - len(kept)} finished run(s) without {described} left out.")
    params = [{k: v for k, v in r.data.params.items() if not SEED_PARAM.search(k) and k != "sweep.point"}
              for r, _ in kept]
    factors, levels = factors_of(params)
    if reference is not None:
        factors = _with_reference(factors, reference)
    radii = sorted({e for _, values in kept for e in values if e is not None}, key=float)
    if len(radii) > 1:
        factors.append(Factor(EPS, "ε", tuple(radii), reference=radii[0]))
    elif radii:
        notes.append(f"One ε ({radii[0]}): ε is not a factor.")
    if not factors:
        raise AblationError(f"nothing but the seed varies across the {len(kept)} finished run(s) in {scope} with "
                            f"{described}: no factor to ablate")
    observations = []
    for (run, values), lv in zip(kept, levels, strict=True):
        seed = "/".join(run.data.params[k] for k in sorted(run.data.params) if SEED_PARAM.search(k))
        for eps, value in values.items():
            observations.append(Observation({**lv, **({EPS: eps} if len(radii) > 1 else {})}, seed, value,
                                            run.info.run_id))
    if metric != objective:
        notes.append(f"Metric {metric} chosen instead of the sweep's objective {objective}.")
    elif split_used and split_used != objective.split("/", 1)[0]:
        notes.append(f"The sweep selected on {objective}; this reads the same quantity on the {split_used} split.")
    title = f"ablation of {experiment}" + (f" — sweep {sweep_id}" if sweep_id else "")
    return Ablation(title, described, objective, split_used, factors, observations, notes, experiment, sweep_id,
                    parent, scale=100.0 if "_acc" in metric else 1.0)


def factors_of(params: list[dict[str, str]]) -> tuple[list[Factor], list[dict[str, str]]]:
    """Factors from the params that vary across runs (seeds already left out) and each run's levels."""
    varying = varying_params(params)
    levels: list[dict[str, str]] = [{} for _ in params]
    factors = []
    loss_keys = [k for k in varying if k.startswith("loss.")]
    if loss_keys:
        def loss_order(p: dict) -> tuple:
            return (p.get("loss.name") != "ce", str(p.get("loss.name")), *(_natural(str(p.get(k))) for k in loss_keys))

        for lv, p in zip(levels, params, strict=True):
            lv[LOSS] = config_label(p, loss_keys)
        order = tuple(dict.fromkeys(config_label(p, loss_keys) for p in sorted(params, key=loss_order)))
        factors.append(Factor(LOSS, "loss", order, reference="CE"))
        alphas = {a for p in params if (a := _alpha(p)) is not None}
        if "loss.name" in loss_keys and len(alphas) > 1:
            names = sorted({value_label(p.get("loss.name")) for p in params if _alpha(p) is not None})
            for lv, p in zip(levels, params, strict=True):
                if _alpha(p) is not None:
                    lv["loss.alpha"] = value_label(_alpha(p))
            factors.append(Factor("loss.alpha", factor_label("loss.alpha"),
                                  tuple(dict.fromkeys(value_label(a) for a in sorted(alphas, key=_natural))),
                                  note=f"{', '.join(names)} runs only", confounded=(LOSS,)))
    shapes: dict[tuple, list[str]] = {}  # params that always change together cannot be told apart: one factor
    for key in (k for k in varying if not k.startswith("loss.")):
        first: dict = {}
        shapes.setdefault(tuple(first.setdefault(p.get(key), len(first)) for p in params), []).append(key)
    for keys in shapes.values():
        def level(p: dict, keys: list[str] = keys) -> str:
            return ", ".join(value_label(p.get(k)) for k in keys)

        fkey = "+".join(keys)
        for lv, p in zip(levels, params, strict=True):
            lv[fkey] = level(p)
        order = tuple(dict.fromkeys(level(p) for p in sorted(
            params, key=lambda p, keys=keys: tuple(_natural(str(p.get(k))) for k in keys))))
        notes = ([f"{' and '.join(keys)} always change together"] if len(keys) > 1 else []) + (
            ["absent in some runs: level –"] if any(p.get(k) is None for p in params for k in keys) else [])
        factors.append(Factor(fkey, ", ".join(factor_label(k) for k in keys), order, note="; ".join(notes)))
    return factors, levels


def _with_reference(factors: list[Factor], reference: str) -> list[Factor]:
    """The loss factor compared with ``reference`` instead of CE."""
    loss = next((f for f in factors if f.key == LOSS), None)
    if loss is None or reference not in loss.levels:
        known = ", ".join(repr(level) for level in loss.levels) if loss else "none (the loss does not vary)"
        raise AblationError(f"--reference {reference!r} is not a loss of these runs; their losses: {known}")
    return [dataclasses.replace(f, reference=reference) if f is loss else f for f in factors]


def _alpha(params: Mapping[str, str]) -> str | None:
    """A run's α, or None where it has none: not logged (CE, COT), or logged as ``None`` by a tool that wrote the
    param anyway — counted as a level, it would make CE a level of α and α a second loss factor."""
    alpha = params.get("loss.alpha")
    return None if alpha in (None, "", "None") else alpha


def _spec_objective(client, run_id: str) -> str | None:
    """The first objective's metric in the spec a sweep's parent run logged (``RunLogger.log_spec``)."""
    if not any(a.path == "spec.yaml" for a in client.list_artifacts(run_id)):
        return None
    quiet = os.environ.get(_PROGRESS)
    os.environ[_PROGRESS] = "false"  # a progress bar for one small file would be all the CLI's stderr says
    try:
        with tempfile.TemporaryDirectory() as tmp:
            spec = yaml.safe_load(Path(client.download_artifacts(run_id, "spec.yaml", tmp)).read_text())
    except (MlflowException, OSError, yaml.YAMLError):
        return None
    finally:
        if quiet is None:
            del os.environ[_PROGRESS]
        else:
            os.environ[_PROGRESS] = quiet
    objective = spec.get("objective") if isinstance(spec, dict) else None
    if isinstance(objective, list):  # multi-objective: the first, the one the sweep reports as its best
        objective = objective[0] if objective else None
    return objective.get("metric") if isinstance(objective, dict) else None


def _objective(client, experiment: str, parent: str | None) -> str | None:
    """The sweep's objective; for a whole experiment, the one objective all its sweeps share (else None)."""
    if parent is not None:
        return _spec_objective(client, parent)
    parents = client.search_runs([experiment_id(client, experiment)], f"tags.`{ROLE_TAG}` = 'sweep'", max_results=20)
    found = {m for p in parents if (m := _spec_objective(client, p.info.run_id))}
    return found.pop() if len(found) == 1 else None


def _family(metric: str, split: str, keys: set[str]) -> tuple[str | None, str, Callable[[Mapping], dict]]:
    """(split, description, pick): ``pick(run metrics)`` -> {ε or None: value}. The headline worst case opens
    into its per-ε keys on ``split``; any other metric (a per-ε key too) is read as it is."""
    if metric in {worst_case_key(s) for s in SPLITS}:
        labels = sorted({k.label for k in map(parse_robust, keys) if k and k.worst_case and k.split == split
                         and not k.chain}, key=lambda lab: (lab != "worst_case", lab))
        label = labels[0] if labels else "worst_case"  # L∞ first: the primary threat model when it is attacked

        def pick(metrics: Mapping) -> dict:
            found = {}
            for k, v in metrics.items():
                key = parse_robust(k)
                if key and key.split == split and key.label == label and not key.chain and math.isfinite(v):
                    found[format_eps(key.eps)] = v
            return found

        return split, f"{worst_case_key(split)}{'' if label == 'worst_case' else f' ({label})'} at each ε", pick
    split_of = metric.split("/", 1)[0] if metric.split("/", 1)[0] in SPLITS else None
    return split_of, metric, lambda m: {None: m[metric]} if math.isfinite(m.get(metric, math.nan)) else {}


def _available(keys: set[str], limit: int = 8) -> str:
    """A few metric keys a user could ask for instead: headline-like ones before the per-ε ones."""
    ranked = sorted((k for k in keys if k.startswith(tuple(f"{s}/" for s in SPLITS))),
                    key=lambda k: (parse_robust(k) is not None, "robust" not in k, k))
    return ", ".join(ranked[:limit]) + (", …" if len(ranked) > limit else "") if ranked else "none"
