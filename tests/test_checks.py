import math
import time

import pytest
import torch
from torch import nn

from gce.attacks import AttackConfig
from gce.checks import CHECKS, CheckConfig, Diagnosis, Flag, diagnose, run_checks
from gce.config import TrainConfig
from gce.data import load_dataset
from gce.evaluate import RobustnessResult, evaluate_robustness, expand_eps
from gce.losses import cross_entropy
from gce.train import fit

N = 300  # examples per check run
MASKING = {"zero_gradients", "unbounded_attack_fails", "black_box_stronger", "transfer_stronger"}


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k", seed=0)


def train(data, seed, epochs):
    cfg = TrainConfig.from_dict({"data": {"dataset": "mnist5k"}, "model": {"name": "lenet5"}, "loss": {"name": "ce"},
                                 "epochs": epochs, "batch_size": 64, "seed": seed, "device": "cpu"})
    return fit(cfg, data=data).model.eval()


@pytest.fixture(scope="module")
def model(mnist5k):
    return train(mnist5k, seed=0, epochs=2)


@pytest.fixture(scope="module")
def surrogate(mnist5k):
    return train(mnist5k, seed=1, epochs=1)


class SaturatedLogits(nn.Module):
    """Logits × 1e4: softmax saturates in float32, so the CE input gradient underflows to exactly zero."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) * 1e4


class Quantised(nn.Module):
    """A non-differentiable input quantiser (round to quarters): the input gradient is zero everywhere."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


def test_quiet_on_a_normally_trained_model(model, surrogate, mnist5k):
    attacks = (expand_eps(AttackConfig(name="fgsm"), [0.1, 0.3]) + expand_eps(AttackConfig(name="pgd", steps=10),
                                                                              [0.1, 0.3])
               + expand_eps(AttackConfig(name="pgd", steps=10, loss="cw"), [0.1, 0.3]))  # a margin loss vs CE
    result = evaluate_robustness(model, mnist5k.test, attacks, max_examples=N)
    diagnosis = run_checks(model, mnist5k.test, CheckConfig(max_examples=N), result=result,
                           train_loss=cross_entropy, surrogate=surrogate)
    assert [f.name for f in diagnosis.flags] == list(CHECKS)
    assert not diagnosis.raised, [f.detail for f in diagnosis.flags if f.raised]
    assert all(f.status == "ok" for f in diagnosis.flags)
    assert diagnosis["zero_gradients"].values["zero_fraction/ce"] < 0.05
    tags = diagnosis.to_tags()
    assert tags["check/raised"] == "none" and tags["check/zero_gradients"] == "ok"
    assert set(tags) == {"check/raised"} | {f"check/{n}{s}" for n in CHECKS for s in ("", "/detail")}
    assert all(math.isfinite(v) for v in diagnosis.to_metrics().values())


@pytest.mark.parametrize("wrapper", [SaturatedLogits, Quantised])
def test_raises_on_masked_models(model, surrogate, mnist5k, wrapper):
    masked = wrapper(model).eval()
    diagnosis = run_checks(masked, mnist5k.test, CheckConfig(eps=0.3, max_examples=N), train_loss=cross_entropy,
                           surrogate=surrogate)
    assert set(diagnosis.raised_names) >= MASKING, [(f.name, f.detail) for f in diagnosis.flags]
    assert diagnosis["zero_gradients"].values["zero_fraction/ce"] > 0.9
    assert diagnosis.to_tags()["check/transfer_stronger"] == "raised"
    assert "transfer_stronger" in diagnosis.to_tags()["check/raised"]


def fake_result(accuracy: dict[tuple[str, float], float], attacks: list[AttackConfig],
                standalone: bool = True) -> RobustnessResult:
    """A standalone evaluation with given accuracies, to test the result-only flags on known numbers."""
    acc: dict[str, dict[float, float]] = {}
    for (label, eps), value in accuracy.items():
        acc.setdefault(label, {})[eps] = value
    eps = sorted({e for _, e in accuracy})
    worst = {("linf", e): min(v for (_, ee), v in accuracy.items() if ee == e) for e in eps}
    empty = torch.zeros(0, dtype=torch.bool)
    return RobustnessResult(0, 1.0, attacks, acc, worst, empty, {}, {}, standalone, ("linf", eps[-1]))


def test_result_only_flags_on_known_numbers():
    attacks = [AttackConfig(name="fgsm", eps=0.1), AttackConfig(name="fgsm", eps=0.3),
               AttackConfig(name="bim", eps=0.1), AttackConfig(name="bim", eps=0.3), AttackConfig(name="pgd", eps=1.0)]
    # BIM leaves more than FGSM at 0.3 (the paper's GCE MNIST row) and rises with eps; PGD at eps=1 fails.
    acc = {("fgsm", 0.1): 0.8, ("fgsm", 0.3): 0.4, ("bim", 0.1): 0.3, ("bim", 0.3): 0.5, ("pgd", 1.0): 0.2}
    diagnosis = diagnose(fake_result(acc, attacks))
    assert set(diagnosis.raised_names) == {"iterative_weaker_than_single_step", "accuracy_rises_with_eps",
                                           "unbounded_attack_fails"}
    assert diagnosis["accuracy_rises_with_steps"].status == "skipped"
    assert "bim 0.500 > fgsm 0.400" in diagnosis["iterative_weaker_than_single_step"].detail
    healthy = {("fgsm", 0.1): 0.8, ("fgsm", 0.3): 0.4, ("bim", 0.1): 0.3, ("bim", 0.3): 0.01, ("pgd", 1.0): 0.0}
    assert not diagnose(fake_result(healthy, attacks)).raised
    within_tolerance = {**healthy, ("bim", 0.3): 0.42}
    assert "iterative_weaker_than_single_step" not in diagnose(fake_result(within_tolerance, attacks)).raised_names
    chain = diagnose(fake_result(acc, attacks, standalone=False))  # cumulative numbers: nothing to compare
    assert not chain.raised and all(f.status == "skipped" for f in chain.flags)


def test_quiet_when_mixing_norms_and_attack_losses():
    """No false alarm from comparing across norms (C&W-L2 at eps=inf after L-inf 0.3) or across attack losses
    (a weak training-loss PGD against a CE FGSM): each series is compared like with like."""
    attacks = [AttackConfig(name="fgsm", eps=0.3), AttackConfig(name="pgd", eps=0.3, loss="train"),
               AttackConfig(name="pgd", eps=0.3), AttackConfig(name="cw_l2", eps=math.inf, steps=10)]
    result = fake_result({("fgsm", 0.3): 0.30, ("pgd-train", 0.3): 0.45, ("pgd", 0.3): 0.05,
                          ("cw_l2", math.inf): 0.0}, attacks)
    result.worst_case = {("linf", 0.3): 0.05, ("l2", math.inf): 0.25}
    diagnosis = diagnose(result)
    assert "accuracy_rises_with_eps" not in diagnosis.raised_names
    assert "iterative_weaker_than_single_step" not in diagnosis.raised_names
    # ... while an iterative attack weaker than FGSM *with the same loss* is still caught.
    attacks.append(AttackConfig(name="fgsm", eps=0.3, loss="train"))
    result = fake_result({("fgsm", 0.3): 0.30, ("pgd-train", 0.3): 0.45, ("pgd", 0.3): 0.05,
                          ("cw_l2", math.inf): 0.0, ("fgsm-train", 0.3): 0.2}, attacks)
    assert "pgd-train 0.450 > fgsm-train 0.200" in diagnose(result)["iterative_weaker_than_single_step"].detail


def test_attack_loss_weaker_than_ce_is_flagged():
    """The paper's setting: FGSM with the GCE training loss leaves far more than FGSM with CE."""
    attacks = [AttackConfig(name="fgsm", eps=0.3), AttackConfig(name="fgsm", eps=0.3, loss="train"),
               AttackConfig(name="pgd", eps=0.3), AttackConfig(name="pgd", eps=0.3, loss="train")]
    acc = {("fgsm", 0.3): 0.08, ("fgsm-train", 0.3): 0.47, ("pgd", 0.3): 0.0, ("pgd-train", 0.3): 0.01}
    flag = diagnose(fake_result(acc, attacks))["attack_loss_weaker_than_ce"]
    assert flag.raised and "fgsm-train 0.470 > fgsm 0.080" in flag.detail and "pgd-train" not in flag.detail


def test_flag_and_diagnosis_helpers():
    d = Diagnosis([Flag("a", True, "why", {"x": 1.0}), Flag("b", False, "fine"), Flag("c", False, "n/a", skipped=True)])
    assert d.raised and d.raised_names == ["a"]
    assert d.to_tags() == {"check/raised": "a", "check/a": "raised", "check/a/detail": "why", "check/b": "ok",
                           "check/b/detail": "fine", "check/c": "skipped", "check/c/detail": "n/a"}
    assert d.to_metrics() == {"check/a/x": 1.0}
    with pytest.raises(KeyError, match="no check named"):
        d["zzz"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"max_examples": 0}, "max_examples"), ({"steps": 0}, "steps"), ({"random_samples": -1}, "random_samples"),
     ({"norm": "l0"}, "norm"), ({"eps": 0.0}, "eps"), ({"eps": math.inf}, "eps"), ({"tolerance": 2}, "tolerance"),
     ({"batch_size": 1.5}, "batch_size")],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"checks.{field}"):
        CheckConfig(**kwargs)


def test_eps_must_come_from_somewhere(model, mnist5k):
    with pytest.raises(ValueError, match="checks.eps"):
        run_checks(model, mnist5k.test)


def test_default_budget_is_bounded(model, surrogate, mnist5k):
    """Counted in images through the networks rather than seconds, so a loaded CI machine cannot flake it:
    ~70 passes over 500 images, ~45 of them with a backward (about 1-2 s for LeNet-5 on 2 idle CPU cores)."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(len(args[0]))) for m in (model, surrogate)]
    try:
        start = time.perf_counter()
        diagnosis = run_checks(model, mnist5k.test, CheckConfig(eps=0.3), train_loss=cross_entropy,
                               surrogate=surrogate)
        elapsed = time.perf_counter() - start
    finally:
        for h in hooks:
            h.remove()
    assert not diagnosis.raised
    assert sum(seen) <= 80 * 500, (sum(seen), elapsed)
