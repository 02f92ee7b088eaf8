"""gce.transfer without MLflow: attacks crafted on a surrogate, scored on the target."""

import pytest
import torch

from gce.attacks import AttackConfig
from gce.config import TrainConfig
from gce.data import load_dataset
from gce.evaluate import evaluate_robustness, expand_eps
from gce.models import build_model
from gce.train import fit
from gce.transfer import evaluate_transfer

N = 200


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k", seed=0, limit=2000)


@pytest.fixture(scope="module")
def trained(mnist5k):
    cfg = TrainConfig.from_dict({"data": {"dataset": "mnist5k", "limit": 2000}, "model": {"name": "mlp"},
                                 "loss": {"name": "ce"}, "epochs": 1, "batch_size": 64, "seed": 0, "device": "cpu"})
    return fit(cfg, data=mnist5k).model.eval()


@pytest.fixture(scope="module")
def untrained(mnist5k):
    info = mnist5k.info
    torch.manual_seed(1)
    return build_model("mlp", input_shape=info.input_shape, num_classes=info.num_classes, mean=info.mean,
                       std=info.std).eval()


@pytest.mark.parametrize("fast", [True, False])
def test_transfer_from_the_model_itself_is_the_white_box_evaluation(trained, mnist5k, fast):
    attacks = expand_eps(AttackConfig(name="fgsm"), [0.1, 0.2])
    run = dict(batch_size=64, max_examples=N, seed=3, fast=fast)  # batches of 64: the subsample spans several
    white = evaluate_robustness(trained, mnist5k.val, attacks, **run)
    transfer = evaluate_transfer(trained, trained, mnist5k.val, attacks, **run)
    assert transfer.n == white.n == N and transfer.clean_acc == white.clean_acc
    assert torch.equal(transfer.clean_correct, white.clean_correct)  # the same points
    for eps in (0.1, 0.2):
        assert torch.equal(transfer.robust[("transfer-fgsm", eps)], white.robust[("fgsm", eps)])
        assert transfer.worst_case[("linf", eps)] == white.worst_case[("linf", eps)]
    assert transfer.surrogate_clean_acc == white.clean_acc
    metrics = transfer.to_metrics("val")
    assert metrics["val/robust_acc/transfer-fgsm/eps_0.2"] == white.to_metrics("val")["val/robust_acc/fgsm/eps_0.2"]
    assert metrics["val/robust_acc/worst_case"] == white.worst_case[("linf", 0.2)]  # primary: the largest ε
    assert "fgsm" not in {k.split("/")[2] for k in metrics if k.count("/") == 3}  # every attack key is transfer-
    assert set(transfer.curves()["linf"].accuracy) == {"transfer-fgsm", "worst_case"}


def test_transfer_from_an_untrained_surrogate_is_weaker_than_white_box(trained, untrained, mnist5k):
    attacks = [AttackConfig(name="fgsm", eps=0.2), AttackConfig(name="pgd", eps=0.2, steps=5)]
    white = evaluate_robustness(trained, mnist5k.val, attacks, max_examples=N, seed=0)
    transfer = evaluate_transfer(trained, untrained, mnist5k.val, attacks, max_examples=N, seed=0)
    assert torch.equal(transfer.clean_correct, white.clean_correct)
    assert transfer.surrogate_clean_acc < 0.3  # an untrained model guesses
    for label in ("fgsm", "pgd"):
        assert transfer.accuracy[f"transfer-{label}"][0.2] > white.accuracy[label][0.2] + 0.2
        assert transfer.accuracy[f"transfer-{label}"][0.2] <= transfer.clean_acc
    assert transfer.worst_case[("linf", 0.2)] > white.worst_case[("linf", 0.2)]


def test_transferred_examples_stay_in_the_threat_model_and_surrogate_loss_is_used(trained, untrained, mnist5k):
    calls = []

    def loss(logits, y, reduction="mean"):
        calls.append(len(y))
        return torch.nn.functional.cross_entropy(logits, y, reduction=reduction)

    attacks = [AttackConfig(name="pgd", eps=0.1, steps=2, loss="train")]
    res = evaluate_transfer(trained, untrained, mnist5k.val, attacks, max_examples=50, surrogate_loss=loss)
    assert calls and res.n == 50 and 0 <= res.worst_case[("linf", 0.1)] <= res.clean_acc
    with pytest.raises(ValueError, match="no examples"):
        evaluate_transfer(trained, untrained, [], attacks, surrogate_loss=loss)
    with pytest.raises(ValueError, match="training loss"):  # loss "train" is the surrogate's: it must be given
        evaluate_transfer(trained, untrained, mnist5k.val, attacks, max_examples=10)
