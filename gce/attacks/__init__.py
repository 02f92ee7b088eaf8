"""Adversarial attacks on classifiers over [0, 1] inputs, each taking the attack loss as an argument.

FGSM, BIM, PGD (L∞/L2, random start, restarts) and MIM share one projected-ascent loop (``iterative.py``)
with a step rule; C&W-L2, APGD (CE/DLR) and JSMA have their own, as have AutoAttack's FAB/FAB-T (minimal-norm,
no attack loss) and Square (gradient-free, on the margin). Look attacks up by name in ``ATTACKS``,
or describe one with an ``AttackConfig`` and call ``build_attack``::

    attack = build_attack(AttackConfig(name="pgd", eps=0.3, steps=40, step_size=0.01, loss="gce"))
    x_adv = attack(model, x, y)

Conventions (inputs, per-sample losses, modes, gradients) are in ``gce.attacks.base``.
"""

from gce.attacks.apgd import APGD, APGDTargeted
from gce.attacks.autoattack import AutoAttack
from gce.attacks.base import Attack, LossFn, eval_mode
from gce.attacks.bim import BIM
from gce.attacks.config import ATTACKS, AttackConfig, build_attack
from gce.attacks.cw import CWL2
from gce.attacks.fab import FAB, FABTargeted
from gce.attacks.fgsm import FGSM
from gce.attacks.iterative import IterativeAttack, MomentumStep, StepRule
from gce.attacks.jsma import JSMA
from gce.attacks.losses import ATTACK_LOSSES, dlr_loss, get_attack_loss, margin_loss
from gce.attacks.mim import MIM
from gce.attacks.pgd import PGD
from gce.attacks.square import Square

__all__ = [
    "APGD",
    "APGDTargeted",
    "AutoAttack",
    "ATTACKS",
    "ATTACK_LOSSES",
    "BIM",
    "CWL2",
    "FAB",
    "FABTargeted",
    "FGSM",
    "JSMA",
    "MIM",
    "PGD",
    "Square",
    "Attack",
    "AttackConfig",
    "IterativeAttack",
    "LossFn",
    "MomentumStep",
    "StepRule",
    "build_attack",
    "dlr_loss",
    "eval_mode",
    "get_attack_loss",
    "margin_loss",
]
