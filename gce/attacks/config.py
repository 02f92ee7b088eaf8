"""``AttackConfig`` (one attack of an evaluation or of adversarial training), the registry, ``build_attack``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

from torch import Tensor, nn

from gce.attacks.apgd import APGD
from gce.attacks.base import Attack, LossFn, check_int, check_number
from gce.attacks.bim import BIM
from gce.attacks.cw import CWL2
from gce.attacks.fgsm import FGSM
from gce.attacks.jsma import JSMA
from gce.attacks.losses import ATTACK_LOSSES, get_attack_loss
from gce.attacks.mim import MIM
from gce.attacks.pgd import PGD
from gce.losses import NORMALIZATIONS

__all__ = ["ATTACKS", "AttackConfig", "build_attack"]

#: Attack name -> class. Each class has ``from_config(cfg, loss_fn)``, ``norms`` (first = default),
#: ``default_loss`` and ``config_fields`` (the optional fields it reads).
ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "bim": BIM,
    "pgd": PGD,
    "mim": MIM,
    "cw_l2": CWL2,
    "apgd": APGD,
    "jsma": JSMA,
}

#: Optional fields: None means "the attack's own default"; setting one the attack does not read is an error.
_OPTIONAL = ("norm", "step_size", "random_start", "loss", "alpha")


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

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(f"unknown attack name {self.name!r}; known attacks: {sorted(ATTACKS)}")
        cls = ATTACKS[self.name]
        for field in _OPTIONAL:
            if getattr(self, field) is not None and field not in cls.config_fields:
                raise ValueError(f"{field} does not apply to attack {self.name!r}; leave {field} unset (None)")
        check_number("eps", self.eps, allow_inf=cls.unbounded)
        if self.norm is not None and self.norm not in cls.norms:
            raise ValueError(
                f"norm {self.norm!r} is not supported by attack {self.name!r}; allowed values: {list(cls.norms)}"
            )
        check_int("steps", self.steps)
        if self.step_size is not None:
            check_number("step_size", self.step_size, minimum=1e-12)
        if self.random_start is not None and not isinstance(self.random_start, bool):
            raise ValueError(f"random_start must be true, false or None; got {self.random_start!r}")
        check_int("restarts", self.restarts)
        if self.loss is not None and self.loss not in ATTACK_LOSSES:
            raise ValueError(f"unknown attack loss {self.loss!r}; loss must be one of {sorted(ATTACK_LOSSES)}")
        if self.alpha is not None:
            if self.loss != "gce":
                raise ValueError(f"alpha applies only to loss 'gce'; got alpha={self.alpha!r}, loss={self.loss!r}")
            check_number("alpha", self.alpha)
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {self.normalization!r}")
        if not isinstance(self.targeted, bool):
            raise ValueError(f"targeted must be true or false; got {self.targeted!r}")
        check_number("kappa", self.kappa)
        check_number("c", self.c, minimum=1e-12)
        check_int("binary_search_steps", self.binary_search_steps)
        check_number("decay", self.decay)
        if not isinstance(self.theta, (int, float)) or not (0 < abs(self.theta) <= 1):
            raise ValueError(f"theta must lie in [-1, 1] and not be 0; got {self.theta!r}")
        cls.from_config(self, None)  # the attack's own checks across fields (e.g. restarts need randomness)

    def label(self) -> str:
        """Short stable key for metric names: ``val/robust_acc/<label>/eps=<eps>``.

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
    loss_name = cfg.loss if cfg.loss is not None else cls.default_loss
    loss_fn = None
    if loss_name is not None:
        loss_fn = get_attack_loss(
            loss_name,
            alpha=cfg.alpha,
            normalization=cfg.normalization,
            kappa=cfg.kappa,
            targeted=cfg.targeted,
            train_loss=train_loss,
        )
    return cls.from_config(cfg, loss_fn)
