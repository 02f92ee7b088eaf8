"""The statistics of an ablation, on plain observations (no MLflow): a level's mean with a t-interval, and
*matched* contrasts between levels — main effects, their sizes and the loss × ε interaction.

A level's interval is a t-interval over its observations (seeds × the other factors): it shows the spread, other
factors included. An effect (a level against the reference) is a matched contrast: differences of observations
that agree on every other factor and the seed, averaged per seed, t-interval over seeds — seeds are the
independent replicates; the ε of one run are not. With one seed it falls back to the cells of the other factors,
and with nothing to match to Welch's interval on the two levels' observations.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["CONFIDENCE", "EPS", "LOSS", "Estimate", "Factor", "Interaction", "MainEffect", "Observation", "contrast",
           "interaction", "main_effects", "t_interval"]

CONFIDENCE = 0.95
EPS = "eps"  # the factor key of the objective family's ε
LOSS = "loss"  # the factor key of the loss configuration (name, α, …: one level per combination)
_UNMATCHED = "unmatched"


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
    """a − b with Welch's interval (Welch–Satterthwaite degrees of freedom): the two levels as independent samples."""
    n = min(len(a), len(b))
    if n == 0:  # a level not observed here (an ε at which one loss was not attacked): no estimate, not a crash
        return Estimate(math.nan, math.nan, math.nan, 0, _UNMATCHED)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if n < 2:
        return Estimate(diff, math.nan, math.nan, n, _UNMATCHED)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return Estimate(diff, diff, diff, n, _UNMATCHED)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = _t(confidence, df) * math.sqrt(va + vb)
    return Estimate(diff, diff - half, diff + half, n, _UNMATCHED)


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


def _finite(observations: Iterable[Observation]) -> list[Observation]:
    """Observations with a value: a NaN (a run that logged one) would turn every mean and contrast it enters NaN."""
    return [o for o in observations if math.isfinite(o.value)]


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
    observations, match = _finite(observations), _match(factors, factor)
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
    observations, effects = _finite(observations), []
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
    observations = _finite(observations)
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
        dependence[r] = found or Estimate(math.nan, math.nan, math.nan, 0, _UNMATCHED)
    return Interaction(rows, columns, cells, reference, contrasts, dependence)
