"""gce.margins on affine models, where margins, gradients and L∞ distances are known in closed form."""

import math

import pytest
import torch
from torch import nn

from gce.margins import PROFILE_KEYS, margin_profile, summarize_margins

SHAPE = (1, 4, 4)
D = 16


def affine(classes: int, scale: float = 1.0, seed: int = 0) -> nn.Module:
    """z = scale · (W x + b): every input gradient is a row of scale · W, whatever x."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, classes))
    with torch.no_grad():
        model[1].weight.mul_(scale)
        model[1].bias.mul_(scale)
    return model


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    # Away from the box's faces, so that the box never binds at the distances the tests step.
    return 0.3 + 0.4 * torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def predicted(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def test_binary_affine_distance_is_the_exact_linf_distance():
    model = affine(2)
    x = inputs(64)
    y = predicted(model, x)  # all correct: every margin is positive
    prof = margin_profile(model, x, y, batch_size=17)
    w = model[1].weight.detach()
    grad_m = w[y] - w[1 - y]  # ∇ₓ(z_y − z_other), constant for an affine model
    z = model(x).detach()
    margin = z.gather(1, y[:, None]).squeeze(1) - z.gather(1, (1 - y)[:, None]).squeeze(1)
    torch.testing.assert_close(prof["margin"], margin)
    torch.testing.assert_close(prof["margin_grad_l1"], grad_m.abs().sum(1))
    d = margin / grad_m.abs().sum(1)
    torch.testing.assert_close(prof["distance"], d)
    torch.testing.assert_close(prof["distance_any"], d)  # one other class: the same boundary
    # The steepest L∞ step −d·sign(∇m) reaches the boundary exactly: a hair less keeps the label, a hair more flips it.
    step = -grad_m.sign().view(-1, *SHAPE)
    inside = x + (d * 0.999).view(-1, 1, 1, 1) * step
    beyond = x + (d * 1.001).view(-1, 1, 1, 1) * step
    assert bool((predicted(model, inside) == y).all())
    assert bool((predicted(model, beyond) != y).all())
    # And no L∞ perturbation smaller than d can flip it (Hölder): a random corner of 0.999·d never does.
    corners = torch.randint(0, 2, (64, D), generator=torch.Generator().manual_seed(2)).float() * 2 - 1
    assert bool((predicted(model, x + (d * 0.999).view(-1, 1, 1, 1) * corners.view(-1, *SHAPE)) == y).all())


def test_distance_any_is_the_nearest_of_the_class_boundaries():
    model = affine(5, seed=3)
    x = inputs(40)
    y = predicted(model, x)
    prof = margin_profile(model, x, y)
    w, z = model[1].weight.detach(), model(x).detach()
    for i in range(len(y)):
        others = [j for j in range(5) if j != int(y[i])]
        dists = [float((z[i, y[i]] - z[i, j]) / (w[y[i]] - w[j]).abs().sum()) for j in others]
        assert prof["distance_any"][i].item() == pytest.approx(min(dists), rel=1e-5)
        runner_up = max(others, key=lambda j: float(z[i, j]))
        assert prof["distance"][i].item() == pytest.approx(dists[others.index(runner_up)], rel=1e-5)
    assert bool((prof["distance_any"] <= prof["distance"] + 1e-6).all())
    # The CE gradient of an affine model: Σ_j (p_j − 1[j=y]) W_j, and its sign step's efficiency on m is in [−1, 1].
    p = torch.softmax(z, 1)
    ce_grad = (p - nn.functional.one_hot(y, 5).float()) @ w
    torch.testing.assert_close(prof["ce_grad_l1"], ce_grad.abs().sum(1), rtol=1e-5, atol=1e-7)
    assert bool((prof["ce_step_efficiency"].abs() <= 1 + 1e-6).all())


def test_saturated_softmax_gives_exactly_zero_ce_gradient():
    x = inputs(32)
    y = predicted(affine(3, seed=4), x)
    plain = margin_profile(affine(3, seed=4), x, y)
    assert not bool(plain["ce_grad_zero"].any()) and not bool(plain["p_true_one"].any())
    # Scaling the logits scales margins and ‖∇m‖₁ alike: the first-order distance does not move ...
    huge = margin_profile(affine(3, scale=1e4, seed=4), x, y)
    torch.testing.assert_close(huge["distance"], plain["distance"], rtol=1e-3, atol=0)
    # ... but the softmax saturates in float32: p_y is 1 and CE's input gradient is exactly zero where the margin
    # is large (above ≈ 104, exp underflows), so a sign-gradient CE attack cannot move from x there.
    big = huge["margin"] > 120
    assert bool(big.any())
    assert bool(huge["ce_grad_zero"][big].all()) and bool(huge["p_true_one"][big].all())
    assert bool((huge["ce_step_efficiency"][big] == 0).all())
    assert bool((huge["margin_grad_l1"] > 0).all())  # the margin's gradient is still there for a margin attack


def test_misclassified_points_have_negative_margin_and_are_left_out_of_the_summary():
    model = affine(3, seed=5)
    x = inputs(50)
    y = predicted(model, x)
    y[:10] = (y[:10] + 1) % 3  # ten wrong labels
    prof = margin_profile(model, x, y)
    assert not bool(prof["correct"][:10].any()) and bool(prof["correct"][10:].all())
    assert bool((prof["margin"][:10] < 0).all()) and bool((prof["distance"][:10] < 0).all())
    summary = summarize_margins(prof, eps=(0.05,))
    assert summary["clean_acc"] == pytest.approx(0.8)
    kept = prof["distance"][10:]
    assert summary["median/distance"] == pytest.approx(kept.double().quantile(0.5).item())
    assert summary["frac/distance<0.05"] == pytest.approx((kept < 0.05).float().mean().item())
    assert summary["frac/ce_grad_zero"] == 0.0
    for key in PROFILE_KEYS:
        assert summary[f"q25/{key}"] <= summary[f"median/{key}"] <= summary[f"q75/{key}"]


def test_uint8_images_batches_modes_and_parameter_gradients():
    model = affine(4, seed=6).train()
    x8 = (inputs(30) * 255).round().to(torch.uint8)
    y = predicted(model, x8.float() / 255)
    whole = margin_profile(model, x8, y, batch_size=30)
    single = margin_profile(model, x8.float() / 255, y, batch_size=1)
    for key in whole:
        torch.testing.assert_close(whole[key], single[key])
    assert model.training  # restored
    assert all(p.grad is None for p in model.parameters())
    summary = summarize_margins(whole)
    assert summary["n"] == 30 and math.isfinite(summary["median/logit_norm"])
    with pytest.raises(ValueError, match="same length"):
        margin_profile(model, x8, y[:-1])
