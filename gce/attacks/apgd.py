"""APGD (Croce & Hein 2020): PGD with momentum and a step size that adapts itself, AutoAttack's core."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from gce.attacks.base import Attack, LossFn, ascent_direction, project
from gce.validation import check_int, check_number

__all__ = ["APGD", "APGDTargeted", "dlr_targeted"]


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
        # Early stop: a fooled example's answer is the iterate that fooled it, so it leaves the working batch
        # and no later step is spent on it; the rest follow exactly the trajectories they would have had.
        out, where = x.clone(), torch.arange(n, device=x.device)

        for i in range(self.steps):
            if self.early_stop and bool(fooled.any()):
                keep = ~fooled
                out[where[fooled]] = x_fooling[fooled]
                where = where[keep]
                if where.numel() == 0:
                    return out
                x, y, x_adv, x_previous, grad, objective = x[keep], y[keep], x_adv[keep], x_previous[keep], \
                    grad[keep], objective[keep]
                x_fooling, x_best, best, grad_best, fooled = x_fooling[keep], x_best[keep], best[keep], \
                    grad_best[keep], fooled[keep]
                history, step = history[:, keep], step[keep]
                best_at_check, halved_at_check = best_at_check[keep], halved_at_check[keep]
                shape = (where.numel(), *shape[1:])
                self._compact(keep)
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

        out[where] = torch.where(fooled.view(shape), x_fooling, x_best)
        return out

    def _compact(self, keep: Tensor) -> None:
        """Hook for subclasses holding per-example state of their own (APGD-T's targets)."""


class APGDTargeted(APGD):
    r"""APGD-T, AutoAttack's targeted APGD (Croce & Hein 2020, https://arxiv.org/abs/2003.01690, Sec. 4).

    For each of the ``targets`` runner-up classes of the clean logits (the 2nd highest, then the 3rd, ...),
    APGD minimises the targeted DLR loss −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2) on the examples no earlier
    target has fooled. The interface is untargeted: ``y`` holds the true labels and success means
    misclassified (into any class), as in AutoAttack. ``steps`` = 100 and one run per target make AutoAttack's
    standard version.

    Arguments:
        eps, norm, steps, random_start, rho: as for ``APGD``.
        targets (int): how many target classes (AutoAttack's ``n_target_classes``). (Default: 9)
        restarts (int): runs per target, on the examples still unfooled. (Default: 1)
    """

    name: ClassVar[str] = "apgd_t"
    default_loss: ClassVar[str | None] = None

    def __init__(
        self,
        eps: float,
        *,
        norm: str | None = None,
        steps: int = 100,
        targets: int = 9,
        random_start: bool | None = None,
        restarts: int = 1,
        rho: float = 0.75,
    ) -> None:
        super().__init__(eps, norm=norm, steps=steps, random_start=random_start, rho=rho, loss_fn=dlr_targeted)
        check_int("targets", targets)
        self.targets, self.runs = targets, restarts
        self._target: Tensor | None = None

    def objective(self, logits: Tensor, y: Tensor) -> Tensor:
        return dlr_targeted(logits, y, self._target)

    def _compact(self, keep: Tensor) -> None:
        self._target = self._target[keep]

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():  # the model itself, not a compiled twin: these decide who is attacked
            logits = model(x)
        if self.targets > logits.shape[1] - 1:
            raise ValueError(f"targets must be at most classes - 1 = {logits.shape[1] - 1}; got {self.targets}")
        order = logits.argsort(dim=1, descending=True)
        out, fooled = x.clone(), logits.argmax(1) != y
        for rank in range(1, self.targets + 1):
            for _ in range(self.runs):
                todo = (~fooled).nonzero().squeeze(1)
                if todo.numel() == 0:
                    return out
                self._target = order[todo, rank]
                candidate = APGD.perturb(self, model, x[todo], y[todo])
                with torch.no_grad():
                    now = model(candidate).argmax(1) != y[todo]
                out[todo[now]], fooled[todo[now]] = candidate[now], True
        self._target = None
        return out


def dlr_targeted(logits: Tensor, y: Tensor, target: Tensor, reduction: str = "none") -> Tensor:
    """Targeted DLR, −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12): AutoAttack's APGD-T loss (maximised)."""
    z = logits.float()
    top = z.topk(4, dim=1).values
    rows = torch.arange(len(y), device=z.device)
    loss = -(z[rows, y] - z[rows, target]) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)
    return loss if reduction == "none" else loss.mean() if reduction == "mean" else loss.sum()
