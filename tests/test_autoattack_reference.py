"""Agreement with the original AutoAttack code (``pyautoattack`` 0.2.0, fra31/auto-attack; a test-only
dependency): the same trained LeNet-5, the same 100 MNIST-5k points, L∞ ε = 0.1 (where about half the points
survive, so every member of the chain has work), AutoAttack standard on both sides.

Tolerance: both sides draw random numbers (APGD's random starts, Square's random search) from different
generators, so they can only be expected to agree on points away from the boundary. Measured on this setting
(seeds 0-3 on each side): every run of both gave the same numbers - 0.67 after APGD-CE, 0.66 after APGD-T,
FAB-T and Square - and the same robust points. We allow 2 points in 100 per member, for the final number and
for the points on which the two disagree (other CPUs round differently), and never more than 2 points *above*
the reference (a weaker evaluation is the failure that matters). FAB-T alone is compared exactly, per point,
in ``tests/test_attacks_aa.py``.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch

from gce.attacks import AttackConfig
from gce.config import TrainConfig
from gce.data import load_dataset
from gce.evaluate import evaluate_robustness, predict
from gce.train import fit

pytestmark = pytest.mark.slow
N, EPS, TOL = 100, 0.1, 0.02


@pytest.fixture(scope="module")
def setting():
    data = load_dataset("mnist5k", seed=0)
    cfg = TrainConfig.from_dict({"data": {"dataset": "mnist5k"}, "model": {"name": "lenet5"}, "loss": {"name": "ce"},
                                 "epochs": 3, "batch_size": 64, "seed": 0, "device": "cpu"})
    model = fit(cfg, data=data).model.eval()
    x, y = data.test.images[:N].float() / 255.0, data.test.labels[:N]
    return model, x, y


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def reference(model, x, y, seed: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """The original code's robust points and its cumulative number after each member (from its log)."""
    from pyautoattack import AutoAttack

    handler, log = _Lines(), logging.getLogger("auto-attack")
    log.addHandler(handler)
    level, log.level = log.level, logging.DEBUG
    try:
        adversary = AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=seed)
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=N)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    members = {}
    for line in handler.lines:
        m = re.match(r"robust accuracy after (\S+): ([\d.]+)%", line)
        if m:
            members[m.group(1).lower()] = float(m.group(2)) / 100
    return predict(model, x_adv) == y, members


def test_autoattack_standard_agrees_with_the_original_code(setting, record_property):
    model, x, y = setting
    ref_robust, ref_members = reference(model, x, y)
    ref_final = ref_robust.float().mean().item()
    ours = evaluate_robustness(model, (x, y), [AttackConfig(name="autoattack", eps=EPS)], batch_size=N, seed=0)
    our_final = ours.accuracy["autoattack"][EPS]
    our_members = {label.split(".", 1)[1]: by_eps[EPS] for label, by_eps in ours.chain.items()}
    figures = {"ours": our_final, "reference": ref_final, "ours_members": our_members, "reference_members": ref_members}
    record_property("figures", figures)
    print(f"\nFIGURES AutoAttack standard, {N} points, eps={EPS}: {figures}")
    assert set(our_members) == set(ref_members) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert ours.clean_acc == pytest.approx((predict(model, x) == y).float().mean().item())
    assert 0.15 < ref_final < ours.clean_acc  # a threat model where the chain has work to do
    for name, acc in ref_members.items():
        assert abs(our_members[name] - acc) <= TOL + 1e-9, (name, our_members[name], acc)
    assert abs(our_final - ref_final) <= TOL + 1e-9
    assert (ours.robust[("autoattack", EPS)] != ref_robust).sum().item() <= TOL * N  # the same points, nearly
    assert our_final <= ref_final + TOL + 1e-9  # never a weaker evaluation beyond the tolerance
    assert torch.equal(ours.robust[("autoattack", EPS)], ours.worst_robust[("linf", EPS)])
