"""APGD (Croce & Hein 2020): PGD with momentum and a step size that adapts itself, AutoAttack's core."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from gce.attacks.base import Attack, LossFn, ascent_direction, project
from gce.validation import check_int, check_number

__all__ = ["APGD"]


class APGD(Attack):
    r"""APGD in the paper "Reliable Evaluation of Adversarial Robustness with an Ensemble of Diverse
    Parameter-free Attacks" (Croce & Hein, ICML 2020), https://arxiv.org/abs/2003.01690

    Distance measure: L∞ (default) or L2.

    Algorithm 1 of the paper, following the reference code (fra31/auto-attack ``apgd-ce``/``apgd-dlr``):
    step size 2ε, momentum 0.75 (none on the first step), and at checkpoints spaced 0.22·steps, shrinking
    by 0.03·steps down to 0.06·steps, the step is halved and the iterate reset to the best point so far for
    every example whose loss rose in at most ρ of the last steps, or whose best loss did not improve since
    the last checkpoint without a halving then. All of it is batched: each example has its own step size.
    Per example, an iterate that fools the model is returned, else the point of highest loss. A run costs
    steps + 1 forward/backward passes. Use ``loss_fn=dlr_loss`` (``loss="dlr"``) for APGD-DLR.

    Arguments:
        eps (float): radius of the ball, in [0, 1] pixel units.
        norm (str): "linf" or "l2". (Default: "linf")
        steps (int): number of iterations N_iter. (Default: 100)
        random_start (bool | None): start at a random point of the ball's surface. (Default: True)
        restarts (int): independent runs, worst case kept per example. (Default: 1)
        rho (float): ρ, fraction of increasing steps below which the step size is halved. (Default: 0.75)
        loss_fn: per-sample attack loss, called as loss_fn(logits, y, reduction="none"). (Default: CE)
        targeted (bool): minimise the loss at the target labels ``y`` instead (not the paper's APGD-T,
            whose targeted DLR needs the true label too). (Default: False)

    Shape:
        - x: (B, C, H, W) or (B, D), floating point in [0, 1].
        - y: (B,) int64 class indices (targets when ``targeted``).
        - output: like x.

    Example::
        >>> attack = APGD(eps=0.3, steps=100, loss_fn=dlr_loss)
        >>> x_adv = attack(model, x, y)
    """

    name: ClassVar[str] = "apgd"
    default_random_start: ClassVar[bool] = True

    def __init__(
        self,
        eps: float,
        *,
        norm: str | None = None,
        steps: int = 100,
        random_start: bool | None = None,
        restarts: int = 1,
        rho: float = 0.75,
        loss_fn: LossFn | None = None,
        targeted: bool = False,
    ) -> None:
        super().__init__(eps, norm=norm, loss_fn=loss_fn, targeted=targeted, restarts=restarts)
        self.random_start = self._random_start(random_start)
        check_int("steps", steps)
        check_number("rho", rho)
        self.steps, self.rho = steps, float(rho)

    def _start(self, x: Tensor) -> Tensor:
        """A random point on the ball's surface (as the reference code does), or x itself."""
        if not self.random_start:
            return x.clone()
        t = torch.rand_like(x) * 2 - 1 if self.norm == "linf" else torch.randn_like(x)
        scale = t.flatten(1).abs().amax(1) if self.norm == "linf" else t.flatten(1).norm(dim=1) + 1e-12
        return (x + self.eps * t / scale.view(-1, *([1] * (x.dim() - 1)))).clamp(0.0, 1.0)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        n, eps, norm = x.shape[0], self.eps, self.norm
        k = max(int(0.22 * self.steps), 1)
        k_min, k_decrease = max(int(0.06 * self.steps), 1), max(int(0.03 * self.steps), 1)
        shape = (n, *([1] * (x.dim() - 1)))

        x_adv = self._start(x)
        grad, objective, logits = self.gradient(model, x_adv, y)
        fooled = self.fooled(logits, y)
        x_fooling = x_adv.clone()
        x_best, best, grad_best = x_adv.clone(), objective.clone(), grad.clone()
        history = torch.empty(self.steps + 1, n, device=x.device)  # objective after each step; [0] = start
        history[0] = objective
        step = torch.full(shape, 2.0 * eps, device=x.device)
        x_previous = x_adv.clone()
        best_at_check, halved_at_check = best.clone(), torch.ones(n, dtype=torch.bool, device=x.device)
        since_check = 0

        for i in range(self.steps):
            with torch.no_grad():
                momentum = 0.75 if i > 0 else 1.0
                last_move, x_previous = x_adv - x_previous, x_adv
                z = project(x_adv + step * ascent_direction(grad, norm), x, eps, norm)
                x_adv = project(x_adv + momentum * (z - x_adv) + (1 - momentum) * last_move, x, eps, norm)

            grad, objective, logits = self.gradient(model, x_adv, y)

            with torch.no_grad():
                now_fooled = self.fooled(logits, y)
                x_fooling = torch.where(now_fooled.view(shape), x_adv, x_fooling)
                fooled |= now_fooled
                history[i + 1] = objective
                improved = objective > best
                x_best = torch.where(improved.view(shape), x_adv, x_best)
                grad_best = torch.where(improved.view(shape), grad, grad_best)
                best = torch.where(improved, objective, best)

                since_check += 1
                if since_check == k:  # a checkpoint w_j: condition 1 or 2 of the paper halves the step
                    increases = (history[i + 2 - k : i + 2] > history[i + 1 - k : i + 1]).sum(0)
                    oscillating = increases <= k * self.rho
                    stalled = ~halved_at_check & (best_at_check >= best)
                    halve = oscillating | stalled
                    halved_at_check, best_at_check = halve, best.clone()
                    step = torch.where(halve.view(shape), step / 2, step)
                    x_adv = torch.where(halve.view(shape), x_best, x_adv)
                    grad = torch.where(halve.view(shape), grad_best, grad)
                    since_check, k = 0, max(k - k_decrease, k_min)

        return torch.where(fooled.view(shape), x_fooling, x_best)
