"""The evaluation engine: early stop and nested radii give the same or a stronger answer than the final-iterate
engine (and ``fast=False`` is that engine exactly), APGD-T, and AutoAttack's chain as one attack of the registry
with its members' cumulative numbers in the metric schema. Agreement with the original AutoAttack code is in
``tests/test_autoattack_reference.py``."""

from __future__ import annotations

import pytest
import torch

from gce.attacks import APGD, ATTACKS, BIM, APGDTargeted, AttackConfig, AutoAttack, build_attack
from gce.attacks.autoattack import member_labels
from gce.evaluate import evaluate_robustness, expand_eps, predict
from gce.metrics import expected
from gce.seeding import seeded

N = 200


@pytest.fixture(scope="module")
def points(mnist5k):
    return mnist5k.test.images[:N].float() / 255.0, mnist5k.test.labels[:N]


class Counting(torch.nn.Module):
    """Counts the examples each forward pass sees (the work an attack spends)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, 0

    def forward(self, x):
        self.seen += len(x)
        return self.model(x)


def test_early_stop_is_never_weaker_and_spends_less(model, points):
    """BIM has no randomness: with early stop each example follows the same trajectory until an iterate fools
    it, so every example robust with early stop is robust without it - and fooled ones cost no more steps."""
    x, y = points
    counted = Counting(model)
    flags = {}
    for early in (False, True):
        attack = BIM(0.1, steps=20, step_size=0.01)
        attack.early_stop = early
        counted.seen = 0
        flags[early] = predict(model, attack(counted, x, y)) == y
        flags[f"{early}-seen"] = counted.seen
    assert not (flags[True] & ~flags[False]).any()  # robust when fast => robust when not
    assert flags[True].sum() < (predict(model, x) == y).sum()  # the attack fooled some
    assert flags["True-seen"] < 0.8 * flags["False-seen"]


def test_apgd_early_stop_keeps_every_fooled_example_fooled(model, points):
    x, y = points
    out = {}
    for early in (False, True):
        attack = APGD(0.1, steps=30)
        attack.early_stop = early
        with seeded(0, x.device):
            out[early] = attack(model, x, y)
    fooled_fast = predict(model, out[True]) != y
    fooled_slow = predict(model, out[False]) != y
    assert (out[True] - x).abs().max() <= 0.1 + 1e-6
    # same random start and trajectories: early stop only removes examples once fooled
    assert not (fooled_slow & ~fooled_fast).any()


def test_fast_false_is_the_final_iterate_engine(model, mnist5k, points):
    """fast=False: each attack at each ε on every clean-correct point, its final iterate scored."""
    x, y = points
    configs = expand_eps(AttackConfig(name="bim", steps=10), [0.05, 0.1])
    res = evaluate_robustness(model, (x, y), configs, fast=False, batch_size=N)
    correct = predict(model, x) == y
    for cfg in configs:
        attack = build_attack(cfg)
        todo = correct.nonzero().squeeze(1)
        ok = torch.zeros_like(correct)
        ok[todo] = predict(model, attack(model, x[todo], y[todo])) == y[todo]
        assert torch.equal(res.robust[(cfg.label(), cfg.eps)], ok)


def test_nested_radii_skip_fooled_points_and_are_never_weaker(model, points):
    x, y = points
    configs = expand_eps(AttackConfig(name="bim", steps=10), [0.05, 0.1, 0.15])
    slow = evaluate_robustness(model, (x, y), configs, fast=False, batch_size=N)
    fast = evaluate_robustness(model, (x, y), configs, fast=True, batch_size=N)
    for key, flags in fast.robust.items():
        assert not (flags & ~slow.robust[key]).any()  # robust when fast => robust when not
    for tm, flags in fast.worst_robust.items():
        assert not (flags & ~slow.worst_robust[tm]).any()
    for small, large in ((0.05, 0.1), (0.1, 0.15)):  # nested: fooled at a smaller eps stays fooled
        assert not (fast.robust[("bim", large)] & ~fast.robust[("bim", small)]).any()


def test_apgd_t_targets_the_runner_up_classes(model, points):
    x, y = points
    with torch.no_grad():
        logits = model(x)
    correct = logits.argmax(1) == y
    xs, ys = x[correct][:60], y[correct][:60]
    one = APGDTargeted(0.15, steps=20, targets=1)
    with seeded(0, x.device):
        adv = one(model, xs, ys)
    pred = predict(model, adv)
    runner_up = model(xs).argsort(1, descending=True)[:, 1]
    fooled = pred != ys
    assert fooled.any()
    # with one target, a fooled example is mostly moved into that runner-up class (never guaranteed: DLR-T
    # maximises z_t - z_y, and another class may overtake on the way)
    assert (pred[fooled] == runner_up[fooled]).float().mean() > 0.5
    with seeded(0, x.device):
        nine = predict(model, APGDTargeted(0.15, steps=20, targets=9)(model, xs, ys)) != ys
    assert nine.sum() >= fooled.sum() - 2  # more targets: at least as strong, up to random starts
    with pytest.raises(ValueError, match="targets must be at most classes - 1 = 9"):
        APGDTargeted(0.1, targets=10)(model, xs, ys)
    with pytest.raises(ValueError, match="targets"):
        APGDTargeted(0.1, targets=0)


def test_autoattack_is_one_attack_with_cumulative_member_numbers(model, points):
    x, y = points
    cfg = AttackConfig(name="autoattack", eps=0.1)
    assert cfg.label() == "autoattack" and AttackConfig(name="autoattack", eps=0.1, version="plus").label() == \
        "autoattack-plus"
    res = evaluate_robustness(model, (x[:80], y[:80]), [cfg, AttackConfig(name="fgsm", eps=0.1)], batch_size=80)
    members = member_labels(None)
    assert list(res.chain) == members == ["autoattack.apgd-ce", "autoattack.apgd-t", "autoattack.fab-t",
                                          "autoattack.square"]
    accs = [res.chain[m][0.1] for m in members]
    assert all(a >= b for a, b in zip(accs, accs[1:], strict=False))  # a chain never gains robustness
    assert accs[-1] == res.accuracy["autoattack"][0.1]  # the last member's number is AutoAttack's
    assert res.worst_case[("linf", 0.1)] <= min(accs[-1], res.accuracy["fgsm"][0.1])
    metrics = res.to_metrics("val")
    assert "val/robust_acc_chain/autoattack.square/eps_0.1" in metrics
    keys = expected([cfg, AttackConfig(name="fgsm", eps=0.1)], test=False)
    assert set(k for k in metrics if "robust" in k) <= keys.exact  # the schema predicts every key


def test_autoattack_versions_and_bad_input(model, points):
    with pytest.raises(ValueError, match="allowed values: \\['plus', 'standard'\\]"):
        AttackConfig(name="autoattack", eps=0.1, version="rand")
    with pytest.raises(ValueError, match="steps does not apply|does not apply"):
        AttackConfig(name="autoattack", eps=0.1, targets=3)
    attack = AutoAttack(0.1, version="plus")
    assert [label for label, _ in attack.members(10)] == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    three = [a for _, a in AutoAttack(0.1).members(4)]  # a 4-class problem: at most 3 targets, as the reference
    assert [a.targets for a in three if hasattr(a, "targets")] == [3, 3]
    assert {"apgd_t", "fab_t", "square", "autoattack"} <= set(ATTACKS)


def test_spec_autoattack_shorthand_takes_the_radii_and_names_its_errors():
    from sweeps.spec import EvaluationSpec

    ev = EvaluationSpec.model_validate({"attacks": [{"name": "pgd", "eps": [0.1, 0.3]}], "autoattack": "standard"})
    assert [(c.name, c.eps) for c in ev.attack_configs()][-2:] == [("autoattack", 0.1), ("autoattack", 0.3)]
    ev = EvaluationSpec.model_validate({"autoattack": {"version": "plus", "eps": 0.2}})
    assert [(c.label(), c.eps) for c in ev.attack_configs()] == [("autoattack-plus", 0.2)]
    with pytest.raises(ValueError, match="autoattack.eps: give the radii"):
        EvaluationSpec.model_validate({"autoattack": "standard"})
    with pytest.raises(ValueError, match="autoattack.version"):
        EvaluationSpec.model_validate({"autoattack": {"version": "rand", "eps": [0.1]}})


def test_chain_numbers_cover_every_point_when_nested_radii_leave_nothing_to_attack(model, points):
    """At a larger ε a batch may have nothing left (all fooled at a smaller one): its points still count, as
    not robust, in every member's number - which then equals AutoAttack's own at every ε, over all batches."""
    x, y = points
    configs = expand_eps(AttackConfig(name="autoattack"), [0.25, 0.3])
    res = evaluate_robustness(model, (x[:60], y[:60]), configs, batch_size=20)
    for eps in (0.25, 0.3):
        assert res.chain["autoattack.square"][eps] == res.accuracy["autoattack"][eps]
        assert set(res.chain) == set(member_labels(None))
    assert res.accuracy["autoattack"][0.3] <= res.accuracy["autoattack"][0.25]


def test_gradient_masking_checks_measure_independent_radii(model, mnist5k, monkeypatch):
    """The checks look for accuracy rising with ε or steps: their own attacks must not use nested radii."""
    import gce.checks as checks

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("fast", True))
        return evaluate_robustness(*args, **kwargs)

    monkeypatch.setattr(checks, "evaluate_robustness", spy)
    checks.run_checks(model, mnist5k.test, checks.CheckConfig(eps=0.1, max_examples=40, steps=3))
    assert seen and not any(seen)


def test_spec_refuses_autoattack_twice_and_radii_it_cannot_take():
    from sweeps.spec import EvaluationSpec

    with pytest.raises(ValueError, match="autoattack: given both"):
        EvaluationSpec.model_validate({"attacks": [{"name": "autoattack", "eps": [0.1]}], "autoattack": "standard"})
    with pytest.raises(ValueError, match="none finite"):
        EvaluationSpec.model_validate({"attacks": [{"name": "cw_l2", "eps": [float("inf")], "norm": "l2"}],
                                       "autoattack": {"norm": "l2"}})
