"""The sweep spec's schema: validated pydantic objects -> trial configs (``sweeps.loading`` reads the YAML).

A spec names an experiment, a base training config (gce.config.TrainConfig as a nested mapping), a search
space over any of its fields (dotted paths), seeds as a factor, the evaluation attacks, the objective, the
searcher, the scheduler and the resources. Everything is checked before Ray starts: a bad field is reported
with its YAML path and the allowed values, and nothing runs.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sweeps.space import Dimension

__all__ = ["MAX_GRID_TRIALS", "SpecError", "SweepSpec"]

MAX_GRID_TRIALS = 10_000  # a typo like 1e4 values in a grid should not start a month of trials
_INACTIVE = object()  # a conditional dimension whose `when` does not hold


class SpecError(ValueError):
    """A spec that cannot run; the message names each bad field by its YAML path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class AttackSpec(_Strict):
    """One attack of the evaluation, at every ε of ``eps``; other fields are gce.attacks.AttackConfig's."""

    model_config = ConfigDict(extra="allow")
    name: str
    eps: list[float] = Field(min_length=1)

    @field_validator("eps", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    def configs(self) -> list[Any]:
        from gce.attacks import AttackConfig

        extra = dict(self.model_extra or {})
        return [AttackConfig(name=self.name, eps=e, **extra) for e in self.eps]


def _norm(cfg: Any) -> str:
    from gce.evaluate import norm_of

    return norm_of(cfg)


class AutoAttackSpec(_Strict):
    """AutoAttack's chain at each ε (``gce.attacks.autoattack``); a bare string names the version."""

    version: Literal["standard", "plus"] = "standard"
    eps: list[Annotated[float, Field(gt=0)]] | None = None  # None = the radii of the other attacks of this norm
    norm: Literal["linf", "l2"] = "linf"

    @model_validator(mode="before")
    @classmethod
    def _bare_version(cls, v: Any) -> Any:
        return {"version": v} if isinstance(v, str) else v

    @field_validator("eps", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else v


class EvaluationSpec(_Strict):
    attacks: list[AttackSpec] = Field(default_factory=list)
    autoattack: AutoAttackSpec | None = None  # AutoAttack standard/plus, beside (or instead of) the attacks
    max_examples: Annotated[int, Field(ge=1)] = 1000  # per split: robust evaluation is the costly part
    # auto: every evaluated example in one batch on an accelerator (attacks halve it on out-of-memory), 500 on
    # the CPU, where bigger batches buy nothing
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    standalone: bool = True  # every attack on every point (exact per-attack numbers) vs AutoAttack-style chain
    fast: bool = True  # early stop and nested radii (gce.evaluate); false = the final-iterate numbers exactly
    primary_eps: float | None = None  # the ε of val/robust_acc/worst_case; None = the largest
    test: bool = True  # also evaluate the test split (reported beside; selection uses val)
    checks: bool = True  # gradient-masking diagnostics per trial
    plots: bool = True  # per-trial PNGs (curves, confusion, embedding, examples): ~1 s of matplotlib a trial

    @model_validator(mode="after")
    def _autoattack_eps(self) -> EvaluationSpec:
        aa = self.autoattack
        if aa is not None and aa.eps is None:
            taken = sorted({e for cfg in self._listed() if _norm(cfg) == aa.norm for e in [cfg.eps]})
            if not taken:
                raise ValueError(f"autoattack.eps: give the radii; no other attack of norm {aa.norm!r} to take "
                                 "them from")
            aa.eps = [e for e in taken if math.isfinite(e)]
            if not aa.eps:
                raise ValueError(f"autoattack.eps: give the radii; the other {aa.norm!r} attacks have none finite")
        if aa is not None and any(a.name == "autoattack" for a in self.attacks):
            raise ValueError("autoattack: given both as evaluation.autoattack and in evaluation.attacks; keep one")
        return self

    def _listed(self) -> list[Any]:
        return [cfg for attack in self.attacks for cfg in attack.configs()]

    def attack_configs(self) -> list[Any]:
        """Every ``gce.attacks.AttackConfig`` this evaluation runs, one per attack and ε (AutoAttack last)."""
        return self._listed() + self.autoattack_configs()

    def autoattack_configs(self) -> list[Any]:
        aa = self.autoattack
        if aa is None:
            return []
        from gce.attacks import AttackConfig

        return [AttackConfig(name="autoattack", eps=e, norm=None if aa.norm == "linf" else aa.norm,
                             version=None if aa.version == "standard" else aa.version) for e in aa.eps]

    def resolved_batch_size(self, device) -> int:
        if self.batch_size != "auto":
            return self.batch_size
        return 500 if getattr(device, "type", device) == "cpu" else self.max_examples


class Objective(_Strict):
    metric: str = "val/robust_acc/worst_case"
    mode: Literal["max", "min"] = "max"


class SearchSpec(_Strict):
    algorithm: Literal["grid", "random", "tpe", "multi_objective"] = "grid"
    num_samples: Annotated[int, Field(ge=1)] = 1  # grid: repeats of the whole grid; others: trials
    seed: int = 0


class SchedulerSpec(_Strict):
    name: Literal["none", "asha"] = "none"
    grace_period: Annotated[int, Field(ge=1)] = 1
    reduction_factor: Annotated[float, Field(gt=1)] = 3
    metric: str = "val/clean_acc"  # per-epoch metric ASHA compares (robust metrics exist only at the end)
    mode: Literal["max", "min"] = "max"


class Resources(_Strict):
    cpu: Annotated[float, Field(gt=0)] = 1
    gpu: Annotated[float, Field(ge=0)] = 0
    # Up to this many trials train as one stacked model in one Ray trial (gce.stacked), each still its own
    # MLflow run; members may differ only in what keeps the model's shapes (seed, loss, α, lr, ε of AT).
    # cpu/gpu are then per stack. Whether the stack runs vectorised is measured at its start.
    stack: Annotated[int, Field(ge=1)] = 1
    # A stack trains vectorised (torch.func) or its members one step after another (exactly the solo steps):
    # null measures both at the stack's start and takes the faster; true/false force one.
    vectorize: bool | None = None

    @model_validator(mode="after")
    def _gpu_fraction(self) -> Resources:
        if self.gpu > 1 and self.gpu != int(self.gpu):
            raise ValueError("gpu: a fraction must be <= 1 (several trials share a GPU); above 1 use whole GPUs")
        return self


class SystemMetricsSpec(_Strict):
    """MLflow's system metrics on every trial run (CPU, memory, disk, network; GPU utilisation and memory on
    NVIDIA GPUs): whether packing trials on a device pays off can then be read from the runs themselves."""

    enabled: bool = True
    interval_s: Annotated[float, Field(gt=0)] = 10.0  # seconds between samples (each sample is one request)


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    experiment: str
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Dimension] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    objective: Objective | list[Objective] = Field(default_factory=Objective)
    search: SearchSpec = Field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    resources: Resources = Field(default_factory=Resources)
    system_metrics: SystemMetricsSpec = Field(default_factory=SystemMetricsSpec)
    max_concurrent_trials: Annotated[int, Field(ge=1)] | None = None
    max_failures: Annotated[int, Field(ge=0)] = 0
    address: str | None = None  # Ray address; None = $RAY_ADDRESS or a local Ray
    # Ray Tune results; None = .gce-sweeps/ray_results. A filesystem path: on a multi-node cluster, one mounted
    # at the same path on every node (the record, resume and checkpoint pruning read it as files).
    storage_path: str | None = None
    # Modules (or module:object) registering losses, models, datasets or attacks (gce.plugins); imported before
    # the rest of the spec is validated (sweeps.loading), and in every trial's worker (sweeps.runtime)
    plugins: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _default_objective(cls, raw: Any) -> Any:
        """Robust accuracy when the spec attacks, clean accuracy when it does not."""
        if isinstance(raw, dict) and "objective" not in raw:
            ev = raw.get("evaluation") if isinstance(raw.get("evaluation"), dict) else {}
            attacks = ev.get("attacks") or ev.get("autoattack")
            metric = "val/robust_acc/worst_case" if attacks else "val/clean_acc"
            raw = {**raw, "objective": {"metric": metric, "mode": "max"}}
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        objectives = self.objectives
        if self.search.algorithm == "multi_objective" and len(objectives) != 2:
            raise ValueError("objective: multi_objective search needs a list of two objectives")
        if self.search.algorithm != "multi_objective" and len(objectives) != 1:
            raise ValueError("objective: a list of objectives needs search.algorithm 'multi_objective'")
        if self.search.algorithm == "grid" and any(not d.is_grid for d in self.space.values()):
            bad = [k for k, d in self.space.items() if not d.is_grid]
            raise ValueError(f"space: {bad} are distributions; search.algorithm 'grid' takes grid dimensions "
                             "only (use random, tpe or multi_objective)")
        if self.search.algorithm != "grid" and len(self.seeds) > 1:
            raise ValueError("seeds: random, tpe and multi_objective searches sample one configuration per trial, "
                             "so several seeds would be searched over (selection bias), not repeated; give one seed "
                             "and repeat the chosen configurations over seeds with a grid spec")
        if self.search.algorithm == "multi_objective" and self.scheduler.name != "none":
            raise ValueError("scheduler: ASHA stops on one metric; use scheduler.name 'none' with multi_objective")
        if self.resources.stack > 1 and self.search.algorithm != "grid":
            raise ValueError(f"resources.stack: stacked trials need search.algorithm 'grid' (every member's "
                             f"configuration known before the stack starts), not {self.search.algorithm!r}; "
                             "or set stack: 1")
        if self.resources.stack > 1 and self.scheduler.name != "none":
            raise ValueError("resources.stack: ASHA stops a whole Ray trial on one metric, and a stack's members "
                             "differ; use scheduler.name 'none' with stack > 1, or set stack: 1")
        return self

    @property
    def objectives(self) -> list[Objective]:
        return self.objective if isinstance(self.objective, list) else [self.objective]

    # --- trials ----------------------------------------------------------------------------------------
    def grid_size(self) -> int:
        sizes = [len(d.grid) for d in self.space.values() if d.is_grid and d.when is None]
        return math.prod(sizes) * len(self.seeds) * self.search.num_samples

    def trial_count(self) -> int:
        """Trials the sweep launches (grid: conditional dimensions expand only where they apply)."""
        if self.search.algorithm == "grid":
            return len(self.grid_points()) * len(self.seeds) * self.search.num_samples
        return self.search.num_samples

    def stack_groups(self) -> list[list[dict[str, Any]]]:
        """The grid's trials ({point, seed}) in stacks of at most ``resources.stack``: trials whose configs share
        a ``gce.stacked.stack_key`` (same shapes and step), in grid order."""
        from gce.stacked import stack_key

        by_key: dict[str, list[dict[str, Any]]] = {}
        for point in self.grid_points():
            for seed in self.seeds:
                by_key.setdefault(stack_key(self.trial_config(point, seed)), []).append({"point": point, "seed": seed})
        k = self.resources.stack
        return [members[i:i + k] for members in by_key.values() for i in range(0, len(members), k)]

    def ray_trial_count(self) -> int:
        """Ray Tune trials: one per trial, or one per stack of trials."""
        if self.resources.stack > 1:
            return len(self.stack_groups()) * self.search.num_samples
        return self.trial_count()

    def stacks_text(self) -> str:
        """' in N stack(s) of up to K' when the spec stacks trials, else ''."""
        if self.resources.stack <= 1:
            return ""
        return f" in {self.ray_trial_count()} stack(s) of up to {self.resources.stack}"

    def grid_points(self) -> list[dict[str, Any]]:
        """Every assignment of the grid dimensions, conditional ones only where their `when` holds.

        A grid value may be null (e.g. ``adversarial: [null, {...}]`` unsets a base value); an inactive
        conditional dimension is left out of the point altogether."""
        plain = [(k, d.grid) for k, d in self.space.items() if d.when is None]
        conditional = [(k, d) for k, d in self.space.items() if d.when is not None]
        points = []
        for values in itertools.product(*(g for _, g in plain)):
            partial = [dict(zip([k for k, _ in plain], values, strict=True))]
            for key, dim in conditional:
                partial = [{**p, key: v} for p in partial for v in (dim.grid if dim.applies(p) else [_INACTIVE])]
            points.extend({k: v for k, v in p.items() if v is not _INACTIVE} for p in partial)
        return points

    def trial_config(self, point: dict[str, Any], seed: int) -> Any:
        """The gce TrainConfig of one trial: the base with the point's values and the seed set."""
        from gce.config import TrainConfig, set_path
        from gce.plugins import load_plugins

        load_plugins(self.plugins)  # the registries may hold the plugins' names (cheap once imported)
        nested = json.loads(json.dumps(self.base))
        for path, value in point.items():
            set_path(nested, path, value)
        nested["seed"] = seed
        return TrainConfig.from_dict(nested)

    def smoke(self) -> SweepSpec:
        """The same sweep shrunk to seconds: one epoch of a few batches, small evaluation, one seed."""
        data = self.model_dump()
        base = data["base"]
        base["epochs"], base["max_batches"] = 1, 3
        base.setdefault("data", {})["limit"] = 512
        for dim in ("epochs", "train.epochs", "max_batches", "train.max_batches"):
            data["space"].pop(dim, None)
        data["seeds"] = data["seeds"][:1]
        ev = data["evaluation"]
        ev["max_examples"] = min(ev["max_examples"], 64)
        keep = {ev["primary_eps"]} if ev.get("primary_eps") is not None else set()
        for attack in ev["attacks"]:
            eps = attack["eps"]
            attack["eps"] = sorted({eps[0], eps[-1]} | (keep & set(eps)))  # both ends and the primary ε
            if "steps" in attack:
                attack["steps"] = min(attack["steps"], 3)
        data["search"]["num_samples"] = min(data["search"]["num_samples"], 2)
        data["name"] = f"{self.name}-smoke"
        data["experiment"] = f"{self.experiment}-smoke"  # smoke runs never mix with a study's real results
        return SweepSpec.model_validate(data)
