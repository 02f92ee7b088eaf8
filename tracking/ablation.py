"""``gce-sweep ablate``: which factor moved the objective, by how much, and with what uncertainty.

Observations: one per finished trial run and ε. The objective's robust-accuracy family is read at every ε
(``<split>/robust_acc/worst_case/eps_<ε>`` for the headline ``val/robust_acc/worst_case``), so ε is a factor
beside the params that vary across the runs. The loss is *one* factor, named as papers do (``CE``,
``GCE α=1/3``): α exists only for GCE, so a factor "α" across all runs would be the loss name in disguise.
When α takes several values, its effect is analysed again within the runs that have it (``α``, GCE runs only).

Uncertainty. A level's interval is a t-interval over its observations (seeds × the other factors): it shows
the spread, other factors included. An effect (a level against the reference) is a *matched* contrast:
differences of observations that agree on every other factor and the seed, averaged per seed, t-interval over
seeds — seeds are the independent replicates; the ε of one run are not. With one seed it falls back to the
cells of the other factors, and with nothing to match to Welch's interval on the two levels' observations.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import yaml
from mlflow.exceptions import MlflowException

from gce.metrics import SPLITS, format_eps, parse_robust, worst_case_key
from tracking import plots
from tracking.labels import config_label, factor_label, value_label
from tracking.logger import ROLE_TAG, SWEEP_TAG, metric_key
from tracking.queries import DEFAULT_METRIC, SEED_PARAM, QueryError, compare_runs, experiment_id, varying_params
from tracking.render import Section, Table, to_markdown

__all__ = ["Ablation", "AblationError", "Analysis", "Estimate", "Factor", "Importance", "Interaction", "MainEffect",
           "Observation", "ablation_figures", "ablation_json", "ablation_sections", "analyse", "contrast",
           "factors_of", "importance", "interaction", "load_ablation", "main_effects", "make_ablation", "resolve",
           "t_interval"]

CONFIDENCE = 0.95
EPS = "eps"  # the factor key of the objective family's ε
LOSS = "loss"  # the factor key of the loss configuration (name, α, …: one level per combination)
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_NUMERIC_FACTOR_LEVELS = 8  # more distinct numbers than this (a sampled lr): a float range, not categories
_PROGRESS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


class AblationError(QueryError):
    """No finished runs, or no run has the metric: the CLI prints it as one line."""


@dataclass(frozen=True)
class Factor:
    key: str
    label: str
    levels: tuple[str, ...] = ()  # display order; empty: natural order of the observed levels
    reference: str | None = None  # the level others are compared with; None: the first level
    note: str = ""  # where it is analysed, e.g. "GCE runs only"
    confounded: tuple[str, ...] = ()  # factors that change with this one: never matched on in its contrasts


@dataclass(frozen=True)
class Observation:
    levels: Mapping[str, str]  # factor key -> level; a nested factor (α) only where it exists
    seed: str
    value: float
    run_id: str = ""


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float  # bounds of the 95% interval; NaN when n < 2
    high: float
    n: int
    basis: str = "observations"  # what n counts: observations, seeds, cells (one seed), unmatched (Welch)

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass
class MainEffect:
    factor: Factor
    levels: dict[str, Estimate]  # in display order
    reference: str
    contrasts: dict[str, Estimate]  # level − reference, matched; the reference itself left out
    best: str
    worst: str
    effect: Estimate  # best level − worst level, matched: the factor's effect size


@dataclass
class Interaction:
    rows: Factor
    columns: Factor
    cells: dict[tuple[str, str], Estimate]
    reference: str
    contrasts: dict[tuple[str, str], Estimate]  # (row, column) -> row − reference at that column, matched
    dependence: dict[str, Estimate]  # row -> its contrast at the last column − at the first: the interaction


@dataclass
class Importance:
    evaluator: str
    why: str
    scores: list[tuple[str, float]]  # (factor label, share of the objective's variance), largest first
    rest: float  # what no factor explains alone: interactions and noise the forest did not attribute


@dataclass
class Analysis:
    effects: list[MainEffect]  # largest effect first
    interaction: Interaction | None
    importance: Importance | None


@dataclass
class Ablation:
    """The observations of one sweep (or experiment) and how they were chosen."""

    title: str
    metric: str  # what each observation is, in words ("test/robust_acc/worst_case at each ε")
    objective: str
    split: str | None
    factors: list[Factor]
    observations: list[Observation]
    notes: list[str] = field(default_factory=list)
    experiment: str = ""
    sweep_id: str | None = None
    parent_run_id: str | None = None
    scale: float = 100.0  # accuracies are shown in points (%)


# --- statistics ---------------------------------------------------------------------------------------------------
def t_interval(values: Iterable[float], confidence: float = CONFIDENCE, basis: str = "observations") -> Estimate:
    """Mean and Student-t interval of ``values`` (NaN bounds for one value: no spread to judge from)."""
    values = [float(v) for v in values if math.isfinite(v)]
    if not values:
        return Estimate(math.nan, math.nan, math.nan, 0, basis)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Estimate(mean, math.nan, math.nan, 1, basis)
    half = _t(confidence, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return Estimate(mean, mean - half, mean + half, len(values), basis)


def _welch(a: list[float], b: list[float], confidence: float) -> Estimate:
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Estimate(diff, math.nan, math.nan, min(len(a), len(b)), "unmatched")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return Estimate(diff, diff, diff, min(len(a), len(b)), "unmatched")
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = _t(confidence, df) * math.sqrt(va + vb)
    return Estimate(diff, diff - half, diff + half, min(len(a), len(b)), "unmatched")


def _t(confidence: float, df: float) -> float:
    from scipy.stats import t  # lazily: scipy's import is slow and only the intervals need it

    return float(t.ppf(0.5 + confidence / 2, df))


def _matched(observations: Sequence[Observation], role: Callable[[Observation], tuple], weights: dict[tuple, float],
             match: Sequence[str], confidence: float) -> Estimate | None:
    """A linear contrast Σ weight × mean over observations that agree on ``match`` and the seed (None: nothing
    matched). Each seed's matched contrasts are averaged so that the seeds are the replicates."""
    cells: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for o in observations:
        r = role(o)
        if r in weights:
            cells[(*(o.levels.get(k) for k in match), o.seed)][r].append(o.value)
    per_seed: dict[str, list[float]] = defaultdict(list)
    for key, by_role in cells.items():
        if len(by_role) == len(weights):
            per_seed[key[-1]].append(sum(w * statistics.fmean(by_role[r]) for r, w in weights.items()))
    if len(per_seed) >= 2:
        return t_interval([statistics.fmean(v) for v in per_seed.values()], confidence, "seeds")
    diffs = [d for v in per_seed.values() for d in v]
    return t_interval(diffs, confidence, "cells") if diffs else None


def _match(factors: Sequence[Factor], factor: Factor) -> list[str]:
    """The factors a contrast of ``factor`` holds fixed: all but itself and those nested in or around it (α and
    the loss configuration change together)."""
    return [f.key for f in factors
            if f.key != factor.key and f.key not in factor.confounded and factor.key not in f.confounded]


def _order(factor: Factor, observations: Iterable[Observation]) -> list[str]:
    seen = {o.levels[factor.key] for o in observations if factor.key in o.levels}
    return [lv for lv in factor.levels if lv in seen] + sorted(seen - set(factor.levels), key=_natural)


def _natural(level: str) -> tuple:
    try:
        return (0, float(level), "")
    except ValueError:
        return (1, 0.0, level)


def _reference(factor: Factor, levels: list[str]) -> str:
    return factor.reference if factor.reference in levels else levels[0]


# --- the analyses -------------------------------------------------------------------------------------------------
def contrast(observations: Sequence[Observation], factors: Sequence[Factor], factor: Factor, level: str,
             reference: str, confidence: float = CONFIDENCE) -> Estimate:
    """``level`` − ``reference`` of ``factor``, matched on every other factor and the seed (module docstring)."""
    match = _match(factors, factor)
    found = _matched(observations, lambda o: (o.levels.get(factor.key),), {(level,): 1.0, (reference,): -1.0},
                     match, confidence)
    if found is not None:
        return found
    values = [[o.value for o in observations if o.levels.get(factor.key) == lv] for lv in (level, reference)]
    return _welch(*values, confidence)


def main_effects(observations: Sequence[Observation], factors: Sequence[Factor],
                 confidence: float = CONFIDENCE) -> list[MainEffect]:
    """Per factor: each level's mean ± interval, each level against the reference, and the effect size (the
    best level − the worst, matched); largest effect first. A factor with one observed level is left out."""
    effects = []
    for factor in factors:
        levels = _order(factor, observations)
        if len(levels) < 2:
            continue
        stats = {lv: t_interval([o.value for o in observations if o.levels.get(factor.key) == lv], confidence)
                 for lv in levels}
        reference = _reference(factor, levels)
        contrasts = {lv: contrast(observations, factors, factor, lv, reference, confidence)
                     for lv in levels if lv != reference}
        best = max(levels, key=lambda lv: stats[lv].mean)
        worst = min((lv for lv in levels if lv != best), key=lambda lv: stats[lv].mean)  # ties: another level
        effect = contrast(observations, factors, factor, best, worst, confidence)
        effects.append(MainEffect(factor, stats, reference, contrasts, best, worst, effect))
    return sorted(effects, key=lambda e: -abs(e.effect.mean) if math.isfinite(e.effect.mean) else 0.0)


def interaction(observations: Sequence[Observation], factors: Sequence[Factor], rows: Factor, columns: Factor,
                confidence: float = CONFIDENCE) -> Interaction:
    """Cell means of ``rows`` × ``columns`` (loss × ε), each row's contrast with the reference row at every
    column, and how that contrast changes from the first column to the last (an interaction contrast)."""
    row_levels, col_levels = _order(rows, observations), _order(columns, observations)
    reference = _reference(rows, row_levels)
    cells = {(r, c): t_interval([o.value for o in observations
                                 if o.levels.get(rows.key) == r and o.levels.get(columns.key) == c], confidence)
             for r in row_levels for c in col_levels}
    contrasts, dependence = {}, {}
    for r in row_levels:
        if r == reference:
            continue
        for c in col_levels:
            at = [o for o in observations if o.levels.get(columns.key) == c]
            contrasts[(r, c)] = contrast(at, factors, rows, r, reference, confidence)
        lo, hi = col_levels[0], col_levels[-1]
        match = [k for k in _match(factors, rows) if k != columns.key]
        found = _matched(observations, lambda o: (o.levels.get(rows.key), o.levels.get(columns.key)),
                         {(r, hi): 1.0, (reference, hi): -1.0, (r, lo): -1.0, (reference, lo): 1.0}, match, confidence)
        dependence[r] = found or Estimate(math.nan, math.nan, math.nan, 0, "unmatched")
    return Interaction(rows, columns, cells, reference, contrasts, dependence)


FANOVA_WHY = ("fANOVA (Hutter et al. 2014): the share of the objective's variance each factor explains on its own, "
              "from a random forest over every observation — suited to a grid over categorical factors, where all "
              "levels are observed; seed is a row, so the noise floor is visible.")
PEDANOVA_WHY = ("PED-ANOVA (Watanabe et al. 2023): how much each factor matters for reaching the top 10% of the "
                "objective, from Parzen estimators — used because scikit-learn (fANOVA's random forest) is absent.")


def importance(observations: Sequence[Observation], factors: Sequence[Factor], *, seed: int = 0,
               include_seed: bool = True) -> Importance | None:
    """Rank the factors with an Optuna importance evaluator on an in-memory study (one trial per observation);
    nested factors (α) are left to the loss factor they refine. None when fewer than two factors vary or the
    objective does not vary at all."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator, get_param_importances

    usable = [f for f in factors if all(f.key in o.levels for o in observations)]
    columns = {f.label: (lambda o, k=f.key: o.levels[k]) for f in usable}
    if include_seed:
        columns["seed"] = lambda o: o.seed
    distributions = {}
    for name, get in columns.items():
        levels = sorted({get(o) for o in observations}, key=_natural)
        if len(levels) < 2:
            continue
        numeric = all(_natural(lv)[0] == 0 for lv in levels)
        if numeric and len(levels) > _NUMERIC_FACTOR_LEVELS:
            low, high = float(levels[0]), float(levels[-1])
            distributions[name] = FloatDistribution(low, high, log=low > 0 and high / low > 100)
        else:
            distributions[name] = CategoricalDistribution(levels)
    if len(distributions) < 2 or len(observations) < 3 or len({o.value for o in observations}) < 2:
        return None  # nothing to rank, or no variance to share out (every model at 0% at a large ε)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="maximize")
        study.add_trials([optuna.trial.create_trial(
            params={n: float(columns[n](o)) if isinstance(d, FloatDistribution) else columns[n](o)
                    for n, d in distributions.items()}, distributions=distributions, value=o.value)
            for o in observations])
        try:
            import sklearn  # noqa: F401  fANOVA's forest

            evaluator, name, why = FanovaImportanceEvaluator(seed=seed), "fANOVA", FANOVA_WHY
        except ImportError:
            evaluator, name, why = PedAnovaImportanceEvaluator(), "PED-ANOVA", PEDANOVA_WHY
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            scores = get_param_importances(study, evaluator=evaluator, normalize=name != "fANOVA")
    finally:
        optuna.logging.set_verbosity(verbosity)
    ranked = sorted(((k, float(v)) for k, v in scores.items()), key=lambda kv: -kv[1])
    return Importance(name, why, ranked, max(0.0, 1.0 - sum(v for _, v in ranked)) if name == "fANOVA" else math.nan)


def analyse(ablation: Ablation, *, seed: int = 0) -> Analysis:
    """Main effects, the loss × ε interaction (when both vary) and the importance ranking."""
    obs, factors = ablation.observations, ablation.factors
    by_key = {f.key: f for f in factors}
    both = LOSS in by_key and EPS in by_key
    return Analysis(main_effects(obs, factors),
                    interaction(obs, factors, by_key[LOSS], by_key[EPS]) if both else None,
                    importance(obs, factors, seed=seed))


# --- from MLflow --------------------------------------------------------------------------------------------------
def resolve(client, target: str) -> tuple[str, str | None, str | None]:
    """(experiment, sweep id, parent run id) of ``target``: a sweep's parent run id, an experiment name or a
    sweep id (tag ``gce.sweep_id``). A trial's run id resolves to its sweep, so nothing is logged to a trial."""
    if _RUN_ID.fullmatch(target):
        try:
            run = client.get_run(target)
        except MlflowException as err:
            raise AblationError(f"no run {target} on the tracking server") from err
        experiment = client.get_experiment(run.info.experiment_id).name
        sweep_id = run.data.tags.get(SWEEP_TAG)
        if run.data.tags.get(ROLE_TAG) == "sweep" or sweep_id is None:
            return experiment, sweep_id, run.info.run_id if sweep_id else None
        return experiment, sweep_id, _sweep_parent(client, [run.info.experiment_id], sweep_id)
    found = client.get_experiment_by_name(target)
    if found is not None and found.lifecycle_stage == "active":
        return target, None, None
    if re.fullmatch(r"[\w.:-]+", target):
        ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
        parent = _sweep_parent(client, ids, target) if ids else None
        if parent is not None:
            return client.get_experiment(client.get_run(parent).info.experiment_id).name, target, parent
    try:
        experiment_id(client, target)
    except QueryError as err:
        raise AblationError(f"{err} (nor is it a sweep id or a run id)") from err
    raise AblationError(f"no experiment {target!r}")  # unreachable: it would have resolved above


def _sweep_parent(client, experiment_ids: list[str], sweep_id: str) -> str | None:
    runs = client.search_runs(experiment_ids, f"tags.`{SWEEP_TAG}` = '{sweep_id}' AND tags.`{ROLE_TAG}` = 'sweep'",
                              max_results=1)
    return runs[0].info.run_id if runs else None


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
        alphas = {p["loss.alpha"] for p in params if p.get("loss.alpha") is not None}
        if "loss.name" in loss_keys and len(alphas) > 1:
            names = sorted({value_label(p.get("loss.name")) for p in params if p.get("loss.alpha") is not None})
            for lv, p in zip(levels, params, strict=True):
                if p.get("loss.alpha") is not None:
                    lv["loss.alpha"] = value_label(p["loss.alpha"])
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


def load_ablation(client, target: str, *, metric: str | None = None, split: str = "test") -> Ablation:
    """The observations of ``target`` (``resolve``): its finished trial runs × the ε of ``metric`` (default: the
    sweep's objective). AblationError when there are no finished runs or none has the metric."""
    experiment, sweep_id, parent = resolve(client, target)
    where = f"tags.`{SWEEP_TAG}` = '{sweep_id}'" if sweep_id else ""
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
    radii = sorted({e for _, values in kept for e in values if e is not None}, key=float)
    if len(radii) > 1:
        factors.append(Factor(EPS, "ε", tuple(radii), reference=radii[0]))
    elif radii:
        notes.append(f"One ε ({radii[0]}): ε is not a factor.")
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


# --- report sections, figures, JSON -------------------------------------------------------------------------------
def _num(e: Estimate, scale: float, signed: bool = False) -> str:
    if e.n == 0 or not math.isfinite(e.mean):
        return "–"
    f = "+.1f" if signed else ".1f"
    if not math.isfinite(e.low):
        return f"{scale * e.mean:{f}}"
    return f"{scale * e.mean:{f}} [{scale * e.low:{f}}, {scale * e.high:{f}}]"


def _n(e: Estimate) -> str:
    return f"{e.n} {e.basis}" if e.n else "–"


def ablation_sections(ablation: Ablation, analysis: Analysis | None = None
                      ) -> tuple[list[Section], dict[str, bytes]]:
    """The ablation as report sections (setup, main effects, effect sizes, loss × ε, importance), each carrying
    its own plot, and all the figures by file name (the same PNGs: to log or write beside the Markdown)."""
    analysis = analysis or analyse(ablation)
    figures = ablation_figures(ablation, analysis)
    s, unit = ablation.scale, "points" if ablation.scale == 100 else "units"
    runs = len({o.run_id for o in ablation.observations if o.run_id})
    factors = "; ".join(f"{f.label} ({len(_order(f, ablation.observations))} levels" + (f", {f.note}" if f.note
                        else "") + ")" for f in ablation.factors) or "none"
    sections = [Section("Ablation: setup", [
        f"{len(ablation.observations)} observations" + (f" from {runs} finished trial runs" if runs else "")
        + f": {ablation.metric}"
        + (f" (split: {ablation.split})" if ablation.split else "") + f". The sweep's objective: {ablation.objective}."
        f" Factors: {factors}.",
        "The loss is one factor (name and α together, as papers name it: α exists only for GCE); α's own effect "
        "is measured within the runs that have it. Intervals are 95% t-intervals. A level's interval spans its "
        "observations (seeds × the other factors); an effect (Δ) is matched — observations that differ only in "
        "that factor, averaged per seed, interval over seeds (*cells*: one seed, over the other factors instead; "
        "*unmatched*: Welch on the two levels)."], notes=list(ablation.notes))]
    rows = []
    for e in analysis.effects:
        name = e.factor.label + (f" ({e.factor.note})" if e.factor.note else "")
        for lv, st in e.levels.items():
            delta = e.contrasts.get(lv)
            rows.append([name, lv, _num(st, s), str(st.n), "reference" if delta is None else _num(delta, s, True),
                         "" if delta is None else _n(delta)])
            name = ""
    sections.append(Section("Main effects", [f"Mean of {ablation.metric} per level ({unit}) and each level "
                                             "against the reference level (the first, or CE)."],
                             Table(["factor", "level", "mean [95% CI]", "n", "Δ vs reference [95% CI]", "n (Δ)"],
                                   rows, left=2), figures=_pick(figures, "main_effects.png")))
    sections.append(Section("Effect sizes", [f"Each factor's best level − its worst ({unit}), matched; largest "
                                             "first. An interval that excludes 0 is an effect the seeds resolve."],
                            Table(["factor", "best − worst", "Δ [95% CI]", "n (Δ)"],
                                  [[e.factor.label, f"{e.best} − {e.worst}", _num(e.effect, s, True), _n(e.effect)]
                                   for e in analysis.effects], left=2)))
    if analysis.interaction is not None:
        sections.append(_interaction_section(analysis.interaction, ablation.observations, s, unit))
        sections[-1].figures.update(_pick(figures, "interaction.png"))
    if analysis.importance is not None:
        imp = analysis.importance
        table_rows = [[name, f"{v:.3f}"] for name, v in imp.scores]
        if math.isfinite(imp.rest):
            table_rows.append(["(interactions, unexplained)", f"{imp.rest:.3f}"])
        sections.append(Section(f"Factor importance ({imp.evaluator})", [imp.why, "Fixed seed 0: deterministic."],
                                Table(["factor", "importance"], table_rows)))
    sections[-1].figures.update(_pick(figures, "parallel_coordinates.png"))
    return sections, figures


def _pick(figures: dict[str, bytes], name: str) -> dict[str, bytes]:
    return {name: figures[name]} if name in figures else {}


def _interaction_section(it: Interaction, observations, s: float, unit: str) -> Section:
    cols = _order(it.columns, observations)
    rows_ = _order(it.rows, observations)
    dep = f"Δ({it.columns.label}={cols[-1]}) − Δ({it.columns.label}={cols[0]})"
    rows = [[r, *(_num(it.cells[(r, c)], s) for c in cols), ""] for r in rows_]
    rows += [[f"{r} − {it.reference}", *(_num(it.contrasts[(r, c)], s, True) for c in cols),
              _num(it.dependence[r], s, True)] for r in rows_ if r != it.reference]
    return Section(f"{it.rows.label.capitalize()} × {it.columns.label} interaction", [
        f"Cell means [95% CI] ({unit}), then each {it.rows.label} against {it.reference} at every "
        f"{it.columns.label} (matched). The last column is the interaction contrast: whether the gain grows or "
        f"shrinks from {it.columns.label}={cols[0]} to {cols[-1]} (an interval excluding 0 says it does)."],
        Table([it.rows.label, *(f"{it.columns.label}={c}" for c in cols), dep], rows))


def ablation_figures(ablation: Ablation, analysis: Analysis) -> dict[str, bytes]:
    """main_effects.png, interaction.png (loss × ε) and parallel_coordinates.png as PNG bytes."""
    s = ablation.scale
    ylabel = f"{ablation.metric}" + (" (%)" if s == 100 else "")
    figures = {}
    if analysis.effects:
        figures["main_effects.png"] = plots.main_effects(
            {e.factor.label + (f" ({e.factor.note})" if e.factor.note else ""):
             [(lv, s * st.mean, s * st.low, s * st.high) for lv, st in e.levels.items()] for e in analysis.effects},
            ylabel=ylabel)
    it = analysis.interaction
    if it is not None:
        cols = _order(it.columns, ablation.observations)
        figures["interaction.png"] = plots.interaction_lines(
            {r: {float(c): (s * it.cells[(r, c)].mean, s * it.cells[(r, c)].low, s * it.cells[(r, c)].high)
                 for c in cols} for r in _order(it.rows, ablation.observations)},
            xlabel=it.columns.label, ylabel=ylabel, title=f"{it.rows.label} × {it.columns.label}")
    shown = [f for f in ablation.factors if not f.confounded]
    if shown:
        figures["parallel_coordinates.png"] = plots.parallel_coordinates(
            {f.label: _order(f, ablation.observations) for f in shown},
            [[o.levels.get(f.key, "–") for f in shown] for o in ablation.observations],
            [s * o.value for o in ablation.observations], label=ylabel)
    return {name: plots.png(fig) for name, fig in figures.items()}


def ablation_json(ablation: Ablation, analysis: Analysis) -> dict:
    """Everything the tables show, as plain data (values as stored: accuracies in [0, 1]; NaN as null)."""
    def est(e: Estimate) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(e).items()}

    it, imp = analysis.interaction, analysis.importance
    return {
        "title": ablation.title, "experiment": ablation.experiment, "sweep_id": ablation.sweep_id,
        "parent_run_id": ablation.parent_run_id, "metric": ablation.metric, "objective": ablation.objective,
        "split": ablation.split, "notes": ablation.notes, "observations": len(ablation.observations),
        "factors": [asdict(f) for f in ablation.factors],
        "main_effects": [{"factor": e.factor.label, "note": e.factor.note, "reference": e.reference,
                          "levels": {lv: est(st) for lv, st in e.levels.items()},
                          "vs_reference": {lv: est(c) for lv, c in e.contrasts.items()},
                          "best": e.best, "worst": e.worst, "effect": est(e.effect)} for e in analysis.effects],
        "interaction": None if it is None else {
            "rows": it.rows.label, "columns": it.columns.label, "reference": it.reference,
            "cells": [{"row": r, "column": c, **est(v)} for (r, c), v in it.cells.items()],
            "vs_reference": [{"row": r, "column": c, **est(v)} for (r, c), v in it.contrasts.items()],
            "dependence": {r: est(v) for r, v in it.dependence.items()}},
        "importance": None if imp is None else {"evaluator": imp.evaluator, "why": imp.why, "scores": dict(imp.scores),
                                                "rest": imp.rest if math.isfinite(imp.rest) else None},
    }


def make_ablation(client, target: str, *, metric: str | None = None, split: str = "test",
                  out: str | Path | None = None) -> tuple[Ablation, Analysis, list[Section], list[Path]]:
    """Load, analyse and write ``ablation.md`` and the plots to ``out`` (default reports/<sweep id or
    experiment>/ablation); a sweep's are also logged to its parent run under ``ablation/``."""
    ablation = load_ablation(client, target, metric=metric, split=split)
    analysis = analyse(ablation)
    sections, figures = ablation_sections(ablation, analysis)
    folder = Path(out) if out else Path("reports") / (ablation.sweep_id or ablation.experiment) / "ablation"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "ablation.md"]
    paths[0].write_text(to_markdown(SimpleNamespace(title=ablation.title, sections=sections, figures=figures)))
    for name, png in figures.items():
        (folder / name).write_bytes(png)
        paths.append(folder / name)
    if ablation.parent_run_id is not None:
        for path in paths:
            client.log_artifact(ablation.parent_run_id, str(path), "ablation")
    return ablation, analysis, sections, paths
