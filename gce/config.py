"""The training configuration: one dataclass per component, validated on construction.

The whole config is captured once and stored with every checkpoint and tracked run. It flows one way:
nested dict (from a YAML spec) -> these objects -> a flat ``{"optim.lr": ...}`` dict at the edges (Tune's
param space, MLflow params) -> back to objects inside a trial. gce imports neither pydantic nor yaml: the
sweep spec (sweeps/) validates its own layer and builds these.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gce.validation import is_int, is_number

if TYPE_CHECKING:
    from gce.attacks import AttackConfig

__all__ = [
    "AdvTrainingConfig",
    "ConfigError",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "set_path",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "step", "cosine")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
EPS_SCHEDULES = ("linear", "cosine")


class ConfigError(ValueError):
    """A config field holds a value outside its allowed set; the message names the field."""


def _require(ok: bool, field_name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: must be {allowed}; got {value!r}")


@dataclass
class DataConfig:
    dataset: str = "mnist5k"
    root: str | None = None
    download: bool = False
    val_size: float = 0.1
    limit: int | None = None  # cap on training examples (smoke runs)
    augment: str | None = None  # None -> the dataset's default
    eval_batch_size: int = 1000

    def __post_init__(self) -> None:
        from gce.data import DATASETS

        _require(self.dataset in DATASETS, "data.dataset", f"one of {sorted(DATASETS)}", self.dataset)
        _require(is_number(self.val_size) and self.val_size > 0, "data.val_size",
                 "a fraction in (0, 1) or a count >= 1", self.val_size)
        _require(self.limit is None or is_int(self.limit), "data.limit", "null or an integer >= 1", self.limit)
        _require(is_int(self.eval_batch_size), "data.eval_batch_size", "an integer >= 1", self.eval_batch_size)


@dataclass
class ModelConfig:
    name: str = "lenet5"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from gce.models import MODELS

        _require(self.name in MODELS, "model.name", f"one of {sorted(MODELS)}", self.name)


@dataclass
class LossConfig:
    name: str = "gce"
    alpha: float | None = None  # GCE only; None -> 1/3 (the paper's default)
    normalization: str = "paper"  # "paper": 1/log(K-1); "code": 1/log K as in the authors' code
    kwargs: dict[str, Any] = field(default_factory=dict)  # the loss's own options: label smoothing's smoothing, …

    def __post_init__(self) -> None:
        from gce.losses import LOSSES, NORMALIZATIONS, get_loss, loss_options

        _require(self.name in LOSSES, "loss.name", f"one of {sorted(LOSSES)}", self.name)
        _require(isinstance(self.kwargs, dict), "loss.kwargs", "a mapping of the loss's options", self.kwargs)
        known = loss_options(self.name)
        for key in self.kwargs:
            _require(key in known, f"loss.kwargs.{key}",
                     f"an option of loss {self.name!r} (its options: {sorted(known) or 'none'})", key)
        if self.kwargs:  # the loss checks its own values: try them once on a tiny batch, before any training
            import torch

            try:
                get_loss(self.name, kwargs=self.kwargs)(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))
            except (ValueError, TypeError) as err:
                raise ConfigError(f"loss.kwargs: {err}") from err
        _require(self.normalization in NORMALIZATIONS, "loss.normalization", f"one of {list(NORMALIZATIONS)}",
                 self.normalization)
        if self.name == "gce":
            if self.alpha is None:
                self.alpha = 1 / 3
            _require(is_number(self.alpha, 0), "loss.alpha", "a finite number >= 0", self.alpha)
        else:
            _require(self.alpha is None, "loss.alpha", f"null for loss {self.name!r} (α applies only to 'gce')",
                     self.alpha)


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: tuple[float, float] = (0.9, 0.99)  # adam/adamw; the authors' (0.9, 0.99)
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        _require(self.name in OPTIMIZERS, "optim.name", f"one of {list(OPTIMIZERS)}", self.name)
        _require(is_number(self.lr) and self.lr > 0, "optim.lr", "a finite number > 0", self.lr)
        _require(is_number(self.momentum) and 0 <= self.momentum < 1, "optim.momentum", "in [0, 1)", self.momentum)
        _require(len(self.betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in self.betas), "optim.betas",
                 "two numbers in [0, 1)", self.betas)
        _require(is_number(self.weight_decay, 0), "optim.weight_decay", "a number >= 0",
                 self.weight_decay)
        _require(not self.nesterov or (self.name == "sgd" and self.momentum > 0), "optim.nesterov",
                 "true only with optim.name 'sgd' and momentum > 0", self.nesterov)


@dataclass
class ScheduleConfig:
    name: str = "none"
    step_size: int = 30  # step: epochs between decays
    gamma: float = 0.1  # step: decay factor
    warmup_epochs: int = 0

    def __post_init__(self) -> None:
        _require(self.name in SCHEDULES, "schedule.name", f"one of {list(SCHEDULES)}", self.name)
        _require(is_int(self.step_size), "schedule.step_size", "an integer >= 1", self.step_size)
        _require(is_number(self.gamma) and 0 < self.gamma <= 1, "schedule.gamma", "in (0, 1]", self.gamma)
        _require(is_int(self.warmup_epochs, 0), "schedule.warmup_epochs", "an integer >= 0", self.warmup_epochs)


@dataclass
class AdvTrainingConfig:
    """How ``adversarial`` training runs (``gce.train``); ignored when ``adversarial`` is null.

    PGD-AT at a large ε from scratch can collapse to a constant prediction (MNIST, ε = 0.3, Adam 1e-3: two seeds
    of three); ramping the attack up from a weak one lets the model learn the clean task first.

    - ``eps_warmup_epochs``: the training attack's ε ramps from ~0 to ``adversarial.eps`` over these epochs
      (fractions allowed), updated every batch; 0 = off. ``eps_schedule``: the ramp's shape, "linear" or
      "cosine" (slow at both ends). The step size follows: 2.5·ε_t/steps_t when ``adversarial.step_size`` is
      null, else the configured one scaled by (ε_t/ε)·(steps/steps_t).
    - ``steps_warmup_epochs``: the attack's steps ramp linearly from 1 to ``adversarial.steps``; 0 = off.
    - ``clean_weight``: w of loss = (1-w)·L(x_adv) + w·L(x); 0 = Madry et al.'s pure adversarial loss.
    - ``val_steps``, ``val_examples``: every epoch, ``val/adv_acc`` = accuracy under PGD (CE loss, random
      start) at the full ``adversarial.eps`` and its norm, with ``val_steps`` steps, on the first
      ``val_examples`` validation images (fixed subset, fixed random start: epochs compare like with like).
    - ``early_stop_patience``: stop once ``val/adv_acc`` has not improved for this many epochs and end with the
      best epoch's weights (robust overfitting, Rice et al. 2020, https://arxiv.org/abs/2002.11569); null = off.

    The inner attack's loss is ``adversarial.loss``: null/"ce" = cross-entropy, "train" = the model's own
    training objective (GCE; CE + complement entropy for COT).
    """

    eps_warmup_epochs: float = 0
    eps_schedule: str = "linear"
    steps_warmup_epochs: float = 0
    clean_weight: float = 0.0
    val_steps: int = 10
    val_examples: int = 500
    early_stop_patience: int | None = None

    def __post_init__(self) -> None:
        _require(is_number(self.eps_warmup_epochs, 0), "adv_training.eps_warmup_epochs", "a number of epochs >= 0",
                 self.eps_warmup_epochs)
        _require(self.eps_schedule in EPS_SCHEDULES, "adv_training.eps_schedule", f"one of {list(EPS_SCHEDULES)}",
                 self.eps_schedule)
        _require(is_number(self.steps_warmup_epochs, 0), "adv_training.steps_warmup_epochs",
                 "a number of epochs >= 0", self.steps_warmup_epochs)
        _require(is_number(self.clean_weight) and 0 <= self.clean_weight <= 1, "adv_training.clean_weight",
                 "a number in [0, 1]", self.clean_weight)
        _require(is_int(self.val_steps), "adv_training.val_steps", "an integer >= 1", self.val_steps)
        _require(is_int(self.val_examples), "adv_training.val_examples", "an integer >= 1", self.val_examples)
        patience = self.early_stop_patience
        _require(patience is None or is_int(patience), "adv_training.early_stop_patience", "null or an integer >= 1",
                 patience)


@dataclass
class TrainConfig:
    """Everything ``gce.train.fit`` needs; the defaults are the paper's MNIST setup (authors' code)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    epochs: int = 20
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool | None = None  # None: on for models with convolutions (CPU and CUDA)
    compile: bool = False
    max_batches: int | None = None  # per epoch (smoke runs)
    adversarial: AttackConfig | None = None  # PGD adversarial training (Madry et al. 2018) when set
    adv_training: AdvTrainingConfig = field(default_factory=AdvTrainingConfig)  # its schedules, mix, stopping

    _SECTIONS = ("data", "model", "loss", "optim", "schedule", "adv_training")

    def __post_init__(self) -> None:
        _require(is_int(self.epochs), "train.epochs", "an integer >= 1", self.epochs)
        _require(is_int(self.batch_size), "train.batch_size", "an integer >= 1", self.batch_size)
        _require(is_int(self.seed, None), "train.seed", "an integer", self.seed)
        _require(self.device in DEVICES or str(self.device).startswith("cuda:"), "train.device",
                 f"one of {list(DEVICES)} or 'cuda:N'", self.device)
        _require(self.precision in PRECISIONS, "train.precision", f"one of {list(PRECISIONS)}", self.precision)
        _require(self.max_batches is None or is_int(self.max_batches), "train.max_batches",
                 "null or an integer >= 1", self.max_batches)
        if isinstance(self.adversarial, dict):
            from gce.attacks import AttackConfig

            self.adversarial = AttackConfig(**self.adversarial)
        if isinstance(self.adv_training, dict):
            self.adv_training = AdvTrainingConfig(**_known(AdvTrainingConfig, self.adv_training, "adv_training"))
        if self.adversarial is not None:
            from gce.attacks import ATTACKS

            norm = self.adversarial.norm or ATTACKS[self.adversarial.name].norms[0]
            _require(norm in ("linf", "l2") and math.isfinite(self.adversarial.eps), "adversarial",
                     "an L∞ or L2 attack of finite ε (val/adv_acc runs PGD at its ε and norm)", self.adversarial)

    # --- conversions -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested plain-Python dict (JSON/YAML-safe; stored in checkpoints)."""
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a nested dict; unknown keys are errors that name the key and the known ones."""
        d = dict(d)
        sections = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "optim": OptimConfig,
                    "schedule": ScheduleConfig, "adv_training": AdvTrainingConfig}
        kwargs: dict[str, Any] = {}
        for name, klass in sections.items():
            if name in d:
                sub = d.pop(name) or {}
                _require(isinstance(sub, dict), name, "a mapping", sub)
                kwargs[name] = klass(**_known(klass, sub, name))
        top = _known(cls, d, "train")
        return cls(**kwargs, **top)

    def to_flat(self) -> dict[str, Any]:
        """Flat ``{"section.key": value}`` with scalars only: Tune's param space and MLflow params."""
        flat: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            prefix = key if key in self._SECTIONS else "train"
            if isinstance(value, dict) and key != "adversarial":
                for k, v in value.items():
                    _flatten(flat, f"{prefix}.{k}", v)
            elif key == "adversarial":
                if value is None:
                    flat["adversarial"] = None
                else:
                    _flatten(flat, "adversarial", value)
            else:
                flat[f"train.{key}"] = value
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> TrainConfig:
        nested: dict[str, Any] = {}
        for key, value in flat.items():
            set_path(nested, key, value)
        return cls.from_dict(nested)


def set_path(nested: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted config path ("optim.lr", "train.epochs" = "epochs") in a nested dict, creating sections
    (also over a null one, e.g. "adversarial.eps" when adversarial is null)."""
    parts = path.split(".")
    if parts[0] == "train":
        parts = parts[1:]
    node = nested
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _flatten(out: dict[str, Any], prefix: str, value: Any) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(out, f"{prefix}.{k}", v)
    else:
        out[prefix] = list(value) if isinstance(value, tuple) else value


def _known(klass: type, d: dict[str, Any], section: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(klass) if not f.name.startswith("_")}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}; known keys: {sorted(names)}")
    return d
