"""FGSM: the single-step attack of Goodfellow et al., the baseline every iterative attack must beat."""

from __future__ import annotations

from typing import ClassVar

from gce.attacks.base import LossFn
from gce.attacks.iterative import IterativeAttack

__all__ = ["FGSM"]


class FGSM(IterativeAttack):
    r"""FGSM in the paper "Explaining and Harnessing Adversarial Examples" (Goodfellow et al., ICLR 2015),
    https://arxiv.org/abs/1412.6572

    Distance measure: L∞ (default), or L2 (the "fast gradient method": one step of ε along ∇/‖∇‖₂).

    One step of size ε from x (or from a random point of the ball with ``random_start=True``, R+FGSM-like),
    then projection onto the ε-ball ∩ [0, 1]. It is the shared loop of ``IterativeAttack`` with one step.

    Arguments:
        eps (float): radius of the ball, in [0, 1] pixel units.
        norm (str): "linf" or "l2". (Default: "linf")
        loss_fn: per-sample attack loss, called as loss_fn(logits, y, reduction="none"). (Default: CE)
        targeted (bool): minimise the loss at the target labels ``y`` instead. (Default: False)
        random_start (bool | None): start at a random point of the ball. (Default: False)
        restarts (int): runs kept per example by worst case; > 1 needs random_start. (Default: 1)

    Shape:
        - x: (B, C, H, W) or (B, D), floating point in [0, 1].
        - y: (B,) int64 class indices (targets when ``targeted``).
        - output: like x.

    Example::
        >>> attack = FGSM(eps=0.3)
        >>> x_adv = attack(model, x, y)
    """

    name: ClassVar[str] = "fgsm"

    def __init__(
        self,
        eps: float,
        *,
        norm: str | None = None,
        loss_fn: LossFn | None = None,
        targeted: bool = False,
        random_start: bool | None = None,
        restarts: int = 1,
    ) -> None:
        """``steps`` and ``step_size`` are not options: one step of ε."""
        super().__init__(
            eps, norm=norm, steps=1, random_start=random_start, restarts=restarts, loss_fn=loss_fn, targeted=targeted
        )

    @staticmethod
    def default_step_size(eps: float, steps: int) -> float:
        return eps
