"""Attacks: threat-model invariants, strength orderings, torchattacks agreement, hygiene, bad input.

A tiny MLP with BatchNorm and Dropout (so train/eval mode matters) is trained for a second on sklearn's 8x8
digits, kept as (B, 1, 8, 8) images in [0, 1]. Everything runs on the CPU with fixed seeds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gce.attacks import (
    ATTACKS,
    BIM,
    FGSM,
    MIM,
    PGD,
    AttackConfig,
    build_attack,
    get_attack_loss,
)
from gce.losses import cross_entropy

EPS = {"linf": 0.1, "l2": 1.0, "l0": 0.2}
#: every (attack, norm) pair the registry offers, with a small budget
CASES = [(name, norm) for name, cls in ATTACKS.items() for norm in cls.norms]


class TinyNet(nn.Module):
    """MLP on 8x8 images, normalising inside; records the mode of every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10)
        )
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return self.body((x - 0.3) / 0.4)


class Scaled(nn.Module):
    """Wraps a model and multiplies its logits: a saturated, over-confident classifier."""

    def __init__(self, model: nn.Module, factor: float) -> None:
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.factor


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1500], y[:1500], x[1500:1700], y[1500:1700]


@pytest.fixture(scope="module")
def trained(digits) -> TinyNet:
    x_train, y_train, _, _ = digits
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        cross_entropy(model(x_train), y_train).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model


@pytest.fixture()
def model(trained) -> TinyNet:
    trained.eval()
    trained.seen_training.clear()
    return trained


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def attack_with(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0, **cfg) -> torch.Tensor:
    torch.manual_seed(seed)
    return build_attack(AttackConfig(**cfg))(model, x, y)


def test_model_is_trained(model, digits):
    assert accuracy(model, digits[2], digits[3]) > 0.9


# -- every attack and norm ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "norm"), CASES)
def test_threat_model_modes_and_gradients(name, norm, model, digits):
    _, _, x, y = digits
    x, y = x[:64], y[:64]
    clean = accuracy(model, x, y)
    model.train()
    model.body[2].eval()  # a frozen BatchNorm inside a training model: must stay frozen
    model.seen_training.clear()
    x_adv = attack_with(model, x, y, name=name, norm=norm, eps=EPS[norm], steps=10)

    assert model.training and not model.body[2].training and model.body[4].training
    assert model.seen_training and not any(model.seen_training), "the attack must run the model in eval mode"
    assert all(p.grad is None for p in model.parameters())
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= EPS[norm] + 1e-6
    elif norm == "l2":
        assert delta.norm(dim=1).max() <= EPS[norm] + 1e-6
    else:
        assert (delta != 0).sum(1).max() <= math.floor(EPS[norm] * x[0].numel())
    assert accuracy(model, x_adv, y) < clean


def test_existing_parameter_gradients_are_untouched(model, digits):
    _, _, x, y = digits
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    attack_with(model, x[:32], y[:32], name="pgd", eps=0.1, steps=3)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_attack_works_under_no_grad_and_restores_mode_on_error(model, digits):
    _, _, x, y = digits
    with torch.no_grad():
        x_adv = attack_with(model, x[:32], y[:32], name="pgd", eps=0.1, steps=3)
    assert not torch.equal(x_adv, x[:32])
    model.train()
    with pytest.raises(ValueError, match="loss_fn"):
        PGD(0.1, loss_fn=lambda logits, y, reduction="mean": cross_entropy(logits, y))(model, x[:8], y[:8])
    assert model.training


# -- strength on a trained model ----------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_accuracy_falls_monotonically_with_eps(norm, model, digits):
    _, _, x, y = digits
    scale = 1.0 if norm == "linf" else 8.0
    accs = [
        accuracy(model, attack_with(model, x, y, norm=norm, eps=e * scale, steps=20), y)
        for e in (0.0, 0.02, 0.05, 0.1, 0.2)
    ]
    assert accs[0] == pytest.approx(accuracy(model, x, y))
    assert all(a >= b for a, b in zip(accs, accs[1:], strict=False)), accs
    assert accs[-1] < accs[0] - 0.5, accs


def test_iterative_attacks_beat_fgsm(model, digits):
    _, _, x, y = digits
    fgsm = accuracy(model, attack_with(model, x, y, name="fgsm", eps=0.05), y)
    for name in ("bim", "pgd", "mim", "apgd"):
        assert accuracy(model, attack_with(model, x, y, name=name, eps=0.05, steps=20), y) <= fgsm, name


@pytest.mark.parametrize("name", ["pgd", "apgd"])
def test_restarts_never_weaken_the_worst_case(name, model, digits):
    _, _, x, y = digits
    one = attack_with(model, x, y, name=name, eps=0.08, steps=10, restarts=1)
    many = attack_with(model, x, y, name=name, eps=0.08, steps=10, restarts=4)
    with torch.no_grad():
        fooled_one, fooled_many = model(one).argmax(1) != y, model(many).argmax(1) != y
        loss_one = cross_entropy(model(one), y, reduction="none")
        loss_many = cross_entropy(model(many), y, reduction="none")
    assert (fooled_many | ~fooled_one).all(), "an example fooled by one run must stay fooled"
    assert (loss_many[~fooled_many] >= loss_one[~fooled_many] - 1e-6).all()
    assert fooled_many.sum() > fooled_one.sum()


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.08), ("l2", 0.5)])
def test_apgd_at_least_as_strong_as_pgd_with_the_same_steps(norm, eps, model, digits):
    _, _, x, y = digits
    for loss in ("ce", "dlr"):
        pgd = accuracy(model, attack_with(model, x, y, name="pgd", norm=norm, eps=eps, steps=20, loss=loss), y)
        apgd = accuracy(model, attack_with(model, x, y, name="apgd", norm=norm, eps=eps, steps=20, loss=loss), y)
        # On this nearly linear model both often reach the same points: allow one example of noise, which
        # still catches a broken step-size schedule (that costs tens of examples).
        assert apgd <= pgd + 1 / len(y), (loss, apgd, pgd)


def test_unbounded_cw_reaches_zero_and_budgeted_cw_respects_eps(model, digits):
    _, _, x, y = digits
    unbounded = attack_with(model, x, y, name="cw_l2", eps=math.inf, steps=50, c=1.0, step_size=0.1)
    assert accuracy(model, unbounded, y) <= 0.02
    budget = attack_with(model, x, y, name="cw_l2", eps=0.5, steps=50, c=1.0, step_size=0.1)
    norms = (budget - x).flatten(1).norm(dim=1)
    assert norms.max() <= 0.5 + 1e-6 and accuracy(model, budget, y) > accuracy(model, unbounded, y)


def test_targeted_attacks_reach_their_targets(model, digits):
    _, _, x, y = digits
    target = (y + 1) % 10
    for name, eps, step_size in (
        ("pgd", 0.2, None),
        ("apgd", 0.2, None),
        ("cw_l2", math.inf, 0.1),
        ("jsma", 0.3, None),
    ):
        x_adv = attack_with(model, x, target, name=name, eps=eps, steps=30, targeted=True, step_size=step_size)
        with torch.no_grad():
            hit = (model(x_adv).argmax(1) == target).float().mean().item()
        assert hit > 0.8, (name, hit)


# -- an independent reference -------------------------------------------------------------------------------
def test_agrees_with_torchattacks_on_deterministic_settings(model, digits):
    torchattacks = pytest.importorskip("torchattacks", reason="test-only reference dependency")
    _, _, x, y = digits
    eps, alpha, steps = 0.1, 0.02, 10
    pairs = [
        (torchattacks.FGSM(model, eps=eps), FGSM(eps)),
        (torchattacks.BIM(model, eps=eps, alpha=alpha, steps=steps), BIM(eps, steps=steps, step_size=alpha)),
        (
            torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False),
            PGD(eps, steps=steps, step_size=alpha, random_start=False),
        ),
        (
            torchattacks.MIFGSM(model, eps=eps, alpha=alpha, steps=steps, decay=1.0),
            MIM(eps, steps=steps, step_size=alpha, decay=1.0),
        ),
    ]
    for reference, ours in pairs:
        torch.testing.assert_close(ours(model, x, y), reference(x, y), atol=1e-6, rtol=0, msg=str(reference))


def test_l2_pgd_agrees_with_torchattacks_per_example(model, digits):
    """torchattacks divides the gradient of the batch *mean* by its norm + 1e-10; we normalise the gradient of
    the *sum*. Same direction, but its 1e-10 shortens steps where ‖∇‖ is tiny. With one example they coincide."""
    torchattacks = pytest.importorskip("torchattacks", reason="test-only reference dependency")
    _, _, x, y = digits
    reference = torchattacks.PGDL2(model, eps=1.0, alpha=0.2, steps=10, random_start=False)
    ours = PGD(1.0, norm="l2", steps=10, step_size=0.2, random_start=False)
    for i in range(0, 40):
        xi, yi = x[i : i + 1], y[i : i + 1]
        torch.testing.assert_close(ours(model, xi, yi), reference(xi, yi), atol=1e-6, rtol=0)


class Constant(nn.Module):
    """Ignores its input: zero input gradients everywhere, the extreme of gradient masking."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.linspace(0, 1, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], 10)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_zero_input_gradients_give_a_finite_answer_not_an_error(name, norm, digits):
    _, _, x, y = digits
    model = Constant()
    x_adv = attack_with(model, x[:16], y[:16], name=name, norm=norm, eps=EPS[norm], steps=5)
    assert torch.isfinite(x_adv).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert model.logits.grad is None


# -- the GCE loss as attack loss ----------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [1.0, 1e3])
def test_gce_attack_loss_has_finite_gradients_even_when_saturated(factor, model, digits):
    _, _, x, y = digits
    confident = Scaled(model, factor)
    loss_fn = get_attack_loss("gce")
    x_in = x[:64].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(confident(x_in), y[:64], reduction="none").sum(), x_in)
    assert torch.isfinite(grad).all()
    x_adv = attack_with(confident, x, y, name="pgd", eps=0.1, steps=10, loss="gce")
    assert torch.isfinite(x_adv).all()
    if factor == 1.0:
        assert accuracy(confident, x_adv, y) < accuracy(confident, x, y) - 0.3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name, norm, eps", [("fgsm", None, 0.3), ("pgd", None, 0.3), ("mim", None, 0.1),
                                             ("pgd", "l2", 1.5)])
def test_low_precision_inputs_stay_inside_the_ball_after_the_final_cast(dtype, name, norm, eps):
    """Attacks run in float32; the result is rounded to the input's dtype, which used to leave the ε-ball
    (FGSM ε = 0.3 on bf16: max |δ| = 0.3018). Measured in float64, every example must be inside."""
    from gce.attacks import AttackConfig, build_attack

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    x, y = torch.rand(128, 1, 28, 28).to(dtype), torch.randint(0, 10, (128,))
    x_adv = build_attack(AttackConfig(name=name, eps=eps, norm=norm, steps=5))(model, x, y)
    assert x_adv.dtype == dtype and x_adv.min() >= 0 and x_adv.max() <= 1
    delta = x_adv.double() - x.double()
    size = delta.abs().amax(dim=(1, 2, 3)) if norm is None else delta.flatten(1).norm(dim=1)
    assert size.max().item() <= eps, size.max().item()
    assert size.max().item() > 0.9 * eps  # it still attacks: the fix moves rounding, not the budget
