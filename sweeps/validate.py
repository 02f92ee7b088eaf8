"""Checks of a spec's meaning, beyond its shape: every trial it can launch must be a valid gce config.

Each problem is reported with the YAML path of the field and what is allowed, all at once, so a user fixes
a spec in one pass. Nothing here starts Ray or MLflow.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sweeps.spec import SweepSpec

__all__ = ["check_resources", "check_semantics", "metric_names"]

PER_EPOCH_METRICS = ("train/loss", "train/acc", "train/images_per_s", "val/loss", "val/clean_acc")


def check_semantics(spec: SweepSpec) -> list[str]:
    from gce.config import ConfigError
    from sweeps.spec import MAX_GRID_TRIALS

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
    known = metric_names(spec)
    for i, objective in enumerate(spec.objectives):
        where = "objective" if not isinstance(spec.objective, list) else f"objective.{i}"
        if objective.metric not in known:
            problems.append(f"{where}.metric: {objective.metric!r} is not a metric the trials report; "
                            f"known: {sorted(known)}")
    if spec.scheduler.name == "asha" and spec.scheduler.metric not in PER_EPOCH_METRICS:
        problems.append(f"scheduler.metric: ASHA compares per-epoch metrics; must be one of "
                        f"{list(PER_EPOCH_METRICS)}, got {spec.scheduler.metric!r}")
    return problems


def _check_space(spec: SweepSpec) -> list[str]:
    from gce.config import ConfigError

    problems = []
    for key, dim in spec.space.items():
        if dim.when is not None:
            unknown = [k for k in dim.when if k not in spec.space]
            if unknown:
                problems.append(f"space.{key}.when: {unknown} are not dimensions of the space; "
                                f"known: {sorted(spec.space)}")
                continue
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
    problems = []
    all_eps = set()
    for i, attack in enumerate(spec.evaluation.attacks):
        try:
            configs = attack.configs()
        except (ValueError, TypeError) as err:
            problems.append(f"evaluation.attacks.{i} ({attack.name}): {_strip(err)}")
            continue
        all_eps |= {c.eps for c in configs}
    labels = [a.configs()[0].label() for a in spec.evaluation.attacks if not _fails(a)]
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        problems.append(f"evaluation.attacks: {duplicates} appear twice with the same label; give each attack one "
                        "entry with an eps list (or differ them by loss/norm)")
    primary = spec.evaluation.primary_eps
    if primary is not None and all_eps and primary not in all_eps:
        problems.append(f"evaluation.primary_eps: {primary} is not one of the attacks' eps values {sorted(all_eps)}")
    return problems


def _fails(attack) -> bool:
    try:
        attack.configs()
    except (ValueError, TypeError):
        return True
    return False


# A trial's own profile (sweeps.trainable): seconds per phase, shares of the trial, peak memory.
TIME_METRICS = ("time/data_s", "time/fit_compute_s", "time/log_s", "time/run_start_s", "time/report_s",
                "time/artifacts_s", "time/trial_s", "time/tracking_share", "time/report_share", "mem/peak_rss_mb")


def metric_names(spec: SweepSpec) -> set[str]:
    """The metric keys a trial of this spec reports (what objectives and queries can name)."""
    from gce.evaluate import format_eps, norm_of

    names = set(PER_EPOCH_METRICS) | {"val/eval_clean_acc", "time/train_s", "time/eval_s", *TIME_METRICS}
    names |= {f"val/latent/{k}" for k in ("silhouette", "inter_class", "intra_class", "inter_intra_ratio")}
    splits = ["val", "test"] if spec.evaluation.test else ["val"]
    group = "robust_acc" if spec.evaluation.standalone else "robust_acc_chain"  # chain numbers are cumulative
    for split in splits:
        names.add(f"{split}/clean_acc")
        if not spec.evaluation.attacks:
            continue
        names.add(f"{split}/robust_acc/worst_case")
        for attack in spec.evaluation.attacks:
            if _fails(attack):
                continue
            for cfg in attack.configs():
                norm = norm_of(cfg)
                worst = "worst_case" if norm == "linf" else f"worst_case-{norm}"
                names.add(f"{split}/{group}/{cfg.label()}/eps={format_eps(cfg.eps)}")
                names.add(f"{split}/robust_acc/{worst}/eps={format_eps(cfg.eps)}")
    return names


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
