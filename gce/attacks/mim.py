"""MIM (MI-FGSM): BIM with a momentum-accumulated gradient, the paper's "MIM" rows."""

from __future__ import annotations

from typing import ClassVar

from gce.attacks.base import LossFn
from gce.attacks.iterative import IterativeAttack, MomentumStep

__all__ = ["MIM"]


class MIM(IterativeAttack):
    r"""MI-FGSM in the paper "Boosting Adversarial Attacks with Momentum" (Dong et al., CVPR 2018),
    https://arxiv.org/abs/1710.06081

    Distance measure: L∞.

    The shared projected-ascent loop with the ``MomentumStep`` rule: gᵗ⁺¹ = μ·gᵗ + ∇/‖∇‖₁ and
    xᵗ⁺¹ = Π(xᵗ + step_size · sign(gᵗ⁺¹)), from the clean input by default; the default step is ε/steps
    (Dong et al.). torchattacks' MIFGSM is the same with ``alpha`` for the step.

    Arguments:
        eps (float): radius of the L∞ ball, in [0, 1] pixel units.
        steps (int): number of steps. (Default: 10)
        step_size (float | None): step length; None gives eps / steps.
        decay (float): momentum factor μ. (Default: 1.0)
        loss_fn: per-sample attack loss, called as loss_fn(logits, y, reduction="none"). (Default: CE)
        targeted (bool): minimise the loss at the target labels ``y`` instead. (Default: False)
        random_start (bool | None): start at a random point of the ball. (Default: False)
        restarts (int): runs kept per example by worst case; > 1 needs random_start. (Default: 1)

    Shape:
        - x: (B, C, H, W) or (B, D), floating point in [0, 1].
        - y: (B,) int64 class indices (targets when ``targeted``).
        - output: like x.

    Example::
        >>> attack = MIM(eps=0.3, steps=40, decay=1.0)
        >>> x_adv = attack(model, x, y)
    """

    name: ClassVar[str] = "mim"
    norms: ClassVar[tuple[str, ...]] = ("linf",)

    def __init__(
        self,
        eps: float,
        *,
        norm: str | None = None,
        steps: int = 10,
        step_size: float | None = None,
        decay: float = 1.0,
        loss_fn: LossFn | None = None,
        targeted: bool = False,
        random_start: bool | None = None,
        restarts: int = 1,
    ) -> None:
        super().__init__(
            eps,
            norm=norm,
            steps=steps,
            step_size=step_size,
            random_start=random_start,
            restarts=restarts,
            loss_fn=loss_fn,
            targeted=targeted,
            rule=MomentumStep(decay),
        )
