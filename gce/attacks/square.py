"""Square Attack (Andriushchenko et al. 2020): score-based random search with square updates, AutoAttack's
black-box member."""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from gce.attacks.base import Attack, _per_example_norm, logits_of, project, twin_active
from gce.attacks.losses import margin_loss
from gce.validation import check_int, is_number

__all__ = ["Square", "p_selection"]

#: (iteration on the 10,000-iteration scale, divisor of p_init from the next iteration on): the schedule of the
#: reference code, p = p_init / 2^k with k growing at these iterations.
_P_SCHEDULE = ((10, 2), (50, 4), (200, 8), (500, 16), (1000, 32), (2000, 64), (4000, 128), (6000, 256), (8000, 512))


def p_selection(p_init: float, iteration: int, queries: int, rescale: bool = True) -> float:
    """Fraction p of the image that the square of ``iteration`` covers (0-based, as the reference counts).

    With ``rescale`` the iteration is first mapped to a 10,000-iteration run, ``int(iteration / queries * 10000)``
    (the Square Attack code's default, ``resc_schedule=True``); AutoAttack's own run passes
    ``resc_schedule=False`` and uses the raw iteration."""
    it = int(iteration / queries * 10000) if rescale else iteration
    divisor = 1
    for threshold, div in _P_SCHEDULE:
        if it > threshold:
            divisor = div
    return p_init / divisor


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """z_y − max_{j≠y} z_j per example: negative exactly when the example is misclassified."""
    return -margin_loss(logits, y, reduction="none")


@functools.lru_cache(maxsize=64)
def _eta(s: int, device: torch.device) -> Tensor:
    """The L2 update's s×s pattern: two rectangles of opposite sign, each a sum of nested squares weighted
    1/(k+1)² around its centre (the reference's ``eta``), of unit L2 norm. Cached: callers must not modify it."""

    def rectangle(m: int, n: int) -> Tensor:
        k = max(m // 2, n // 2) + 1  # nested squares of half-width 0 .. k-1
        weights = 1.0 / torch.arange(1, k + 1, device=device, dtype=torch.float32) ** 2
        covering = weights.flip(0).cumsum(0).flip(0)  # covering[r] = Σ_{j >= r} weights[j]
        rows = (torch.arange(m, device=device) - m // 2).abs()
        cols = (torch.arange(n, device=device) - n // 2).abs()
        out = covering[torch.maximum(rows[:, None], cols[None, :])]
        return out / out.norm()

    out = torch.cat([rectangle(s // 2, s), -rectangle(s - s // 2, s)]) if s > 1 else -rectangle(1, 1)
    return out / out.norm()


def _random_eta(n: int, s: int, device: torch.device) -> Tensor:
    """(n, 1, s, s): ``_eta(s)``, transposed for a random half of the examples (the reference flips a coin)."""
    eta = _eta(s, device)
    flip = torch.rand(n, 1, 1, 1, device=device) > 0.5
    return torch.where(flip, eta.t(), eta)


def _signs(*shape: int, device: torch.device) -> Tensor:
    return torch.randint(0, 2, shape, device=device).float() * 2 - 1


def _window(n: int, h: int, w: int, s: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Top-left corners (n,), (n,) of an s×s square per example, uniform over [0, h−s) × [0, w−s) as in the
    reference (its ``random_int`` never draws the last position), 0 when the square spans the image."""
    vh = torch.randint(0, max(h - s, 1), (n,), device=device)
    vw = torch.randint(0, max(w - s, 1), (n,), device=device)
    return vh, vw


def _window_mask(vh: Tensor, vw: Tensor, s: int, h: int, w: int) -> Tensor:
    """(n, 1, h, w) boolean mask of each example's square."""
    rows = torch.arange(h, device=vh.device)
    cols = torch.arange(w, device=vw.device)
    in_rows = (rows >= vh[:, None]) & (rows < vh[:, None] + s)
    in_cols = (cols >= vw[:, None]) & (cols < vw[:, None] + s)
    return (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)


def _window_index(t: Tensor, vh: Tensor, vw: Tensor, s: int) -> tuple[Tensor, ...]:
    """Advanced index selecting each example's s×s square of ``t`` (n, c, h, w): ``t[index]`` is (n, c, s, s)."""
    n, c = t.shape[:2]
    offsets = torch.arange(s, device=t.device)
    return (
        torch.arange(n, device=t.device).view(n, 1, 1, 1),
        torch.arange(c, device=t.device).view(1, c, 1, 1),
        (vh[:, None] + offsets).view(n, 1, s, 1),
        (vw[:, None] + offsets).view(n, 1, 1, s),
    )


def _l2_normalise(t: Tensor) -> Tensor:
    return t / (_per_example_norm(t) + 1e-12)


class Square(Attack):
    r"""Square Attack in the paper "Square Attack: a query-efficient black-box adversarial attack via random
    search" (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020), https://arxiv.org/abs/1912.00049

    Distance measure: L∞ (default) or L2.

    Random search on the margin z_y − max_{j≠y} z_j, following AutoAttack's implementation (fra31/auto-attack
    ``square.py``): start at vertical stripes of ±ε (L∞; the reference's grid of ``eta`` blocks of random sign
    for L2), then per iteration propose a change on one random square of side ≈ √(p·h·w), p following
    ``p_selection``: L∞ sets the square to x ± ε, one random sign per channel; L2 moves the perturbation's
    mass of a second square into the first, reshaped by the ``eta`` pattern, at total norm ε. A proposal is
    kept when it lowers the margin. Only the examples not yet fooled (margin >= 0) are queried; an example
    stops as soon as its margin is negative. The squares and signs are drawn per example (the reference draws
    one square per batch: the same distribution for each example), from the torch RNG of the input's device.
    Gradient-free: the model is only queried, one forward pass per iteration on the examples still running,
    plus one at the start. Inputs must be images (B, C, H, W); the reference assumes H = W.

    Arguments:
        eps (float): radius of the ball, in [0, 1] pixel units.
        norm (str): "linf" or "l2". (Default: "linf")
        queries (int): iterations after the initial query, AutoAttack's ``n_queries``. (Default: 5000)
        p_init (float): initial fraction of the image a square covers, in (0, 1]. (Default: 0.8)
        restarts (int): runs from new random starts on the examples still not fooled. (Default: 1)
        rescale_schedule (bool): map the iterations onto the schedule's 10,000 (the Square Attack code's
            default); AutoAttack's standard run uses False with queries = 5000. (Default: True)

    Shape:
        - x: (B, C, H, W), floating point in [0, 1].
        - y: (B,) int64 true labels.
        - output: like x.

    Example::
        >>> attack = Square(eps=8 / 255, queries=5000)
        >>> x_adv = attack(model, x, y)
    """

    name: ClassVar[str] = "square"
    default_loss: ClassVar[str | None] = None

    def __init__(
        self,
        eps: float,
        *,
        norm: str | None = None,
        queries: int = 5000,
        p_init: float = 0.8,
        restarts: int = 1,
        targeted: bool = False,
        rescale_schedule: bool = True,
    ) -> None:
        super().__init__(eps, norm=norm, restarts=restarts)
        check_int("queries", queries)
        if not (is_number(p_init) and 0 < p_init <= 1):
            raise ValueError(f"p_init must be a number in (0, 1]; got {p_init!r}")
        if targeted is not False:
            raise ValueError("targeted: square is untargeted here (y holds the true labels); leave targeted False")
        if not isinstance(rescale_schedule, bool):
            raise ValueError(f"rescale_schedule must be a bool; got {rescale_schedule!r}")
        self.queries, self.p_init, self.rescale_schedule = queries, float(p_init), rescale_schedule

    def objective(self, logits: Tensor, y: Tensor) -> Tensor:
        """Minus the margin: what ranks restarts (the attack minimises the margin)."""
        return -margin(logits.float(), y)

    def p(self, iteration: int) -> float:
        return p_selection(self.p_init, iteration, self.queries, self.rescale_schedule)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"square needs images: x of shape (B, C, H, W); got shape {tuple(x.shape)}")
        with torch.no_grad():
            out = self._start(x)
            margin_best = margin(model(out).float(), y)  # the model itself decides who is left to attack
            # The working set (examples not yet fooled) is gathered once and shrunk only when one is fooled:
            # most queries change no membership, and re-gathering the images every query cost a third.
            where = (margin_best >= 0).nonzero().squeeze(1)
            xs, ys, best, margin_best = x[where], y[where], out[where], margin_best[where]
            for i in range(self.queries):
                if where.numel() == 0:
                    break
                proposal = self._propose(xs, best, self.p(i))
                new_margin = margin(logits_of(model, proposal).float(), ys)
                improved = new_margin < margin_best
                margin_best = torch.where(improved, new_margin, margin_best)
                best = torch.where(improved.view(-1, 1, 1, 1), proposal, best)
                fooled = margin_best < 0
                if bool(fooled.any()) and twin_active(model):  # queried through a compiled twin: the model
                    check = fooled.nonzero().squeeze(1)  # itself confirms (it is what the score uses)
                    with torch.no_grad():
                        eager = margin(model(best[check]).float(), ys[check])
                    margin_best[check] = eager
                    fooled[check] = eager < 0
                if bool(fooled.any()):  # one sync per query, as the reference's
                    out[where[fooled]] = best[fooled]
                    keep = ~fooled
                    where, xs, ys, best, margin_best = where[keep], xs[keep], ys[keep], best[keep], margin_best[keep]
            out[where] = best
        return out

    # -- the random search ----------------------------------------------------------------------------------
    def _start(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        if self.norm == "linf":  # vertical stripes: one sign per example, channel and column
            return project(x + self.eps * _signs(n, c, 1, w, device=x.device), x, self.eps, "linf")
        s = max(h // 5, 1)  # a grid of eta blocks of side h // 5, each with a random sign per channel
        start = max((h - 5 * s) // 2, 0)  # images under 5 pixels high: blocks of 1 from the corner
        rows, cols = max((h - start) // s, 0), max((w - start) // s, 0)  # the reference's blocks that fit
        rows, cols = min(rows, h // s), min(cols, w // s)
        delta = torch.zeros_like(x)
        if rows and cols:
            eta = _random_eta(n * rows * cols, s, x.device).view(n, 1, rows, cols, s, s)
            blocks = eta * _signs(n, c, rows, cols, 1, 1, device=x.device)
            delta[:, :, start : start + rows * s, start : start + cols * s] = blocks.permute(0, 1, 2, 4, 3, 5).reshape(
                n, c, rows * s, cols * s
            )
        return (x + self.eps * _l2_normalise(delta)).clamp(0.0, 1.0)

    def _side(self, p: float, c: int, h: int, w: int) -> int:
        s = int(round(math.sqrt(p * h * w)))  # p · n_features / c = p · h · w
        if self.norm == "linf":
            return min(max(s, 1), h, w)
        s = max(s, 3)
        return min(s + 1 if s % 2 == 0 else s, h, w)

    def _propose(self, x: Tensor, x_best: Tensor, p: float) -> Tensor:
        n, c, h, w = x.shape
        s = self._side(p, c, h, w)
        vh, vw = _window(n, h, w, s, x.device)
        if self.norm == "linf":
            mask = _window_mask(vh, vw, s, h, w)
            step = 2 * self.eps * _signs(n, c, 1, 1, device=x.device)
            return project(torch.where(mask, x_best + step, x_best), x, self.eps, "linf")

        delta = x_best - x
        vh2, vw2 = _window(n, h, w, s, x.device)
        first, second = _window_index(delta, vh, vw, s), _window_index(delta, vh2, vw2, s)
        both = _window_mask(vh, vw, s, h, w) | _window_mask(vh2, vw2, s, h, w)
        window = delta[first]
        window_norm = window.pow(2).sum((2, 3), keepdim=True).sqrt()  # per channel
        mass = (delta * both).pow(2).sum((2, 3), keepdim=True)  # per channel, over both squares
        room = (self.eps**2 - delta.flatten(1).pow(2).sum(1)).clamp_min(0.0).view(n, 1, 1, 1)  # ε² − ‖δ‖²
        new = _random_eta(n, s, x.device) * _signs(n, c, 1, 1, device=x.device) + window / (window_norm + 1e-12)
        new = new / (new.pow(2).sum((2, 3), keepdim=True).sqrt() + 1e-12) * (room / c + mass).sqrt()
        delta[second] = 0.0
        delta[first] = new
        return (x + self.eps * _l2_normalise(delta)).clamp(0.0, 1.0)
