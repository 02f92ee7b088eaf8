"""FAB (Croce & Hein 2020): the fast adaptive boundary attack, untargeted and AutoAttack's targeted FAB-T."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from gce.attacks.base import Attack, input_grad, logits_of, twin_active
from gce.validation import check_int, is_number

__all__ = ["FAB", "FABTargeted", "project_hyperplane_l2", "project_hyperplane_linf"]


# -- projections onto {z : w·z = b} ∩ [0, 1]^d ----------------------------------------------------------------
def _towards_hyperplane(t: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(w', c): w signed per row so that w'·t − b' = c >= 0, i.e. w'·z has to fall by c to reach the plane."""
    c = (w * t).sum(1) - b
    sign = torch.where(c < 0, -1.0, 1.0)
    return w * sign[:, None], c * sign


def project_hyperplane_linf(t: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Per row of t (n, d) in [0, 1]: the d of least L∞ norm with w·(t + d) = b and t + d in [0, 1]^d; where
    the box cannot reach the hyperplane, the move to the box corner closest to it (the reference's
    ``projection_linf``).

    With a budget λ every coordinate moves min(λ, room_i) the way that lowers w·z, room_i being its distance
    to the box side that way; the fall of w·z is piecewise linear in λ with kinks at the rooms. It is
    evaluated at every kink from cumulative sums over the rooms sorted in decreasing order, and λ solved on
    the segment that holds the required fall."""
    w, c = _towards_hyperplane(t, w, b)
    direction = torch.where(w < 0, 1.0, -1.0)
    room = torch.where(w < 0, 1 - t, t)
    weight = w.abs()
    total = (weight * room).sum(1, keepdim=True)  # the fall with every coordinate at its box side
    room_sorted, order = room.sort(dim=1, descending=True)
    weight_sorted = weight.gather(1, order)
    capped = weight_sorted.cumsum(1)  # Σ_{i<=k} |w_i|: coordinates moving λ when λ <= room_k
    free = total - (weight_sorted * room_sorted).cumsum(1)  # Σ_{i>k} |w_i| room_i: the ones at their side
    fall = capped * room_sorted + free  # the fall at λ = room_k, non-increasing in k
    k = (fall > c[:, None]).sum(1, keepdim=True)  # kinks with a larger fall than needed; 0: out of reach
    segment = (k - 1).clamp_min(0)
    lam = (c[:, None] - free.gather(1, segment)) / capped.gather(1, segment).clamp_min(1e-30)
    move = torch.where(k > 0, torch.minimum(lam.clamp_min(0.0), room), room)
    return torch.where(w != 0, direction * move, 0.0)


def project_hyperplane_l2(t: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Per row of t (n, d) in [0, 1]: the d of least L2 norm with w·(t + d) = b and t + d in [0, 1]^d; where
    the box cannot reach the hyperplane, every coordinate at the box side that lowers the distance (the
    reference's ``projection_l2``; coordinates with |w_i| < 1e-8 do not move).

    The solution is d_i = clip(−α w_i) to the box for one α >= 0; coordinate i saturates at α = r_i. The
    fall of w·z is piecewise linear in α with kinks at the sorted r_i; α is solved on the segment that holds
    the required fall."""
    w, c = _towards_hyperplane(t, w, b)
    w = torch.where(w.abs() < 1e-8, 0.0, w)
    live = w != 0
    safe_w = torch.where(live, w, 1.0)
    r = torch.where(live, torch.where(w > 0, t, t - 1) / safe_w, 0.0)  # α at which coordinate i meets the box
    r_sorted, order = r.sort(dim=1)
    w2_sorted = (w * w).gather(1, order)
    total = w2_sorted.sum(1, keepdim=True)
    saturated = (r_sorted * w2_sorted).cumsum(1)  # fall from the coordinates with r_i <= α
    rest = total - w2_sorted.cumsum(1)  # Σ w_i² of the coordinates still moving freely
    fall = saturated + r_sorted * rest  # the fall at α = r_k, non-decreasing in k
    k = (fall < c[:, None]).sum(1, keepdim=True)  # kinks passed; d of them: the plane is out of reach
    previous = (k - 1).clamp_min(0)
    saturated_before = torch.where(k > 0, saturated.gather(1, previous), 0.0)
    free_before = torch.where(k > 0, rest.gather(1, previous), total)
    alpha = (c[:, None] - saturated_before) / free_before.clamp_min(1e-30)
    free = (k < w.shape[1]) & (alpha < r)
    return torch.where(live, torch.where(free, -alpha * w, -r * w), 0.0)


_PROJECTIONS = {"linf": project_hyperplane_linf, "l2": project_hyperplane_l2}


def _distance(delta: Tensor, norm: str) -> Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


class FAB(Attack):
    r"""FAB in the paper "Minimally distorted Adversarial Examples with a Fast Adaptive Boundary Attack"
    (Croce & Hein, ICML 2020), https://arxiv.org/abs/1907.02044 - untargeted.

    Distance measure: L∞ (default) or L2.

    A minimal-norm attack, following AutoAttack's implementation (fra31/auto-attack ``fab_base.py``): each
    step linearises the decision boundary at the iterate x₁ towards the closest class (the hyperplane of
    least distance |f_j − f_y| / ‖∇f_j − ∇f_y‖_*), projects both x₁ and the original x onto it within
    [0, 1]^d (``project_hyperplane_linf``/``_l2``), and moves to the convex combination of the two
    projections, each overshot by η, weighted α = min(‖d₁‖ / (‖d₁‖ + ‖d₀‖), α_max) towards x's. An iterate
    that is misclassified is recorded when it is the closest so far, then pulled back towards x by β.
    Restarts after the first start at a random point at distance ε/2 of x. An example counts as fooled only
    when the closest adversarial point found lies within ε; the others get x itself. Cost per step: a
    forward and, untargeted, one backward pass per class (the Jacobian), then a forward pass to check the
    iterate; only examples not yet fooled are attacked.

    Arguments:
        eps (float): radius of the ball, in [0, 1] pixel units (also the random starts' scale).
        norm (str): "linf" or "l2". (Default: "linf")
        steps (int): iterations per run. (Default: 100)
        restarts (int): runs per example still not fooled; all but the first from random starts. (Default: 1)
        alpha_max (float): largest weight of the step from x, in [0, 1]. (Default: 0.1)
        eta (float): overshoot of the projections, >= 1. (Default: 1.05)
        beta (float): backward step towards x after a success, in (0, 1]. (Default: 0.9)

    Shape:
        - x: (B, C, H, W) or (B, D), floating point in [0, 1].
        - y: (B,) int64 true labels.
        - output: like x.

    Example::
        >>> attack = FAB(eps=8 / 255, steps=100, restarts=5)
        >>> x_adv = attack(model, x, y)
    """

    name: ClassVar[str] = "fab"
    default_loss: ClassVar[str | None] = None

    def __init__(
        self,
        eps: float,
        *,
        norm: str | None = None,
        steps: int = 100,
        restarts: int = 1,
        targeted: bool = False,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
    ) -> None:
        super().__init__(eps, norm=norm, restarts=restarts)
        check_int("steps", steps)
        if targeted is not False:
            raise ValueError(
                f"targeted: {self.name} is untargeted in its interface (y holds the true labels; fab_t picks its own "
                "target classes); leave targeted False"
            )
        if not (is_number(alpha_max) and 0 <= alpha_max <= 1):
            raise ValueError(f"alpha_max must be a number in [0, 1]; got {alpha_max!r}")
        if not (is_number(eta) and eta >= 1):
            raise ValueError(f"eta must be a finite number >= 1; got {eta!r}")
        if not (is_number(beta) and 0 < beta <= 1):
            raise ValueError(f"beta must be a number in (0, 1]; got {beta!r}")
        self.steps, self.alpha_max, self.eta, self.beta = steps, float(alpha_max), float(eta), float(beta)

    def _targets(self, logits: Tensor) -> list[Tensor | None]:
        """The target classes of each run, or None for the untargeted closest-boundary run."""
        return [None]

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():  # the model itself decides who is already fooled, not a compiled twin
            logits = model(x)
        targets = self._targets(logits)
        fooled = logits.argmax(1) != y  # already misclassified: x itself
        x_adv = x.clone()
        for target in targets:
            for restart in range(self.restarts):  # AutoAttack's order: every restart of a target, then the next
                todo = (~fooled).nonzero().squeeze(1)  # a sync per run, not per step
                if todo.numel() == 0:
                    return x_adv
                best, dist = self._run(model, x[todo], y[todo], None if target is None else target[todo], restart > 0)
                hit = dist <= self.eps
                if bool(hit.any()) and twin_active(model):  # the search used a compiled twin: the model confirms
                    with torch.no_grad():
                        hit[hit.clone()] = model(best[hit]).argmax(1) != y[todo][hit]
                x_adv[todo[hit]] = best[hit]
                fooled[todo[hit]] = True
        return x_adv

    def _restart(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> Tensor:
        return x_adv  # ``perturb`` runs the restarts itself, inside each target

    # -- one run ----------------------------------------------------------------------------------------------
    def _start(self, x: Tensor) -> Tensor:
        """A random point at distance ε/2 of x (in the attack's norm), clipped to [0, 1]."""
        t = torch.rand_like(x) * 2 - 1 if self.norm == "linf" else torch.randn_like(x)
        t = t / _distance(t, self.norm).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        return (x + 0.5 * self.eps * t).clamp(0.0, 1.0)

    def _hyperplane(self, model: nn.Module, x1: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
        """(f, ∇f) at x₁ of the linearised boundary: f = z_target − z_y, or untargeted the class j ≠ y whose
        boundary is closest in the linear approximation."""
        x1 = x1.detach().requires_grad_(True)
        logits = model(x1)
        if target is not None:
            diff = (logits.gather(1, target[:, None]) - logits.gather(1, y[:, None])).squeeze(1)
            return diff.detach(), input_grad(diff.sum(), x1)
        classes = logits.shape[1]
        jacobian = torch.stack(
            [input_grad(logits[:, j].sum(), x1, retain_graph=j < classes - 1) for j in range(classes)], 1
        )
        rows = torch.arange(x1.shape[0], device=x1.device)
        diff = (logits - logits.gather(1, y[:, None])).detach()
        grads = jacobian - jacobian[rows, y].unsqueeze(1)
        dual = grads.flatten(2).abs().sum(2) if self.norm == "linf" else grads.flatten(2).norm(dim=2)
        distance = diff.abs() / (dual + 1e-12)
        distance[rows, y] = torch.inf
        closest = distance.argmin(1)
        return diff[rows, closest], grads[rows, closest]

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, random_start: bool):
        """(closest misclassified point found, its distance to x; inf and x where none was)."""
        n, shape = x.shape[0], (-1, *([1] * (x.dim() - 1)))
        project = _PROJECTIONS[self.norm]
        x0 = x.flatten(1)
        x1 = self._start(x) if random_start else x.clone()
        best, best_dist = x.clone(), torch.full((n,), torch.inf, device=x.device)
        out, out_dist, where = best, best_dist, None  # early stop: examples found within ε leave the batch
        for _ in range(self.steps):
            if self.early_stop:
                done = best_dist <= self.eps
                if bool(done.any()):
                    if where is None:
                        out, out_dist, where = best.clone(), best_dist.clone(), torch.arange(n, device=x.device)
                    out[where[done]], out_dist[where[done]] = best[done], best_dist[done]
                    keep = ~done
                    where, x, x0, x1, y = where[keep], x[keep], x0[keep], x1[keep], y[keep]
                    best, best_dist = best[keep], best_dist[keep]
                    target = None if target is None else target[keep]
                    n = len(where)
                    if n == 0:
                        return out, out_dist
            f, grad = self._hyperplane(model, x1, y, target)
            with torch.no_grad():
                w = grad.flatten(1)
                b = (w * x1.flatten(1)).sum(1) - f  # the plane f + ∇f·(z − x₁) = 0
                d = project(torch.cat([x1.flatten(1), x0]), torch.cat([w, w]), torch.cat([b, b]))
                size = _distance(d, self.norm).clamp_min(1e-8)
                d1, d0 = d[:n].view_as(x), d[n:].view_as(x)
                alpha = (size[:n] / (size[:n] + size[n:])).clamp(0.0, self.alpha_max).view(shape)
                x1 = ((x1 + self.eta * d1) * (1 - alpha) + (x + self.eta * d0) * alpha).clamp(0.0, 1.0)
                adversarial = logits_of(model, x1).argmax(1) != y
                dist = _distance(x1 - x, self.norm)
                closer = adversarial & (dist < best_dist)
                best = torch.where(closer.view(shape), x1, best)
                best_dist = torch.where(closer, dist, best_dist)
                x1 = torch.where(adversarial.view(shape), x + (x1 - x) * self.beta, x1)
        if where is None:
            return best, best_dist
        out[where], out_dist[where] = best, best_dist
        return out, out_dist


class FABTargeted(FAB):
    r"""FAB-T, FAB towards fixed target classes, as AutoAttack's standard version runs it: for k = 2 … targets + 1,
    a FAB run (``restarts`` of them) towards the class of k-th highest *clean* logit, on the examples no earlier
    run has fooled. Each step linearises z_target − z_y, one backward pass instead of FAB's Jacobian.
    Untargeted in its interface: ``y`` holds the true labels, success is misclassification within ε.

    Arguments: those of :class:`FAB`, plus
        targets (int): runner-up classes tried, AutoAttack's ``n_target_classes``; at most classes − 1,
            checked at call time. (Default: 9)

    Example::
        >>> attack = FABTargeted(eps=8 / 255, steps=100, targets=9)
        >>> x_adv = attack(model, x, y)
    """

    name: ClassVar[str] = "fab_t"

    def __init__(
        self,
        eps: float,
        *,
        norm: str | None = None,
        steps: int = 100,
        targets: int = 9,
        restarts: int = 1,
        targeted: bool = False,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
    ) -> None:
        super().__init__(
            eps, norm=norm, steps=steps, restarts=restarts, targeted=targeted, alpha_max=alpha_max, eta=eta, beta=beta
        )
        check_int("targets", targets)
        self.targets = targets

    def _targets(self, logits: Tensor) -> list[Tensor | None]:
        classes = logits.shape[1]
        if self.targets > classes - 1:
            raise ValueError(
                f"targets must be at most the number of classes - 1 ({classes - 1}) for this model; got {self.targets}"
            )
        ranked = logits.sort(dim=1).indices  # ascending, as the reference: column −k is the k-th highest logit
        return [ranked[:, -k] for k in range(2, self.targets + 2)]
