"""Which factor matters most for an ablation's objective: an Optuna importance evaluator (fANOVA, else PED-ANOVA)
on an in-memory study with one trial per observation. Optuna is imported only when a ranking is asked for.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from tracking.ablation.effects import Factor, Observation, _finite, _natural

__all__ = ["FANOVA_WHY", "PEDANOVA_WHY", "Importance", "importance"]

_NUMERIC_FACTOR_LEVELS = 8  # more distinct numbers than this (a sampled lr): a float range, not categories


@dataclass
class Importance:
    evaluator: str
    why: str
    scores: list[tuple[str, float]]  # (factor label, share of the objective's variance), largest first
    rest: float  # what no factor explains alone: interactions and noise the forest did not attribute


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

    observations = _finite(observations)  # a NaN objective is not a trial Optuna can take
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
