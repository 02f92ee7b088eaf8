"""AutoAttack (Croce & Hein, ICML 2020, https://arxiv.org/abs/2003.01690) as one attack of the registry.

The field's standard of evaluation: a fixed chain of parameter-free attacks, each run only on the points no
earlier one fooled (a point, once fooled, stays fooled). The versions follow the reference code
(fra31/auto-attack, ``AutoAttack._set_version``):

- ``standard``: APGD-CE (100 steps, 1 run), APGD-T (9 targets, 100 steps), FAB-T (9 targets, 100 steps),
  Square (5,000 queries, p_init 0.8);
- ``plus``: APGD-CE and APGD-DLR (5 runs each), FAB (5 runs), Square, APGD-T, FAB-T (5 runs per target).

The ``rand`` version (APGD with EOT over 20 draws, for randomised defences) is not offered: none of our
models is randomised at inference, and EOT is not implemented here.

Because it is one attack, AutoAttack joins the worst case and the metric schema like any other (label
``autoattack``). What each member of the chain added is kept in ``record`` for the evaluation to report as the
chain's cumulative numbers (``robust_acc_chain/autoattack.<member>/eps_<ε>``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from gce.attacks.base import Attack
from gce.attacks.losses import dlr_loss

__all__ = ["VERSIONS", "AutoAttack", "member_labels"]

#: version -> the chain's members, in order: (label, registry name, options)
VERSIONS: dict[str, list[tuple[str, str, dict]]] = {
    "standard": [
        ("apgd-ce", "apgd", {"steps": 100, "restarts": 1}),
        ("apgd-t", "apgd_t", {"steps": 100, "targets": 9}),
        ("fab-t", "fab_t", {"steps": 100, "targets": 9}),
        ("square", "square", {"queries": 5000, "p_init": 0.8, "rescale_schedule": False}),
    ],
    "plus": [
        ("apgd-ce", "apgd", {"steps": 100, "restarts": 5}),
        ("apgd-dlr", "apgd", {"steps": 100, "restarts": 5, "loss_fn": dlr_loss}),
        ("fab", "fab", {"steps": 100, "restarts": 5}),
        ("square", "square", {"queries": 5000, "p_init": 0.8, "rescale_schedule": False}),
        ("apgd-t", "apgd_t", {"steps": 100, "targets": 9}),
        ("fab-t", "fab_t", {"steps": 100, "targets": 9, "restarts": 5}),  # the reference's FAB object, 5 runs
    ],
}


def member_labels(version: str | None) -> list[str]:
    """The chain's member labels for ``version`` (None = "standard"), as they appear in metric keys."""
    return [f"autoattack.{label}" for label, _, _ in VERSIONS[_check_version(version)]]


def _check_version(version: str | None) -> str:
    version = "standard" if version is None else version
    if version not in VERSIONS:
        extra = " ('rand' needs EOT for randomised defences, not implemented)" if version == "rand" else ""
        raise ValueError(f"version {version!r} is not supported{extra}; allowed values: {sorted(VERSIONS)}")
    return version


class AutoAttack(Attack):
    r"""AutoAttack's chain (module docstring) at one ε, L∞ (default) or L2, untargeted.

    Arguments:
        eps (float): radius of the ball, in [0, 1] pixel units.
        norm (str): "linf" or "l2". (Default: "linf")
        version (str): "standard" or "plus". (Default: "standard")

    After each call, ``record`` holds one dict per call: member label -> (B,) bool, fooled by that member or
    an earlier one (the chain's cumulative bookkeeping, in the batch's order).
    """

    name: ClassVar[str] = "autoattack"
    default_loss: ClassVar[str | None] = None

    def __init__(self, eps: float, *, norm: str | None = None, version: str | None = None) -> None:
        super().__init__(eps, norm=norm)
        self.version = _check_version(version)
        self.record: list[dict[str, Tensor]] = []

    def members(self, classes: int) -> list[tuple[str, Attack]]:
        from gce.attacks.config import ATTACKS

        out = []
        for label, name, options in VERSIONS[self.version]:
            options = dict(options)
            if "targets" in options:  # as the reference does for datasets with fewer classes
                options["targets"] = min(options["targets"], classes - 1)
            if name not in ATTACKS:
                raise ValueError(f"autoattack {self.version}: attack {name!r} is not in the registry")
            attack = ATTACKS[name](self.eps, norm=self.norm, **options)
            attack.early_stop = self.early_stop
            out.append((label, attack))
        return out

    def labels(self) -> list[str]:
        """The metric labels of the chain's members, in order (``record``'s keys)."""
        return member_labels(self.version)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        # Who is fooled is decided by the model itself (never its compiled twin): it is what the score uses.
        with torch.no_grad():
            logits = model(x)
        fooled = logits.argmax(1) != y
        out, record = x.clone(), {}
        for label, attack in self.members(logits.shape[1]):
            todo = (~fooled).nonzero().squeeze(1)
            if todo.numel():
                candidate = attack(model, x[todo], y[todo])
                with torch.no_grad():
                    now = model(candidate).argmax(1) != y[todo]
                out[todo[now]], fooled[todo[now]] = candidate[now], True
            record[f"autoattack.{label}"] = fooled.clone()
        self.record.append(record)
        return out

