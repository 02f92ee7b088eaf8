"""C&W-L2 (Carlini & Wagner 2017): the minimal-perturbation attack, unbounded by default (the paper's "C&W")."""

from __future__ import annotations

import math
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor, nn

from gce.attacks.base import Attack, LossFn
from gce.attacks.losses import _label_and_best_other, margin_loss
from gce.validation import check_int, check_number

__all__ = ["CWL2"]


class CWL2(Attack):
    r"""C&W-L2 in the paper "Towards Evaluating the Robustness of Neural Networks"
    (Carlini & Wagner, IEEE S&P 2017), https://arxiv.org/abs/1608.04644

    Distance measure: L2 (minimal perturbation; unbounded with eps=inf).

    In tanh space, x' = (tanh(w) + 1)/2, Adam minimises ‖x' − x‖²₂ − c · loss(x') per example, where the
    loss is by default the margin max_{j≠y} z_j − z_y capped at κ (so this is C&W's ‖δ‖² + c·f). A binary
    search over c per example (×10 until a first success, then bisection) runs ``binary_search_steps`` times
    ``steps`` Adam steps, each search step restarting from x and stopping early once the total cost stalls.
    Success means a margin > 0 and ≥ κ. The smallest successful x' is returned; an example without one, or
    whose smallest one lies outside a finite ``eps``, is returned unchanged (robust at that budget).
    Unlike torchattacks' CW (a single c, no search), this is the attack of the paper. Pixels at 0 or 1 sit
    where tanh is flat, so with lr 1e-2 the paper's 1000 steps are needed; with tens of steps raise ``lr``.

    Arguments:
        eps (float): L2 budget to report against; inf for the unbounded attack. (Default: inf)
        kappa (float): confidence κ. (Default: 0)
        c (float): initial constant of the binary search. (Default: 1e-2)
        binary_search_steps (int): number of search steps over c. (Default: 5)
        steps (int): Adam steps per search step. (Default: 100)
        lr (float): Adam learning rate. (Default: 1e-2)
        loss_fn: per-sample loss, called as loss_fn(logits, y, reduction="none"). (Default: margin, κ)
        targeted (bool): reach the target labels ``y`` instead. (Default: False)
        restarts (int): must be 1: the attack is deterministic. (Default: 1)

    Shape:
        - x: (B, C, H, W) or (B, D), floating point in [0, 1].
        - y: (B,) int64 class indices (targets when ``targeted``).
        - output: like x.

    Example::
        >>> attack = CWL2(kappa=0.0, steps=1000)
        >>> x_adv = attack(model, x, y)
    """

    name: ClassVar[str] = "cw_l2"
    norms: ClassVar[tuple[str, ...]] = ("l2",)
    default_loss: ClassVar[str | None] = "cw"
    randomized: ClassVar[bool] = False
    unbounded: ClassVar[bool] = True
    aliases: ClassVar[dict[str, str]] = {"lr": "step_size"}  # AttackConfig.step_size is Adam's lr

    def __init__(
        self,
        eps: float = math.inf,
        *,
        norm: str | None = None,
        kappa: float = 0.0,
        c: float = 1e-2,
        binary_search_steps: int = 5,
        steps: int = 100,
        lr: float = 1e-2,
        loss_fn: LossFn | None = None,
        targeted: bool = False,
        restarts: int = 1,
    ) -> None:
        check_number("kappa", kappa)
        check_number("c", c, minimum=1e-12)
        check_number("lr", lr, minimum=1e-12)
        check_int("binary_search_steps", binary_search_steps)
        check_int("steps", steps)
        if loss_fn is None:
            loss_fn = partial(margin_loss, kappa=kappa, targeted=targeted)
        super().__init__(eps, norm=norm, loss_fn=loss_fn, targeted=targeted, restarts=restarts)
        self.kappa, self.c, self.lr = float(kappa), float(c), float(lr)
        self.binary_search_steps, self.steps = binary_search_steps, steps

    def _succeeded(self, logits: Tensor, y: Tensor) -> Tensor:
        z_y, other = _label_and_best_other(logits, y)
        margin = z_y - other if self.targeted else other - z_y
        return (margin > 0) & (margin >= self.kappa)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        n, shape = x.shape[0], (x.shape[0], *([1] * (x.dim() - 1)))
        w_clean = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        const = torch.full((n,), self.c, device=x.device)
        lower, upper = torch.zeros_like(const), torch.full_like(const, math.inf)
        best_l2, best_adv = torch.full_like(const, math.inf), x.clone()
        check_every = max(self.steps // 10, 1)

        for _ in range(self.binary_search_steps):
            w = w_clean.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=self.lr)
            succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
            previous = math.inf
            for i in range(self.steps):
                x_adv = (torch.tanh(w) + 1) / 2
                l2 = (x_adv - x).flatten(1).pow(2).sum(1)
                logits = model(x_adv)
                cost = (l2 - const * self.objective(logits, y)).sum()
                (w.grad,) = torch.autograd.grad(cost, w)
                optimizer.step()
                with torch.no_grad():
                    success = self._succeeded(logits, y)
                    succeeded |= success
                    smaller = success & (l2 < best_l2)
                    best_l2 = torch.where(smaller, l2, best_l2)
                    best_adv = torch.where(smaller.view(shape), x_adv, best_adv)
                if i % check_every == 0:  # early abort: a sync every steps/10 steps, as in C&W's code
                    if cost.item() > previous * 0.9999:
                        break
                    previous = cost.item()
            upper = torch.where(succeeded, torch.minimum(upper, const), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, const))
            const = torch.where(upper < math.inf, (lower + upper) / 2, const * 10)

        outside = best_l2.sqrt() > self.eps  # also true where nothing succeeded (inf > eps)
        return torch.where(outside.view(shape), x, best_adv).detach()
