"""The one loop behind FGSM, BIM, PGD and MIM: projected steepest ascent with a pluggable step rule.

    x⁰ = x (or a random point of the ε-ball);  xᵗ⁺¹ = Π_{B_ε(x) ∩ [0,1]} ( xᵗ + η · dir(rule(∇ₓ ℓ(xᵗ))) )

``dir`` is sign(·) for L∞ and ·/‖·‖₂ for L2; ``rule`` is the identity for BIM/PGD/FGSM and a momentum
accumulator for MIM. The attacks differ only in their defaults (start, step size, number of steps, rule),
so each lives in its own short file as a subclass of ``IterativeAttack``.

The update and projection are written so that, without random start, FGSM, BIM, PGD and MIM agree with
torchattacks 3.5.1 to float rounding; L2 PGD agrees per example (torchattacks normalises the gradient of
the batch *mean* with an additive 1e-10, which shortens its steps where gradients are tiny).
``tests/test_attacks.py`` checks both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gce.attacks.base import Attack, LossFn, ascent_direction, project, random_start_point
from gce.validation import check_int, check_number

__all__ = ["IterativeAttack", "MomentumStep", "StepRule"]


class StepRule:
    """How the raw input gradient becomes the direction fed to the norm's ascent step.

    ``start`` is called once per run with the clean batch and returns the rule's state; ``__call__`` is
    called once per step by ``IterativeAttack.perturb`` and returns (transformed gradient, new state).
    The base rule is the identity: the plain projected gradient step of BIM and PGD.
    """

    def start(self, x: Tensor) -> Tensor | None:
        return None

    def __call__(self, grad: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return grad, state


class MomentumStep(StepRule):
    """MI-FGSM's accumulator (Dong et al. 2018): gᵗ⁺¹ = μ·gᵗ + ∇ / mean|∇| (per example).

    Dividing by the mean rather than the L1 norm, as torchattacks does, scales every term by the same number
    of pixels, so the sign of the sum is unchanged. A zero gradient gives a zero update, not NaN.
    """

    def __init__(self, decay: float = 1.0) -> None:
        check_number("decay", decay)
        self.decay = float(decay)

    def start(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def __call__(self, grad: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        scale = grad.abs().mean(dim=tuple(range(1, grad.dim())), keepdim=True).clamp_min(1e-12)
        velocity = grad / scale + self.decay * state
        return velocity, velocity


class IterativeAttack(Attack):
    """Projected steepest ascent in L∞ or L2 for ``steps`` steps of ``step_size``; see the module docstring.

    Subclasses choose ``default_random_start`` and ``default_step_size``; ``rule`` defaults to the plain step.
    """

    def __init__(
        self,
        eps: float,
        *,
        norm: str | None = None,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool | None = None,
        restarts: int = 1,
        loss_fn: LossFn | None = None,
        targeted: bool = False,
        rule: StepRule | None = None,
    ) -> None:
        super().__init__(eps, norm=norm, loss_fn=loss_fn, targeted=targeted, restarts=restarts)
        self.random_start = self._random_start(random_start)
        check_int("steps", steps)
        if step_size is not None:
            check_number("step_size", step_size, minimum=1e-12)
        self.steps = steps
        self.step_size = self.default_step_size(self.eps, steps) if step_size is None else step_size
        self.rule = StepRule() if rule is None else rule

    @staticmethod
    def default_step_size(eps: float, steps: int) -> float:
        """Step size when none is given; BIM/MIM's ε/steps unless a subclass overrides it."""
        return eps / steps

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x_adv = random_start_point(x, self.eps, self.norm) if self.random_start else x.clone()
        state = self.rule.start(x)
        out, where = None, None
        for i in range(self.steps):
            grad, _, logits = self.gradient(model, x_adv, y)
            if self.early_stop and i > 0:  # an iterate that fools is the answer: it leaves the working batch
                fooled = self.fooled(logits, y)
                if bool(fooled.any()):
                    if out is None:
                        out, where = x_adv.clone(), torch.arange(len(y), device=x.device)
                    out[where[fooled]] = x_adv[fooled]
                    keep = ~fooled
                    where, x, y, x_adv, grad = where[keep], x[keep], y[keep], x_adv[keep], grad[keep]
                    state = None if state is None else state[keep]
                    if where.numel() == 0:
                        return out
            with torch.no_grad():
                direction, state = self.rule(grad, state)
                x_adv = x_adv + self.step_size * ascent_direction(direction, self.norm)
                x_adv = project(x_adv, x, self.eps, self.norm)
        if out is None:
            return x_adv
        out[where] = x_adv
        return out
