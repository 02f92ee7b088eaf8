"""Attack configs, the registry, attack losses and bad input: each error names the field at fault.

Behaviour on a trained model (threat model, strength, torchattacks agreement) is in ``test_attacks.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gce.attacks import (
    APGD,
    ATTACK_LOSSES,
    ATTACKS,
    FGSM,
    MIM,
    AttackConfig,
    build_attack,
    dlr_loss,
    margin_loss,
)
from gce.losses import cross_entropy, get_loss


@pytest.fixture()
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


@pytest.fixture()
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))


# -- attack losses ------------------------------------------------------------------------------------------
def test_margin_loss_matches_its_definition():
    torch.manual_seed(0)
    logits, y = torch.randn(32, 10) * 5, torch.randint(0, 10, (32,))
    other = logits.masked_fill(nn.functional.one_hot(y, 10).bool(), -math.inf).amax(1)
    margin = other - logits.gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(margin_loss(logits, y, reduction="none"), margin)
    torch.testing.assert_close(margin_loss(logits, y, kappa=1.0, reduction="none"), margin.clamp(max=1.0))
    targeted = margin_loss(logits, y, kappa=1.0, targeted=True, reduction="none")
    torch.testing.assert_close(targeted, margin.clamp(min=-1.0))


def test_dlr_loss_matches_the_reference_and_ignores_logit_scale():
    torchattacks = pytest.importorskip("torchattacks", reason="test-only reference dependency")
    torch.manual_seed(0)
    logits, y = torch.randn(32, 10) * 5, torch.randint(0, 10, (32,))
    reference = torchattacks.APGD(nn.Linear(1, 1), loss="dlr").dlr_loss(logits, y)
    torch.testing.assert_close(dlr_loss(logits, y, reduction="none"), reference)
    torch.testing.assert_close(dlr_loss(logits * 100 + 3, y, reduction="none"), reference, rtol=1e-4, atol=1e-5)


# -- configs, labels, the "train" loss --------------------------------------------------------------------
def test_train_loss_is_used_for_the_train_attack_loss(model, batch):
    x, y = batch
    calls = []

    def spy(logits, target, reduction="mean"):
        calls.append(reduction)
        return get_loss("gce")(logits, target, reduction=reduction)

    attack_with_train = build_attack(AttackConfig(name="pgd", eps=0.1, steps=3, loss="train"), train_loss=spy)
    attack_with_train(model, x[:16], y[:16])
    assert calls == ["none"] * 3
    with pytest.raises(ValueError, match="train_loss"):
        build_attack(AttackConfig(loss="train"))


def test_config_round_trips_through_a_flat_dict():
    cfg = AttackConfig(name="apgd", eps=0.2, steps=50, restarts=3, loss="gce", alpha=0.5)
    assert AttackConfig(**cfg.to_dict()) == cfg


def test_labels_are_short_and_distinguish_what_matters():
    assert AttackConfig().label() == "pgd"
    assert AttackConfig(loss="ce").label() == "pgd"
    assert AttackConfig(norm="l2", eps=1.0).label() == "pgd-l2"
    assert AttackConfig(loss="gce").label() == "pgd-gce"
    assert AttackConfig(loss="gce", alpha=0.5).label() == "pgd-gce0.5"
    assert AttackConfig(name="apgd", loss="dlr").label() == "apgd-dlr"
    assert AttackConfig(name="cw_l2", eps=math.inf).label() == "cw_l2"
    assert AttackConfig(name="fgsm", targeted=True).label() == "fgsm-targeted"
    assert set(ATTACK_LOSSES) == {"ce", "gce", "cot", "cw", "dlr", "train"}


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "deepfool"}, "name"),
        ({"eps": -0.1}, "eps"),
        ({"eps": math.inf}, "eps"),
        ({"steps": 0}, "steps"),
        ({"restarts": 0}, "restarts"),
        ({"norm": "l1"}, "norm"),
        ({"name": "mim", "norm": "l2"}, "norm"),
        ({"name": "cw_l2", "norm": "linf"}, "norm"),
        ({"loss": "hinge"}, "loss"),
        ({"alpha": 0.5}, "alpha"),
        ({"loss": "gce", "alpha": -1.0}, "alpha"),
        ({"name": "apgd", "step_size": 0.1}, "step_size"),
        ({"name": "jsma", "loss": "ce"}, "loss"),
        ({"step_size": 0.0}, "step_size"),
        ({"normalization": "log"}, "normalization"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AttackConfig(**kwargs)


def test_unknown_attack_lists_the_known_ones():
    with pytest.raises(ValueError) as info:
        AttackConfig(name="deepfool")
    assert all(name in str(info.value) for name in ATTACKS)


def test_unsupported_norm_lists_the_allowed_values():
    with pytest.raises(ValueError, match=r"norm 'l2'.*'linf'"):
        MIM(0.1, norm="l2")


def test_restarts_without_randomness_are_refused():
    with pytest.raises(ValueError, match="restarts"):
        build_attack(AttackConfig(name="bim", restarts=3))
    with pytest.raises(ValueError, match="restarts"):
        build_attack(AttackConfig(name="cw_l2", restarts=3))


@pytest.mark.parametrize("bad", ["scalar", "matrix", "no_reduction"])
def test_loss_fn_of_the_wrong_shape_is_rejected(bad, model, batch):
    x, y = batch
    loss_fns = {
        "scalar": lambda logits, y, reduction="none": cross_entropy(logits, y),
        "matrix": lambda logits, y, reduction="none": logits,
        "no_reduction": lambda logits, y: cross_entropy(logits, y),
    }
    with pytest.raises(ValueError, match="loss_fn"):
        APGD(0.1, steps=2, loss_fn=loss_fns[bad])(model, x[:8], y[:8])
    assert all(p.grad is None for p in model.parameters())


def test_bad_batches_are_rejected(model, batch):
    x, y = batch
    attack = FGSM(0.1)
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        attack(model, x[:8] * 2 - 0.5, y[:8])
    with pytest.raises(ValueError, match="y must"):
        attack(model, x[:8], y[:7])
    with pytest.raises(ValueError, match="y must"):
        attack(model, x[:8], y[:8].float())
