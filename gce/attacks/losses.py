"""Attack losses: what a gradient attack ascends. A credible evaluation uses more than one (Carlini et al. 2019).

- ``ce``: cross-entropy, the usual default.
- ``gce`` / ``cot``: the training objectives of ``gce.losses``, for the paper's adaptive setting (the authors
  attack GCE models with the GCE loss). The attacker *maximises* what training minimises.
- ``cw``: the C&W margin max_{j≠y} z_j − z_y (Carlini & Wagner 2017, https://arxiv.org/abs/1608.04644),
  capped at κ: the margin attack of Madry et al. and the objective of ``cw_l2``.
- ``dlr``: the Difference of Logits Ratio of Croce & Hein 2020 (https://arxiv.org/abs/2003.01690), invariant
  to shifting and rescaling the logits, which defeats the "saturated softmax" kind of gradient masking.
- ``train``: whatever loss the model was trained with, passed to ``get_attack_loss`` as ``train_loss``.

Every loss takes (logits, y, reduction="none" | "mean" | "sum") and is larger when the example is closer to
being misclassified as anything but ``y`` (untargeted) - a targeted attack minimises it at the target.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.nn.functional as F
from torch import Tensor

from gce.attacks.base import LossFn
from gce.losses import NORMALIZATIONS, complement_entropy, cross_entropy, guided_complement_entropy, reduce_per_sample
from gce.validation import check_number

__all__ = ["ATTACK_LOSSES", "dlr_loss", "get_attack_loss", "margin_loss"]


def _label_and_best_other(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    z = logits.float()
    z_y = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(dim=1)
    return z_y, other


def margin_loss(
    logits: Tensor,
    y: Tensor,
    kappa: float | None = None,
    targeted: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """C&W margin max_{j≠y} z_j − z_y, the negated f of Carlini & Wagner (their Eq. (6) family).

    With ``kappa`` the margin is capped where the attack has succeeded with confidence κ: at +κ for an
    untargeted attack (which maximises it), at −κ from below for a targeted one (which minimises it at the
    target). Beyond the cap the gradient is zero, so the attack stops pushing - as C&W intend.
    """
    z_y, other = _label_and_best_other(logits, y)
    margin = other - z_y
    if kappa is not None:
        margin = margin.clamp(min=-kappa) if targeted else margin.clamp(max=kappa)
    return reduce_per_sample(margin, reduction)


def dlr_loss(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """DLR = −(z_y − max_{j≠y} z_j) / (z_π1 − z_π3 + 1e-12), π sorting the logits in decreasing order.

    Needs at least 3 classes. Written like the reference implementation (auto-attack's ``dlr_loss``).
    """
    if logits.dim() != 2 or logits.shape[1] < 3:
        raise ValueError(f"dlr needs logits of shape (batch, classes >= 3); got {tuple(logits.shape)}")
    z = logits.float()
    top3 = z.topk(3, dim=1).values
    z_y, other = _label_and_best_other(z, y)
    return reduce_per_sample(-(z_y - other) / (top3[:, 0] - top3[:, 2] + 1e-12), reduction)


def _ce(**_: object) -> LossFn:
    return cross_entropy


def _gce(*, alpha: float | None, normalization: str, **_: object) -> LossFn:
    return partial(guided_complement_entropy, alpha=1 / 3 if alpha is None else alpha, normalization=normalization)


def _cot(*, normalization: str, **_: object) -> LossFn:
    return partial(complement_entropy, normalization=normalization)


def _cw(*, kappa: float, targeted: bool, **_: object) -> LossFn:
    return partial(margin_loss, kappa=kappa, targeted=targeted)


def _dlr(**_: object) -> LossFn:
    return dlr_loss


def _train(*, train_loss: LossFn | None, **_: object) -> LossFn:
    if train_loss is None:
        raise ValueError("attack loss 'train' needs the model's training loss: pass train_loss")
    return train_loss


#: Attack-loss name -> factory(alpha=, normalization=, kappa=, targeted=, train_loss=) -> loss_fn.
#: Factories rather than functions because "gce", "cw" and "train" are bound to options at build time.
ATTACK_LOSSES: dict[str, Callable[..., LossFn]] = {
    "ce": _ce,
    "gce": _gce,
    "cot": _cot,
    "cw": _cw,
    "dlr": _dlr,
    "train": _train,
}


def get_attack_loss(
    name: str,
    *,
    alpha: float | None = None,
    normalization: str = "paper",
    kappa: float = 0.0,
    targeted: bool = False,
    train_loss: LossFn | None = None,
) -> LossFn:
    """Look an attack loss up by name and bind its options; bad names and options raise ValueError.

    ``alpha`` only applies to "gce" (an α that changes nothing is an error, as in ``gce.losses.get_loss``).
    """
    if name not in ATTACK_LOSSES:
        raise ValueError(f"unknown attack loss {name!r}; known: {sorted(ATTACK_LOSSES)}")
    if alpha is not None:
        if name != "gce":
            raise ValueError(f"alpha applies only to attack loss 'gce'; got alpha={alpha!r} for loss {name!r}")
        check_number("alpha", alpha)
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {normalization!r}")
    check_number("kappa", kappa)
    return ATTACK_LOSSES[name](
        alpha=alpha, normalization=normalization, kappa=kappa, targeted=targeted, train_loss=train_loss
    )
