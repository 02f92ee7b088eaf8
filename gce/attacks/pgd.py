"""PGD (Madry et al.): the workhorse attack, also the inner maximisation of adversarial training."""

from __future__ import annotations

from typing import ClassVar

from gce.attacks.iterative import IterativeAttack

__all__ = ["PGD"]


class PGD(IterativeAttack):
    r"""PGD in the paper "Towards Deep Learning Models Resistant to Adversarial Attacks"
    (Madry et al., ICLR 2018), https://arxiv.org/abs/1706.06083

    Distance measure: L∞ (default) or L2.

    From a uniformly random point of the ε-ball (L∞), or a Gaussian direction at a radius drawn from U(0, ε)
    (L2), ``steps`` steps of ``step_size`` along sign(∇) or ∇/‖∇‖₂, each projected onto the ε-ball ∩ [0, 1].
    The default step 2.5·ε/steps (Madry et al.) lets the iterate cross the ball and come back. The paper's
    setting for MNIST is steps=40, step_size=0.01. With ``restarts`` > 1, per example the first run that
    fools the model is kept, else the one with the highest loss. torchattacks names the step ``alpha``.

    Arguments:
        eps (float): radius of the ball, in [0, 1] pixel units.
        norm (str): "linf" or "l2". (Default: "linf")
        steps (int): number of steps. (Default: 10)
        step_size (float | None): step length; None gives 2.5 * eps / steps.
        random_start (bool | None): start at a random point of the ball. (Default: True)
        restarts (int): independent random starts, worst case kept per example. (Default: 1)
        loss_fn: per-sample attack loss, called as loss_fn(logits, y, reduction="none"). (Default: CE)
        targeted (bool): minimise the loss at the target labels ``y`` instead. (Default: False)

    Shape:
        - x: (B, C, H, W) or (B, D), floating point in [0, 1].
        - y: (B,) int64 class indices (targets when ``targeted``).
        - output: like x.

    Example::
        >>> attack = PGD(eps=0.3, steps=40, step_size=0.01, restarts=5)
        >>> x_adv = attack(model, x, y)
    """

    name: ClassVar[str] = "pgd"
    default_random_start: ClassVar[bool] = True

    @staticmethod
    def default_step_size(eps: float, steps: int) -> float:
        """Madry et al.'s 2.5 · ε / steps."""
        return 2.5 * eps / steps
