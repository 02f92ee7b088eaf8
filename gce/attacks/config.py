"""``AttackConfig`` (one attack of an evaluation or of adversarial training), the registry, ``build_attack``."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, fields

from torch import Tensor, nn

from gce.attacks.apgd import APGD, APGDTargeted
from gce.attacks.autoattack import AutoAttack
from gce.attacks.base import Attack, LossFn
from gce.attacks.bim import BIM
from gce.attacks.cw import CWL2
from gce.attacks.fab import FAB, FABTargeted
from gce.attacks.fgsm import FGSM
from gce.attacks.jsma import JSMA
from gce.attacks.losses import get_attack_loss
from gce.attacks.mim import MIM
from gce.attacks.pgd import PGD
from gce.attacks.square import Square
from gce.losses import cross_entropy

__all__ = ["ATTACKS", "AttackConfig", "build_attack"]

#: Attack name -> class. ``build_attack`` calls the class with the config fields its constructor takes; each
#: class has ``norms`` (first = default) and ``default_loss``.
ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "bim": BIM,
    "pgd": PGD,
    "mim": MIM,
    "cw_l2": CWL2,
    "apgd": APGD,
    "apgd_t": APGDTargeted,
    "autoattack": AutoAttack,
    "jsma": JSMA,
    "fab": FAB,
    "fab_t": FABTargeted,
    "square": Square,
}

@dataclass
class AttackConfig:
    """One attack and its budget. ``None`` fields take the attack's default (see each attack's docstring).

    - ``eps``: radius in [0, 1] pixel units (L∞/L2); γ, the fraction of features, for jsma (L0); ``inf``
      (YAML ``.inf``) is allowed for cw_l2 only, the unbounded C&W attack.
    - ``norm``: "linf" | "l2" ("l0" for jsma); None = the attack's first supported norm.
    - ``step_size``: None = 2.5·eps/steps for PGD, eps/steps for BIM and MIM; Adam's lr for cw_l2 (1e-2).
    - ``random_start``: None = True for PGD and APGD, False for FGSM, BIM and MIM.
    - ``loss``: a name of ``ATTACK_LOSSES``; None = "ce" ("cw" for cw_l2; jsma takes no loss).
      "train" attacks with the model's training loss, passed to ``build_attack`` as ``train_loss``.
    - ``alpha``, ``normalization``: GCE's α and normaliser when ``loss == "gce"``.
    - ``kappa``: confidence of the "cw" margin loss and of cw_l2; ``c``, ``binary_search_steps``: cw_l2.
    - ``decay``: MIM's momentum; ``theta``: JSMA's per-feature change.
    - ``targets``: how many target classes apgd_t and fab_t try (the runner-up classes of the clean logits,
      AutoAttack's ``n_target_classes``; None = 9).
    - ``queries``, ``p_init``: Square's query budget and initial square size (None = 5000 and 0.8).
    - ``version``: autoattack's attack list, "standard" | "plus" | "rand" (None = "standard").
    """

    name: str = "pgd"
    eps: float = 0.3
    norm: str | None = None
    steps: int = 40
    step_size: float | None = None
    random_start: bool | None = None
    restarts: int = 1
    loss: str | None = None
    alpha: float | None = None
    normalization: str = "paper"
    targeted: bool = False
    kappa: float = 0.0
    c: float = 1e-2
    binary_search_steps: int = 5
    decay: float = 1.0
    theta: float = 1.0
    targets: int | None = None
    queries: int | None = None
    p_init: float | None = None
    version: str | None = None

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(f"unknown attack name {self.name!r}; known attacks: {sorted(ATTACKS)}")
        taken = _taken(ATTACKS[self.name])
        for f in fields(self):  # optional fields: None = the attack's default; set on an attack that never reads it
            if f.default is None and getattr(self, f.name) is not None and f.name not in taken:
                raise ValueError(f"{f.name} does not apply to attack {self.name!r}; leave {f.name} unset (None)")
        # Every other option is checked once, where it is used: by the attack loss and the attack's constructor.
        build_attack(self, train_loss=cross_entropy)  # a stand-in for loss "train": the real one comes at build time

    def label(self) -> str:
        """Short stable key for metric names: ``val/robust_acc/<label>/eps_<eps>`` (``gce.metrics``).

        The name, then what differs from the attack's defaults: the norm, the loss (with α when it is not
        1/3), "targeted". E.g. "pgd", "pgd-l2", "pgd-gce", "pgd-gce0.5", "apgd-dlr", "cw_l2". Budgets
        (steps, restarts, step size) are not part of it: give an evaluation one budget per attack name.
        """
        cls = ATTACKS[self.name]
        parts = [self.name]
        if self.norm is not None and self.norm != cls.norms[0]:
            parts.append(self.norm)
        if self.loss is not None and self.loss != cls.default_loss:
            alpha = 1 / 3 if self.alpha is None else self.alpha
            parts.append(f"gce{alpha:g}" if self.loss == "gce" and not math.isclose(alpha, 1 / 3) else self.loss)
        if self.targeted:
            parts.append("targeted")
        if self.version not in (None, "standard"):
            parts.append(self.version)
        return "-".join(parts)

    def to_dict(self) -> dict[str, object]:
        """The fields as a plain dict (for flat params: prefix the keys)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def build_attack(cfg: AttackConfig, train_loss: LossFn | None = None) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """The attack a config describes: ``attack(model, x, y) -> x_adv``.

    ``train_loss`` is the model's training loss (it must accept ``reduction="none"``), used when
    ``cfg.loss == "train"``: the paper's adaptive setting, and what ``gce.train`` passes for Madry et al.'s
    PGD adversarial training. The result stays in the threat model, restores the model's modes and leaves
    no gradients on the parameters.
    """
    if not isinstance(cfg, AttackConfig):
        raise ValueError(f"cfg must be an AttackConfig; got {type(cfg).__name__}")
    cls = ATTACKS[cfg.name]
    taken = _taken(cls)
    kwargs = {p: getattr(cfg, f) for f, p in taken.items() if p != "loss_fn" and getattr(cfg, f) is not None}
    if "loss" in taken:  # None options are left to the constructor's defaults; the loss is built here
        kwargs["loss_fn"] = get_attack_loss(
            cfg.loss if cfg.loss is not None else cls.default_loss,
            alpha=cfg.alpha,
            normalization=cfg.normalization,
            kappa=cfg.kappa,
            targeted=cfg.targeted,
            train_loss=train_loss,
        )
    return cls(**kwargs)


def _taken(cls: type[Attack]) -> dict[str, str]:
    """The ``AttackConfig`` fields the attack's constructor takes -> the parameter each one feeds: same-named
    parameters, the class's ``aliases``, and the loss's fields when it takes a ``loss_fn`` (built from them)."""
    params = inspect.signature(cls).parameters
    loss = {f: "loss_fn" for f in ("loss", "alpha", "normalization", "kappa")} if "loss_fn" in params else {}
    taken = loss | {cls.aliases.get(param, param): param for param in params}
    return {f.name: taken[f.name] for f in fields(AttackConfig) if f.name in taken}
