"""Logit scale, margins and input gradients per example: why a model falls (or seems not to) under CE attacks.

A PGD-CE step moves x by η·sign(∇ₓ CE). Two different things make such an attack fail or succeed:

- **where the decision boundary is**: the logit margin m = z_y − max_{j≠y} z_j and how fast the input can
  change it, ‖∇ₓ m‖₁ (the dual of L∞). To first order the L∞ distance to the boundary is d = m / ‖∇ₓ m‖₁;
  a model with small d is genuinely easy to attack whatever loss the attacker ascends.
- **what the CE gradient shows the attacker**: ∇ₓ CE = Σ_j (p_j − 1[j=y]) ∇ₓ z_j. Once the softmax saturates
  in float32 (p_y rounds to 1, at margins above ≈ 17) the true-class term vanishes, and once every p_{j≠y}
  underflows (margins above ≈ 100) the gradient is exactly 0 and a sign step does nothing: CE attacks stall
  and the model looks more robust than it is (gradient masking by saturation, Carlini & Wagner 2017,
  https://arxiv.org/abs/1608.04644; Croce & Hein 2020, https://arxiv.org/abs/2003.01690).

``margin_profile`` measures both per example; ``summarize_margins`` reduces them to the numbers a report quotes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gce.attacks.base import eval_mode
from gce.evaluate import batches, model_device
from gce.losses import cross_entropy
from gce.validation import check_int

__all__ = ["PROFILE_KEYS", "margin_profile", "summarize_margins"]

#: The per-example arrays of ``margin_profile`` (besides the boolean ``correct``), each of shape (N,).
PROFILE_KEYS = (
    "logit_norm",  # ‖z‖₂: the logit scale
    "max_logit",  # max_j z_j
    "margin",  # m = z_y − max_{j≠y} z_j (negative where misclassified)
    "p_true",  # softmax p_y in float32
    "ce_grad_l1",  # ‖∇ₓ CE‖₁: first-order CE gain of a unit L∞ sign step
    "margin_grad_l1",  # ‖∇ₓ m‖₁ (runner-up class fixed at x)
    "distance",  # m / ‖∇ₓ m‖₁: first-order L∞ distance to the runner-up's boundary
    "distance_any",  # min_{j≠y} (z_y − z_j) / ‖∇ₓ(z_y − z_j)‖₁: the same to the nearest linearised boundary
    "ce_step_efficiency",  # −∇ₓm · sign(∇ₓ CE) / ‖∇ₓ m‖₁ in [−1, 1]: how well CE's sign step lowers m
)


def margin_profile(model: nn.Module, images: Tensor, labels: Tensor, *, batch_size: int = 500) -> dict[str, Tensor]:
    """Per-example logit scale, margin, softmax saturation, input-gradient norms and linearised L∞ distance.

    ``images`` are (N, C, H, W) in [0, 1] (uint8 0-255 is scaled), ``labels`` (N,). Returns CPU tensors of
    shape (N,): ``correct`` (bool), every key of ``PROFILE_KEYS``, ``ce_grad_zero`` (‖∇ₓ CE‖₁ exactly 0 in
    float32: a saturated softmax, on which a sign-gradient CE attack cannot move from x) and ``p_true_one``
    (p_y rounds to 1: the CE gradient has lost its −∇z_y term and only pushes the other logits up).

    The distances are a *linearisation*: exact for a model that is affine in x (for which the minimal
    L∞ perturbation reaching m = 0 is m / ‖∇ₓ m‖₁, Hölder's dual norm), a first-order estimate for a ReLU
    network, and they ignore the [0, 1] box. They say how the boundary *looks* from x, not where it is:
    compare them with an attack before trusting them. Gradients are taken on the CE as the attacks compute it
    (``gce.losses.cross_entropy``, float32), in eval mode, w.r.t. the input only; a class's logit gradient
    needs one backward pass per class, fine for the 10-class models of this project.
    """
    check_int("batch_size", batch_size)
    if len(images) != len(labels):
        raise ValueError(f"images and labels must have the same length; got {len(images)} and {len(labels)}")
    device = model_device(model)
    parts: list[dict[str, Tensor]] = []
    with eval_mode(model), torch.enable_grad():
        for x, y in batches((images, labels), batch_size, device=device):
            parts.append(_profile_batch(model, x, y))
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _profile_batch(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    x = x.detach().requires_grad_(True)
    logits = model(x).float()
    n, k = logits.shape
    if k < 2:
        raise ValueError(f"margins need at least 2 classes; got logits of shape {tuple(logits.shape)}")
    # One backward per class: the rows of each example's Jacobian (examples are independent in eval mode).
    jac = torch.stack([torch.autograd.grad(logits[:, c].sum(), x, retain_graph=True)[0].flatten(1)
                       for c in range(k)], dim=1)  # (n, k, d)
    (ce_grad,) = torch.autograd.grad(cross_entropy(logits, y, reduction="sum"), x)
    ce_grad = ce_grad.flatten(1)
    z = logits.detach()
    rows = torch.arange(n, device=z.device)
    is_true = torch.nn.functional.one_hot(y, k).bool()
    z_y = z[rows, y]
    runner_up = z.masked_fill(is_true, float("-inf")).argmax(1)
    margin = z_y - z[rows, runner_up]
    margin_grad = jac[rows, y] - jac[rows, runner_up]
    margin_grad_l1 = margin_grad.abs().sum(1)
    # Pairwise linearised distances to every other class's boundary; the true class itself is excluded.
    pair_gap = z_y[:, None] - z  # (n, k)
    pair_grad_l1 = (jac[rows, y][:, None, :] - jac).abs().sum(2)
    pair_dist = (pair_gap / pair_grad_l1).masked_fill(is_true, float("inf"))
    p_true = torch.softmax(z, dim=1)[rows, y]
    ce_grad_l1 = ce_grad.abs().sum(1)
    efficiency = -(margin_grad * ce_grad.sign()).sum(1) / margin_grad_l1
    return {
        "correct": z.argmax(1).eq(y).cpu(),
        "logit_norm": z.norm(dim=1).cpu(),
        "max_logit": z.amax(1).cpu(),
        "margin": margin.cpu(),
        "p_true": p_true.cpu(),
        "p_true_one": p_true.eq(1.0).cpu(),
        "ce_grad_l1": ce_grad_l1.cpu(),
        "ce_grad_zero": ce_grad_l1.eq(0).cpu(),
        "margin_grad_l1": margin_grad_l1.cpu(),
        "distance": (margin / margin_grad_l1).cpu(),
        "distance_any": pair_dist.amin(1).cpu(),
        "ce_step_efficiency": efficiency.cpu(),
    }


def summarize_margins(profile: dict[str, Tensor], eps: Sequence[float] = (0.1, 0.2, 0.3)) -> dict[str, float]:
    """Clean accuracy, then over the correctly classified points (the ones an attack can still flip): the
    median and quartiles of every ``PROFILE_KEYS`` array (``median/margin``, ``q25/margin``, ``q75/margin``),
    the fractions with a saturated softmax (``frac/ce_grad_zero``, ``frac/p_true_one``) and, per ε, the
    fraction whose linearised distance is below ε (``frac/distance<0.1``, ``frac/distance_any<0.1``): the
    points a first-order model says an L∞ attack of that budget should flip."""
    correct = profile["correct"]
    out = {"n": float(len(correct)), "clean_acc": correct.float().mean().item()}
    if not bool(correct.any()):
        return out
    for key in PROFILE_KEYS:
        values = profile[key][correct].double()
        q = torch.nanquantile(values, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        out[f"q25/{key}"], out[f"median/{key}"], out[f"q75/{key}"] = (float(v) for v in q)
    for key in ("ce_grad_zero", "p_true_one"):
        out[f"frac/{key}"] = profile[key][correct].float().mean().item()
    for e in eps:
        for key in ("distance", "distance_any"):
            out[f"frac/{key}<{e:g}"] = (profile[key][correct] < e).float().mean().item()
    return out
