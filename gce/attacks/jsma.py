"""JSMA (Papernot et al. 2016): the L0 saliency-map attack of the paper's "JSMA" rows, batched on pixel pairs."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from gce.attacks.base import Attack, input_grad
from gce.validation import is_number

__all__ = ["JSMA"]

#: Upper bound on batch · features² per chunk: the pair scores are the memory peak (about 4 such tensors).
PAIR_ELEMENTS = 2**25


class JSMA(Attack):
    r"""JSMA in the paper "The Limitations of Deep Learning in Adversarial Settings"
    (Papernot et al., EuroS&P 2016), https://arxiv.org/abs/1511.07528

    Distance measure: L0 - ``eps`` is γ, the largest fraction of input features that may change.

    Each iteration takes the Jacobian of the logits (two backward passes: the target logit and the sum of
    all logits), scores every pair (p, q) of features still in the search domain by α·|β| where
    α = ∂z_t/∂x_p + ∂z_t/∂x_q > 0 and β = Σ_{j≠t} (∂z_j/∂x_p + ∂z_j/∂x_q) < 0, and moves the best pair by θ
    (clipped to [0, 1]) and out of the domain; at most ⌊γ·d/2⌋ iterations, as cleverhans' implementation.
    An example stops when it is classified as its target or has no admissible pair left. Untargeted, the
    target is drawn uniformly among the wrong classes (cleverhans' convention), so restarts draw new targets.
    Cost per iteration: one forward and two backward passes plus batch · d² elementwise work on the pair
    scores, for the examples still running only (finished ones drop out), in chunks of ``PAIR_ELEMENTS``.
    Measured on 2 CPU cores with LeNet-5 on 28x28 inputs, γ = 0.25: about 0.4 s per example (targeted);
    a GPU is the place for it. CIFAR-sized inputs (d = 3072) cost 16x more per iteration and example.
    JSMA uses the logits' Jacobian, not an attack loss; ``loss_fn`` (CE) only ranks restarts.

    Arguments:
        eps (float): γ in [0, 1], maximal fraction of features changed. (Default: 0.1)
        theta (float): change applied to each chosen feature, in [-1, 1], not 0. (Default: 1.0)
        targeted (bool): reach the target labels ``y`` instead of a random wrong class. (Default: False)
        restarts (int): untargeted only: random targets tried, worst case kept per example. (Default: 1)

    Shape:
        - x: (B, C, H, W) or (B, D), floating point in [0, 1].
        - y: (B,) int64 class indices (targets when ``targeted``).
        - output: like x.

    Example::
        >>> attack = JSMA(eps=0.25, theta=1.0)
        >>> x_adv = attack(model, x, y)
    """

    name: ClassVar[str] = "jsma"
    norms: ClassVar[tuple[str, ...]] = ("l0",)
    default_loss: ClassVar[str | None] = None

    def __init__(
        self,
        eps: float = 0.1,
        *,
        norm: str | None = None,
        theta: float = 1.0,
        targeted: bool = False,
        restarts: int = 1,
    ) -> None:
        super().__init__(eps, norm=norm, targeted=targeted, restarts=restarts)
        if eps > 1:
            raise ValueError(f"eps is the fraction γ of features jsma may change and must be <= 1; got {eps!r}")
        if not (is_number(theta) and 0 < abs(theta) <= 1):
            raise ValueError(f"theta must lie in [-1, 1] and not be 0; got {theta!r}")
        if targeted and restarts > 1:
            raise ValueError("restarts > 1 applies to untargeted jsma only (targeted jsma is deterministic)")
        self.theta = float(theta)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if self.targeted:
            target = y
        else:
            with torch.no_grad():
                num_classes = model(x[:1]).shape[1]
            target = (y + torch.randint_like(y, 1, num_classes)) % num_classes
        flat = x.flatten(1).clone()
        d = flat.shape[1]
        domain = flat < 1 if self.theta > 0 else flat > 0  # features that can still move in theta's direction
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        sign = 1.0 if self.theta > 0 else -1.0  # decreasing features: the same search on negated derivatives
        for _ in range(int(self.eps * d) // 2):
            rows = active.nonzero().squeeze(1)  # only unfinished examples cost anything: one sync per iteration
            if rows.numel() == 0:
                break
            x_adv = flat[rows].view(-1, *x.shape[1:]).requires_grad_(True)
            logits = model(x_adv)
            grad_target = input_grad(logits.gather(1, target[rows, None]).sum(), x_adv, retain_graph=True)
            grad_all = input_grad(logits.sum(), x_adv)
            alpha = sign * grad_target.flatten(1)
            beta = sign * grad_all.flatten(1) - alpha
            with torch.no_grad():
                p, q, score = self._best_pairs(alpha, beta, domain[rows])
                pred = logits.argmax(1)
                go = (pred != target[rows]) & (score > 0)
                if not self.targeted:  # untargeted: done as soon as the true class is lost, whatever the target
                    go &= pred == y[rows]
                rows, p, q = rows[go], p[go], q[go]
                for feature in (p, q):
                    flat[rows, feature] = (flat[rows, feature] + self.theta).clamp(0.0, 1.0)
                    domain[rows, feature] = False
                active.zero_()
                active[rows] = True
        return flat.view_as(x)

    @staticmethod
    def _best_pairs(alpha: Tensor, beta: Tensor, domain: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per row, the admissible pair (p, q) of largest α·|β| and its score (0 when there is none).

        A feature outside the domain gets α = −∞-like, so every pair with it fails α > 0; the diagonal is
        zeroed. Rows are processed in chunks of at most ``PAIR_ELEMENTS`` pair scores.
        """
        d = alpha.shape[1]
        alpha = alpha.masked_fill(~domain, -1e30)
        best_p, best_q, best_score = [], [], []
        chunk = max(1, PAIR_ELEMENTS // d**2)
        for a, b in zip(alpha.split(chunk), beta.split(chunk), strict=True):
            pair_alpha = a[:, :, None] + a[:, None, :]
            scores = (b[:, :, None] + b[:, None, :]).mul_(pair_alpha).neg_()  # = α·|β| where α > 0 > β
            scores.masked_fill_(pair_alpha <= 0, 0.0).diagonal(dim1=1, dim2=2).zero_()
            score, best = scores.flatten(1).max(dim=1)
            best_p.append(best // d), best_q.append(best % d), best_score.append(score)
        return torch.cat(best_p), torch.cat(best_q), torch.cat(best_score)
