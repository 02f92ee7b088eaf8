"""BIM (I-FGSM): iterated FGSM from the clean input, the paper's "BIM" rows."""

from __future__ import annotations

from typing import ClassVar

from gce.attacks.iterative import IterativeAttack

__all__ = ["BIM"]


class BIM(IterativeAttack):
    r"""BIM or iterative FGSM in the paper "Adversarial Examples in the Physical World"
    (Kurakin et al., ICLR 2017 workshop), https://arxiv.org/abs/1607.02533

    Distance measure: L∞ (default) or L2.

    ``steps`` steps of ``step_size`` from the clean input, each projected onto the ε-ball ∩ [0, 1]. It is PGD
    without the random start and with a smaller default step, so ``steps · step_size = ε``: the iterate can
    just reach the boundary. torchattacks calls the step size ``alpha`` and has no default tied to ε.

    Arguments:
        eps (float): radius of the ball, in [0, 1] pixel units.
        norm (str): "linf" or "l2". (Default: "linf")
        steps (int): number of steps. (Default: 10)
        step_size (float | None): step length; None gives eps / steps.
        loss_fn: per-sample attack loss, called as loss_fn(logits, y, reduction="none"). (Default: CE)
        targeted (bool): minimise the loss at the target labels ``y`` instead. (Default: False)
        random_start (bool | None): start at a random point of the ball. (Default: False)
        restarts (int): runs kept per example by worst case; > 1 needs random_start. (Default: 1)

    Shape:
        - x: (B, C, H, W) or (B, D), floating point in [0, 1].
        - y: (B,) int64 class indices (targets when ``targeted``).
        - output: like x.

    Example::
        >>> attack = BIM(eps=0.3, steps=40)
        >>> x_adv = attack(model, x, y)
    """

    name: ClassVar[str] = "bim"
