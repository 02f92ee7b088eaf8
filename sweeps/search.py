"""The spec's search and scheduler as Ray Tune objects: grid points, Optuna samplers, ASHA.

Grid sweeps enumerate the (conditional) grid themselves and hand Tune one ``grid_search`` over whole points,
so α appears only in GCE trials. Random, TPE and multi-objective searches use Optuna's samplers through
``OptunaSearch`` with a define-by-run space, which expresses the same conditions natively.
"""

from __future__ import annotations

from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from sweeps.spec import SweepSpec

__all__ = ["assignment_text", "describe", "param_space", "scheduler", "searcher", "trial_assignment"]


def param_space(spec: SweepSpec) -> dict[str, Any]:
    if spec.resources.stack > 1:  # one Ray trial per stack: its members' (point, seed) whole
        return {"members": tune.grid_search(spec.stack_groups())}
    if spec.search.algorithm == "grid":
        return {"point": tune.grid_search(spec.grid_points()), "seed": tune.grid_search(list(spec.seeds))}
    return {}  # the Optuna searcher defines the space


def trial_assignment(config: dict[str, Any], spec: SweepSpec) -> tuple[dict[str, Any], int]:
    """(point, seed) of a trial: a grid trial carries them whole; an Optuna trial has one key per dimension; a
    stack's, its first member's."""
    if "members" in config:
        config = config["members"][0]
    if "point" in config:
        return dict(config["point"]), int(config["seed"])
    point = {k: config[k] for k in spec.space if k in config and config[k] is not None}
    return point, int(config.get("seed", spec.seeds[0]))


def assignment_text(config: dict[str, Any], spec: SweepSpec) -> str:
    """A Ray trial's assignment in words; a stack's, each member's."""
    if "members" in config:
        members = config["members"]
        return f"stack of {len(members)}: " + " | ".join(describe(m["point"], m["seed"]) for m in members)
    return describe(*trial_assignment(config, spec))


def describe(point: dict[str, Any], seed: int | None = None) -> str:
    """A trial's assignment in a few words ("loss.name=gce, loss.alpha=0.5, seed=1"); "base" for none."""
    items = point if seed is None else {**point, "seed": seed}
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items()) or "base"


class _OptunaSearch(OptunaSearch):
    """OptunaSearch that tolerates per-epoch results without the objective.

    Robust accuracy exists only after the final evaluation, so intermediate results (reported every epoch
    for ASHA and checkpoints) lack it; the stock searcher would raise KeyError on them.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric in result:
            super().on_trial_result(trial_id, result)


class DefineByRun:
    """An Optuna define-by-run space: plain dimensions first, then conditional ones whose `when` holds.

    A class rather than a closure: Tune pickles the searcher (with this space) into its experiment state.
    """

    def __init__(self, spec: SweepSpec):
        self.plain = [(k, d) for k, d in spec.space.items() if d.when is None]
        self.conditional = [(k, d) for k, d in spec.space.items() if d.when is not None]
        self.seeds = list(spec.seeds)

    def __call__(self, trial) -> dict[str, Any] | None:
        point: dict[str, Any] = {}
        for key, dim in self.plain:
            point[key] = dim.suggest(trial, key)
        for key, dim in self.conditional:
            if dim.applies(point):
                point[key] = dim.suggest(trial, key)
        return {"seed": self.seeds[0]}  # one seed: the spec refuses several for sampled searches


def searcher(spec: SweepSpec):
    algorithm = spec.search.algorithm
    if algorithm == "grid":
        return None  # Tune's basic variant generator walks the grid_search
    seed = spec.search.seed
    sampler = optuna.samplers.RandomSampler(seed=seed) if algorithm == "random" else \
        optuna.samplers.TPESampler(seed=seed)
    objectives = spec.objectives
    if algorithm == "multi_objective":
        metric, mode = [o.metric for o in objectives], [o.mode for o in objectives]
    else:
        metric, mode = objectives[0].metric, objectives[0].mode
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return _OptunaSearch(space=DefineByRun(spec), metric=metric, mode=mode, sampler=sampler)


def scheduler(spec: SweepSpec):
    s = spec.scheduler
    if s.name == "none":
        return None
    epochs = spec.base.get("epochs", 20)
    for key in ("epochs", "train.epochs"):
        if key in spec.space and spec.space[key].kind in ("grid", "choice", "int"):
            epochs = max(spec.space[key].values)
    # One report per epoch, then one for the final evaluation: max_t past the last epoch, so ASHA never
    # stops a trial that has finished training before it is evaluated.
    return ASHAScheduler(time_attr="training_iteration", metric=s.metric, mode=s.mode, max_t=int(epochs) + 1,
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor)
