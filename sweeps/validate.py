"""Checks of a spec's meaning, beyond its shape: every trial it can launch must be a valid gce config.

Each problem is reported with the YAML path of the field and what is allowed, all at once, so a user fixes
a spec in one pass. Nothing here starts Ray or MLflow.
"""

from __future__ import annotations

import os
from typing import Any

from gce import metrics
from gce.config import ConfigError
from sweeps.spec import MAX_GRID_TRIALS, SweepSpec

__all__ = ["check_resources", "check_semantics", "expected_metrics"]

#: What ASHA can compare in every spec: robust metrics exist only at a trial's end (``val/adv_acc``, per epoch,
#: joins these in a spec whose every trial trains adversarially).
PER_EPOCH_METRICS = tuple(k for k in metrics.EPOCH if k != "epoch")


def check_semantics(spec: SweepSpec) -> list[str]:
    problems: list[str] = []
    try:
        spec.trial_config({}, spec.seeds[0])
    except (ConfigError, ValueError, TypeError) as err:
        problems.append(f"base: {_strip(err)}")
        return problems  # every trial derives from the base: other messages would repeat this one

    if spec.search.algorithm == "grid" and spec.grid_size() > MAX_GRID_TRIALS:
        problems.append(f"space: the grid expands to {spec.grid_size():,} trials (seeds and repeats included); "
                        f"the limit is {MAX_GRID_TRIALS:,} — use random or tpe search with num_samples")
        return problems

    problems += _check_space(spec)
    problems += _check_evaluation(spec)
    predicted = expected_metrics(spec)
    known = predicted.exact
    for i, objective in enumerate(spec.objectives):
        where = "objective" if not isinstance(spec.objective, list) else f"objective.{i}"
        if objective.metric not in known:
            problems.append(f"{where}.metric: {objective.metric!r} is not a metric the trials report; "
                            f"known: {sorted(known)}")
    per_epoch = sorted(predicted.per_epoch - {"epoch"})
    if spec.scheduler.name == "asha" and spec.scheduler.metric not in per_epoch:
        problems.append(f"scheduler.metric: ASHA compares per-epoch metrics; must be one of "
                        f"{per_epoch}, got {spec.scheduler.metric!r}")
    return problems


def _check_space(spec: SweepSpec) -> list[str]:
    problems = []
    for key, dim in spec.space.items():
        if dim.when is not None:
            unknown = [k for k in dim.when if k not in spec.space]
            if unknown:
                problems.append(f"space.{key}.when: {unknown} are not dimensions of the space; "
                                f"known: {sorted(spec.space)}")
    if problems:
        return problems
    # Every grid point (or each distribution bound, with the other dimensions at their first value) must be
    # a valid TrainConfig; the α-on-CE mistake surfaces here as loss.alpha for loss 'ce'.
    points = spec.grid_points() if spec.search.algorithm == "grid" else _probe_points(spec)
    seen: set[str] = set()
    for point in points:
        try:
            spec.trial_config(point, spec.seeds[0])
        except (ConfigError, ValueError, TypeError) as err:
            message = _strip(err)
            field = _culprit(message, point)
            if field in seen:  # one message per dimension: the first failing value says enough
                continue
            seen.add(field)
            hint = ""
            if "loss.alpha" in message and "loss.alpha" in spec.space:
                hint = " — make α conditional: when: {loss.name: gce}"
            problems.append(f"space.{field}: {message} (in trial {point}){hint}")
    return problems


def _probe_points(spec: SweepSpec) -> list[dict[str, Any]]:
    first = {k: d.values[0] for k, d in spec.space.items() if d.when is None}
    points = []
    for key, dim in spec.space.items():
        for value in dim.endpoints():
            point = {**first, key: value}
            points.append({k: v for k, v in point.items()
                           if spec.space[k].when is None or spec.space[k].applies(point)})
    return points


def _culprit(message: str, point: dict[str, Any]) -> str:
    """The space key a gce ConfigError ("optim.lr: …", "optim: unknown key(s)…") points at."""
    field = message.split(":", 1)[0].removeprefix("train.")
    for key in point:
        bare = key.removeprefix("train.")
        if bare == field or bare.startswith(field + "."):
            return key
    return field


def _check_evaluation(spec: SweepSpec) -> list[str]:
    problems, labels, all_eps = [], [], set()
    for i, attack, configs in _attack_configs(spec):
        if isinstance(configs, Exception):
            problems.append(f"evaluation.attacks.{i} ({attack.name}): {_strip(configs)}")
            continue
        labels.append(configs[0].label())
        all_eps |= {c.eps for c in configs}
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        problems.append(f"evaluation.attacks: {duplicates} appear twice with the same label; give each attack one "
                        "entry with an eps list (or differ them by loss/norm)")
    all_eps |= {c.eps for c in spec.evaluation.autoattack_configs()}
    primary = spec.evaluation.primary_eps
    if primary is not None and all_eps and primary not in all_eps:
        problems.append(f"evaluation.primary_eps: {primary} is not one of the attacks' eps values {sorted(all_eps)}")
    return problems


def _attack_configs(spec: SweepSpec):
    """(index, entry, its AttackConfigs — one per ε — or the error that refuses them) for each attack entry."""
    for i, attack in enumerate(spec.evaluation.attacks):
        try:
            yield i, attack, attack.configs()
        except (ValueError, TypeError) as err:
            yield i, attack, err


def expected_metrics(spec: SweepSpec) -> metrics.MetricSet:
    """The metric keys a trial of this spec reports (what objectives and queries can name): the schema's
    prediction for the spec's evaluation (``gce.metrics.expected``)."""
    ev = spec.evaluation
    cuda = spec.resources.gpu > 0 and spec.trial_config({}, spec.seeds[0]).device != "cpu"
    attacks = [c for _, _, configs in _attack_configs(spec) if not isinstance(configs, Exception) for c in configs]
    attacks += ev.autoattack_configs()
    return metrics.expected(attacks, test=ev.test, standalone=ev.standalone, checks=ev.checks,
                            cuda=cuda, system=spec.system_metrics.enabled, adversarial=_adversarial(spec))


def _adversarial(spec: SweepSpec) -> str:
    """Whether "all", "some" or "none" of the spec's trials train adversarially (they report ``val/adv_acc``):
    over the grid's points, or the probe points of a sampled space; points that fail validation are left to
    ``_check_space``."""
    points = spec.grid_points() if spec.search.algorithm == "grid" else _probe_points(spec)
    flags = set()
    for point in points or [{}]:
        try:
            flags.add(spec.trial_config(point, spec.seeds[0]).adversarial is not None)
        except (ConfigError, ValueError, TypeError):
            continue
    return "some" if len(flags) > 1 else "all" if flags == {True} else "none"


def check_resources(spec: SweepSpec, address: str | None) -> list[str]:
    """Resources a local run can never satisfy (on a cluster, Ray's own accounting decides)."""
    if address:
        return []
    import torch

    problems = []
    cpus = os.cpu_count() or 1
    if spec.resources.cpu > cpus:
        problems.append(f"resources.cpu: {spec.resources.cpu} per trial, but this machine has {cpus} CPUs")
    gpus = torch.cuda.device_count()
    if spec.resources.gpu > gpus:
        problems.append(f"resources.gpu: {spec.resources.gpu} per trial, but this machine has {gpus} GPUs "
                        "(set gpu: 0, or run on a Ray cluster with --address)")
    return problems


def _strip(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
