"""AutoAttack's Square and FAB-T (and plain FAB): threat model, the reference's algorithm, agreement with it.

The reference is the original code (Croce & Hein), installed as ``pyautoattack``: a test-only dependency, and
tests that need it skip without it. The trained TinyNet on sklearn's 8x8 digits is the fixture of
``test_attacks.py``. Everything runs on the CPU with fixed seeds.
"""

from __future__ import annotations

import pytest
import test_attacks as shared
import torch
from torch import nn

from gce.attacks import FAB, FGSM, AttackConfig, FABTargeted, Square, build_attack
from gce.attacks.fab import project_hyperplane_l2, project_hyperplane_linf
from gce.attacks.square import _eta, margin, p_selection

digits, trained, model, accuracy = shared.digits, shared.trained, shared.model, shared.accuracy  # fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The attacks here take hundreds of tiny steps: on a busy 2-core machine two intra-op threads made this
    file 10x slower (measured: 50 s against 5 s for the Square tests), one thread is as fast on an idle one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(module: str):
    return pytest.importorskip(f"pyautoattack.{module}", reason="test-only reference dependency (pyautoattack)")


def size(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def fooled(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


# -- threat model and hygiene -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("attack", "norm", "eps"),
    [
        (Square, "linf", 0.1),
        (Square, "l2", 0.5),
        (FABTargeted, "linf", 0.1),
        (FABTargeted, "l2", 0.5),
        (FAB, "linf", 0.1),
    ],
)
def test_threat_model_modes_and_gradients(attack, norm, eps, model, digits):
    _, _, x, y = digits
    x, y = x[:64], y[:64]
    budget = {"queries": 300} if attack is Square else {"steps": 10}
    model.train()
    model.body[2].eval()  # a frozen BatchNorm inside a training model stays frozen
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    model.seen_training.clear()
    torch.manual_seed(0)
    with torch.no_grad():  # attacks re-enable gradients themselves
        x_adv = attack(eps, norm=norm, **budget)(model, x, y)

    assert model.training and not model.body[2].training and model.body[4].training
    assert model.seen_training and not any(model.seen_training)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    model.zero_grad(set_to_none=True)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert size(x_adv - x, norm).max() <= eps + 1e-6
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["square", "fab_t"])
def test_low_precision_inputs_stay_inside_the_ball(name, dtype, model, digits):
    _, _, x, y = digits
    x = x[:32].to(dtype)
    torch.manual_seed(0)
    x_adv = build_attack(AttackConfig(name=name, eps=0.1, steps=5, queries=100 if name == "square" else None))(
        model, x, y[:32]
    )
    assert x_adv.dtype == dtype
    assert size(x_adv.double() - x.double(), "linf").max().item() <= 0.1


def test_configs_validate_and_build():
    for name in ("square", "fab_t", "fab"):
        assert AttackConfig(name=name, eps=0.1).label() == name
        build_attack(AttackConfig(name=name, eps=0.1, norm="l2"))
    square = build_attack(AttackConfig(name="square", eps=0.1, steps=7, queries=50, p_init=0.5))
    assert (square.queries, square.p_init) == (50, 0.5) and not hasattr(square, "steps")  # steps: not Square's
    fab_t = build_attack(AttackConfig(name="fab_t", eps=0.1, steps=7, targets=3, restarts=2))
    assert (fab_t.steps, fab_t.targets, fab_t.restarts) == (7, 3, 2)
    assert Square(0.1).queries == 5000 and FABTargeted(0.1).steps == 100 and FABTargeted(0.1).targets == 9


# -- Square -------------------------------------------------------------------------------------------------
def test_square_p_schedule_is_the_reference_schedule():
    SquareAttack = reference("square").SquareAttack
    for queries in (37, 500, 5000, 10000):
        for rescale in (True, False):
            ref = SquareAttack(nn.Identity(), eps=0.1, n_queries=queries, p_init=0.8, resc_schedule=rescale)
            ours = Square(0.1, queries=queries, p_init=0.8, rescale_schedule=rescale)
            its = sorted({0, 10, 11, 50, 51, 200, 201, 4000, 4001, 8001, queries - 1, *range(0, queries, 7)})
            assert [ours.p(i) for i in its] == [ref.p_selection(i) for i in its], (queries, rescale)
    assert p_selection(0.8, 0, 5000) == 0.8 and p_selection(0.8, 4999, 5000) == 0.8 / 512
    assert p_selection(0.8, 4999, 5000, rescale=False) == 0.8 / 128


def test_square_l2_pattern_is_the_reference_eta():
    SquareAttack = reference("square").SquareAttack
    ref = SquareAttack(nn.Identity(), norm="L2", eps=1.0, device=torch.device("cpu"))
    for s in range(1, 16):
        ours, theirs = _eta(s, torch.device("cpu")), ref.eta(s)  # the reference transposes at random
        assert min((ours - theirs).abs().max(), (ours.t() - theirs).abs().max()) < 1e-6, s


def test_square_lowers_accuracy_well_below_clean(model, digits):
    _, _, x, y = digits
    clean = accuracy(model, x, y)
    for norm, eps in (("linf", 0.1), ("l2", 1.0)):
        torch.manual_seed(0)
        x_adv = Square(eps, norm=norm, queries=500)(model, x, y)
        assert accuracy(model, x_adv, y) < clean - 0.5, norm


class Tagged(nn.Module):
    """Takes (B, 2, 8, 8): channel 0 is the image for ``model``, channel 1 carries each example's index in
    binary (0/1 pixels, which a perturbation below 0.5 per pixel cannot flip). Logs (indices, logits) per call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    @staticmethod
    def tag(x: torch.Tensor) -> torch.Tensor:
        bits = (torch.arange(x.shape[0])[:, None] >> torch.arange(8)) & 1
        code = torch.zeros(x.shape[0], 64)
        code[:, :8] = bits.float()
        return torch.cat([x, code.view(-1, 1, 8, 8)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x[:, 1].flatten(1)[:, :8].round().long() << torch.arange(8)).sum(1)
        logits = self.model(x[:, :1])
        self.calls.append((ids, logits.detach()))
        return logits


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.45)])
def test_square_never_queries_a_fooled_example_again(norm, eps, model, digits):
    _, _, x, y = digits
    x, y, queries = x[:100], y[:100], 200
    tagged = Tagged(model)
    torch.manual_seed(0)
    x_adv = Square(eps, norm=norm, queries=queries)(tagged, Tagged.tag(x), y)
    calls = [(ids, margin(logits, y[ids]) < 0) for ids, logits in tagged.calls]
    assert torch.equal(calls[0][0], torch.arange(100))  # the initial query, on everything
    done = torch.zeros(100, dtype=torch.bool)
    counts = torch.zeros(100, dtype=torch.long)
    for ids, now_fooled in calls:
        assert not done[ids].any(), "a fooled example was queried again"
        counts[ids] += 1
        done[ids[now_fooled]] = True
    assert 10 < done.sum() < 100  # both kinds are present
    assert (counts[~done] == queries + 1).all()  # the others ran the whole budget
    assert torch.equal(fooled(model, x_adv[:, :1], y), done)
    assert size(x_adv - Tagged.tag(x), norm).max() <= eps + 1e-6


def test_square_is_deterministic_given_the_seed(model, digits):
    _, _, x, y = digits
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(Square(0.1, queries=100)(model, x[:32], y[:32]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.5)])
def test_square_agrees_with_the_reference(norm, eps, model, digits):
    """Random search: one run's robust accuracy on these 200 points varies by ≈ 0.015 (sd over 10 seeds, for
    both implementations; means within 0.005). Three seeds each: the means' difference has sd ≈ 0.012, and
    0.04 is > 3 sd, while a wrong schedule or update costs more (p fixed at p_init: +0.07 at L∞)."""
    SquareAttack = reference("square").SquareAttack
    _, _, x, y = digits
    theirs, ours = [], []
    for seed in range(3):
        ref = SquareAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], n_queries=500, eps=eps, p_init=0.8,
                           loss="margin", seed=seed)
        theirs.append(accuracy(model, ref.perturb(x, y), y))
        torch.manual_seed(seed)
        ours.append(accuracy(model, Square(eps, norm=norm, queries=500, p_init=0.8)(model, x, y), y))
    assert abs(sum(ours) / 3 - sum(theirs) / 3) <= 0.04, (ours, theirs)


# -- FAB ----------------------------------------------------------------------------------------------------
def test_hyperplane_projections_agree_with_the_reference():
    projections = reference("fab_projections")
    torch.manual_seed(0)
    for d in (1, 3, 64, 300):
        for trial in range(6):
            t = torch.rand(40, d)
            if trial % 2:
                t = (t > 0.5).float()  # on the box's corners
            w = torch.randn(40, d)
            if trial % 3 == 1:
                w[:, : d // 2] = 0.0  # zero gradients on part of the input
            b = torch.randn(40) * (0.2 + 2 * trial)  # near planes, and planes the box cannot reach
            for ours, theirs in ((project_hyperplane_linf, projections.projection_linf),
                                 (project_hyperplane_l2, projections.projection_l2)):
                torch.testing.assert_close(ours(t, w, b), theirs(t, w.clone(), b.clone()), atol=1e-5, rtol=0)


def test_projection_solves_the_box_constrained_problem():
    torch.manual_seed(1)
    t, w = torch.rand(64, 50), torch.randn(64, 50)
    b = (w * torch.rand(64, 50)).sum(1)  # planes through a point of the box: always reachable
    for project in (project_hyperplane_linf, project_hyperplane_l2):
        z = t + project(t, w, b)
        assert z.min() >= -1e-6 and z.max() <= 1 + 1e-6
        torch.testing.assert_close((w * z).sum(1), b, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("targeted", "norm", "eps"), [(True, "linf", 0.05), (True, "linf", 0.1), (True, "l2", 0.5), (False, "linf", 0.08)]
)
def test_fab_agrees_with_the_reference(targeted, norm, eps, model, digits):
    """FAB(-T) without restarts is deterministic: the same examples fooled, the same points (up to float noise)."""
    FABAttack_PT = reference("fab_pt").FABAttack_PT
    _, _, x, y = digits
    ref = FABAttack_PT(model, norm={"linf": "Linf", "l2": "L2"}[norm], n_restarts=1, n_iter=20, eps=eps, seed=0,
                       targeted=targeted, n_target_classes=9)
    theirs = ref.perturb(x, y)
    model.zero_grad(set_to_none=True)  # the reference's backward() fills the parameters' .grad
    attack = FABTargeted(eps, norm=norm, steps=20, targets=9) if targeted else FAB(eps, norm=norm, steps=20)
    ours = attack(model, x, y)
    assert torch.equal(fooled(model, ours, y), fooled(model, theirs, y))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_fab_t_is_stronger_than_fgsm_and_minimal(model, digits):
    _, _, x, y = digits
    eps = 0.1
    x_fgsm = FGSM(eps)(model, x, y)
    x_fab = FABTargeted(eps, steps=30)(model, x, y)
    assert accuracy(model, x_fab, y) <= accuracy(model, x_fgsm, y) - 0.1
    hit = fooled(model, x_fab, y)
    assert torch.equal(x_fab[~hit], x[~hit])  # not fooled within ε: x itself
    assert size(x_fab - x, "linf")[hit].mean() < 0.8 * eps  # minimal: well inside the ball on average


def test_fab_restarts_start_at_half_eps_and_only_add_fooled_examples(model, digits):
    """On this nearly linear model random starts find nothing new (the reference's neither: 95 of 200 fooled
    at ε = 0.08 with 1 or 3 restarts); what must hold is that they never lose an example."""
    _, _, x, y = digits
    one = FABTargeted(0.08, steps=10, targets=2)(model, x, y)
    torch.manual_seed(0)
    attack = FABTargeted(0.08, steps=10, targets=2, restarts=3)
    many = attack(model, x, y)
    f_one, f_many = fooled(model, one, y), fooled(model, many, y)
    assert (f_many | ~f_one).all() and f_many.sum() >= f_one.sum() > 50
    for norm in ("linf", "l2"):
        attack.norm = norm
        start = size(attack._start(x) - x, norm)
        assert (start <= 0.04 + 1e-6).all() and start.mean() > 0.02


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Square(0.1, queries=0), "queries"),
        (lambda: Square(0.1, queries=2.5), "queries"),
        (lambda: Square(0.1, p_init=0.0), "p_init"),
        (lambda: Square(0.1, p_init=1.5), "p_init"),
        (lambda: Square(0.1, p_init=True), "p_init"),
        (lambda: Square(0.1, norm="l1"), "norm"),
        (lambda: Square(0.1, targeted=True), "targeted"),
        (lambda: Square(-0.1), "eps"),
        (lambda: FABTargeted(0.1, targets=0), "targets"),
        (lambda: FABTargeted(0.1, steps=0), "steps"),
        (lambda: FABTargeted(0.1, beta=0.0), "beta"),
        (lambda: FABTargeted(0.1, eta=0.5), "eta"),
        (lambda: FABTargeted(0.1, alpha_max=2.0), "alpha_max"),
        (lambda: FAB(0.1, targeted=True), "targeted"),
        (lambda: AttackConfig(name="square", targets=3), "targets"),
        (lambda: AttackConfig(name="fab_t", queries=100), "queries"),
        (lambda: AttackConfig(name="fab_t", p_init=0.5), "p_init"),
        (lambda: AttackConfig(name="square", queries=0), "queries"),
        (lambda: AttackConfig(name="fab_t", targets=0), "targets"),
    ],
)
def test_bad_options_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_bad_input_at_call_time(model, digits):
    _, _, x, y = digits
    with pytest.raises(ValueError, match="targets"):
        FABTargeted(0.1, steps=2, targets=10)(model, x[:8], y[:8])  # 10 classes: at most 9 runner-ups
    FABTargeted(0.1, steps=2, targets=9)(model, x[:8], y[:8])
    flat = nn.Sequential(nn.Linear(64, 10))
    with pytest.raises(ValueError, match="images"):
        Square(0.1, queries=5)(flat, x[:8].flatten(1), y[:8])
    assert all(p.grad is None for p in model.parameters())
