"""Adversarial training that trains (gce.config.AdvTrainingConfig, gce.train): ε/steps warm-ups, the clean mix,
val/adv_acc, early stopping with the best weights restored, and checkpoints that resume all of it exactly.

The collapse it fixes, measured on this 2-core CPU (MNIST-5k, LeNet-5, Adam 1e-3, batch 64, PGD-10 at ε = 0.3,
step 0.075, from scratch; PGD-20 on 500 test images):

- 10 epochs, seeds 0/1/2: clean 10.2% / 46.8% / 10.2%, PGD 10.2% / 22.6% / 10.2%. Seeds 0 and 2 predict one
  class for all ten epochs (val 10.0% every epoch, train accuracy 4.5-10%); seed 1 escapes at epoch 3.
- The cheapest run showing it: 2 epochs of 20 batches, every seed at 9.4-10.2% clean with one class predicted;
  the same 40 batches with a 2-epoch ε warm-up reach 66.6-69.2% clean.
- With a 5-epoch linear ε warm-up, 10 epochs: clean 94.8 / 95.0 / 94.8%, PGD-20 61.2 / 62.8 / 61.8%.
  4 epochs with a 2-epoch warm-up (the slow test below): clean 87.6-88.6%, PGD-20 34.4-35.2%; a standard
  (not adversarially) trained model of 4 epochs: clean 93-95%, PGD-20 0.0% on every seed.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from gce.attacks import AttackConfig, build_attack
from gce.config import ConfigError, TrainConfig
from gce.data import DeviceLoader, load_dataset
from gce.losses import complement_entropy, cross_entropy
from gce.metrics import ADV_ACC
from gce.train import Trainer, attack_at, fit, objective, warmup_progress

PGD = {"name": "pgd", "eps": 0.3, "steps": 10, "step_size": 0.075}  # the shipped spec's training attack


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("mnist5k", seed=0, limit=640, val_size=200)


def config(**overrides) -> TrainConfig:
    base = {"data": {"dataset": "mnist5k", "limit": 640, "val_size": 200}, "model": {"name": "lenet5"},
            "loss": {"name": "ce"}, "epochs": 2, "batch_size": 64, "seed": 0, "device": "cpu", "max_batches": 3}
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) and key in base else value
    return TrainConfig.from_dict(base)


def mnist_config(seed: int, **overrides) -> TrainConfig:
    """The shipped adv_training spec's setting: all of MNIST-5k, Adam 1e-3 (the authors' betas), PGD-10 at 0.3."""
    base = {"data": {"dataset": "mnist5k"}, "model": {"name": "lenet5"}, "loss": {"name": "ce"},
            "optim": {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.99]}, "batch_size": 64, "seed": seed,
            "device": "cpu", "adversarial": PGD}
    return TrainConfig.from_dict({**base, **overrides})


# --- the schedules ---------------------------------------------------------------------------------------------
def test_eps_warmup_is_per_batch_and_ends_at_the_configured_attack():
    cfg = config(adversarial={"name": "pgd", "eps": 0.3, "steps": 10}, adv_training={"eps_warmup_epochs": 2})
    eps = [attack_at(cfg, e, b, 10).eps for e in range(3) for b in range(10)]
    assert eps[0] == pytest.approx(0.3 / 20)  # the first batch: ~0, not 0 (one batch of twenty done)
    assert eps[4] == pytest.approx(0.3 * 5 / 20) and eps[14] == pytest.approx(0.3 * 15 / 20)
    assert all(b > a for a, b in zip(eps[:20], eps[1:20], strict=False))  # smooth: a new ε every batch
    assert eps[19] == pytest.approx(0.3) and set(eps[20:]) == {0.3}
    assert attack_at(cfg, 1, 9, 10) is cfg.adversarial and attack_at(cfg, 7, 0, 10) is cfg.adversarial
    assert attack_at(config(), 0, 0, 10) is None  # no adversarial training


def test_cosine_schedule_endpoints_and_shape():
    lin = config(adversarial={"name": "pgd", "eps": 0.3}, adv_training={"eps_warmup_epochs": 4})
    cos = config(adversarial={"name": "pgd", "eps": 0.3}, adv_training={"eps_warmup_epochs": 4,
                                                                        "eps_schedule": "cosine"})
    n = 100
    first = attack_at(cos, 0, 0, n).eps
    assert 0 < first < 1e-4  # ~0 at the start (π²p²/4 of ε)
    assert attack_at(cos, 1, n - 1, n).eps == pytest.approx(0.15)  # half-way: half of ε, as linear
    quarter = (1 - math.cos(math.pi / 4)) / 2
    assert attack_at(cos, 0, n - 1, n).eps == pytest.approx(0.3 * quarter)
    assert attack_at(cos, 0, n - 1, n).eps < attack_at(lin, 0, n - 1, n).eps  # slower start
    assert attack_at(cos, 2, n - 1, n).eps > attack_at(lin, 2, n - 1, n).eps  # faster finish
    assert attack_at(cos, 3, n - 1, n) is cos.adversarial


def test_steps_warmup_and_the_step_size_that_follows():
    cfg = config(adversarial={"name": "pgd", "eps": 0.3, "steps": 10},
                 adv_training={"eps_warmup_epochs": 2, "steps_warmup_epochs": 2})
    steps = [attack_at(cfg, e, b, 10).steps for e in range(2) for b in range(10)]
    assert steps[0] == 1 and steps[9] == 6 and steps[-1] == 10  # 1 + round(9·p)
    assert all(b >= a for a, b in zip(steps, steps[1:], strict=False))
    mid = attack_at(cfg, 0, 9, 10)  # ε 0.15, 6 steps, step size left to PGD: 2.5·ε_t/steps_t
    assert mid.step_size is None
    assert build_attack(mid).step_size == pytest.approx(2.5 * 0.15 / 6)
    fixed = config(adversarial=PGD, adv_training={"eps_warmup_epochs": 2, "steps_warmup_epochs": 2})
    assert attack_at(fixed, 0, 9, 10).step_size == pytest.approx(0.075 * 0.5 * 10 / 6)  # the ratio 2.5 kept
    steps_only = config(adversarial=PGD, adv_training={"steps_warmup_epochs": 1})
    first = attack_at(steps_only, 0, 0, 10)
    assert (first.eps, first.steps, first.step_size) == (0.3, 2, pytest.approx(0.075 * 10 / 2))


def test_warmup_progress():
    assert warmup_progress(3.0, 0) == 1.0 and warmup_progress(0.5, 2) == 0.25 and warmup_progress(9, 2) == 1.0


def test_the_training_attack_follows_the_schedule(tiny):
    """The batches of a warm-up epoch are perturbed by at most that batch's ε."""
    cfg = config(adversarial={"name": "pgd", "eps": 0.3, "steps": 2}, adv_training={"eps_warmup_epochs": 1})
    trainer = Trainer(cfg, tiny)
    seen = []
    for i, (x, y) in enumerate(trainer.train_loader):
        x_adv, clean = trainer.adversarial_inputs(x, y, i, len(trainer.train_loader))
        seen.append(float((x_adv - x).abs().max()))
        assert clean is None
        assert seen[-1] <= attack_at(cfg, 0, i, len(trainer.train_loader)).eps + 1e-6
    assert seen[0] < 0.11 and seen[-1] > 0.25


# --- the clean/adversarial mix ----------------------------------------------------------------------------------
def test_clean_weight_mixes_the_two_losses_in_one_step(tiny):
    cfg = config(adversarial={"name": "pgd", "eps": 0.3, "steps": 2}, optim={"name": "sgd", "lr": 0.1, "momentum": 0},
                 adv_training={"clean_weight": 0.25}, channels_last=False)
    trainer = Trainer(cfg, tiny)
    x, y = next(iter(trainer.train_loader))
    x_adv, clean = trainer.adversarial_inputs(x, y, 0, 10)
    assert clean is x and not torch.equal(x_adv, x)
    before = copy.deepcopy(trainer.model)
    mixed = 0.75 * cross_entropy(before(x_adv), y) + 0.25 * cross_entropy(before(x), y)
    grads = torch.autograd.grad(mixed, list(before.parameters()))
    _, loss = trainer._step(trainer.loss_fn, x_adv, y, trainer.optimizer, clean)
    assert float(loss) == pytest.approx(float(mixed.detach()), rel=1e-5)
    for p, q, g in zip(trainer.model.parameters(), before.parameters(), grads, strict=True):
        torch.testing.assert_close(p, q - 0.1 * g, rtol=1e-4, atol=1e-6)  # one SGD step on the mixed loss
    pure = Trainer(config(adversarial={"name": "pgd", "eps": 0.3, "steps": 2}), tiny)
    assert pure.adversarial_inputs(x, y, 0, 10)[1] is None  # w = 0: Madry et al., no clean forward
    only_clean = Trainer(config(adversarial={"name": "pgd", "eps": 0.3}, adv_training={"clean_weight": 1}), tiny)
    x_same, none = only_clean.adversarial_inputs(x, y, 0, 10)
    assert x_same is x and none is None  # w = 1: no attack at all


@pytest.mark.parametrize("loss", ["cot", "gce"])
def test_the_inner_attack_can_use_the_training_objective(tiny, loss):
    """adversarial.loss 'train' attacks with what the model minimises: CE + complement entropy for COT."""
    cfg = config(loss={"name": loss}, adversarial={"name": "pgd", "eps": 0.3, "steps": 5, "loss": "train"},
                 adv_training={"clean_weight": 0.5, "eps_warmup_epochs": 1})
    trainer = Trainer(cfg, tiny)
    x, y = next(iter(trainer.train_loader))
    logits = trainer.model(x)
    if loss == "cot":
        complement = complement_entropy(logits, y, normalization="paper", reduction="none")
        want = cross_entropy(logits, y, reduction="none") + complement
        torch.testing.assert_close(trainer.attack.loss_fn(logits, y, reduction="none"), want)
    f = objective(cfg)
    x_adv, _ = trainer.adversarial_inputs(x, y, 9, 10)  # the last warm-up batch: full ε
    with torch.no_grad():
        assert float(f(trainer.model(x_adv), y)) > float(f(trainer.model(x), y))  # the attack ascends it
    history = fit(cfg, data=tiny).history  # and training runs on it, COT's two steps included
    assert all(math.isfinite(h["train/loss"]) and 0 <= h[ADV_ACC] <= 1 for h in history)


# --- val/adv_acc ----------------------------------------------------------------------------------------------
def test_val_adv_acc_attacks_at_the_full_eps_without_touching_the_training_stream(tiny):
    cfg = config(epochs=1, adversarial={"name": "pgd", "eps": 0.3, "steps": 2, "loss": "train"},
                 loss={"name": "gce"}, adv_training={"eps_warmup_epochs": 10, "val_steps": 3, "val_examples": 50})
    trainer = Trainer(cfg, tiny)
    assert (trainer.val_attack.eps, trainer.val_attack.steps) == (0.3, 3)  # not the warmed-up ε nor the train loss
    assert trainer.val_attack.loss_fn is cross_entropy and len(trainer.val_adv_loader.labels) == 50
    rng = torch.get_rng_state()
    first = trainer.robust_val_acc()
    assert torch.equal(rng, torch.get_rng_state())  # its random starts come from a stream of their own
    assert trainer.robust_val_acc() == first  # the same subset and starts every call
    metrics = trainer.evaluate()
    assert metrics[ADV_ACC] == first and ADV_ACC not in trainer.evaluate(trainer.val_loader, prefix="test")
    assert ADV_ACC not in Trainer(config(), tiny).evaluate()  # only with adversarial training
    # Warm-up or not, the full-ε number; and the training the metric watches draws what it would without it.
    assert [h["epoch"] for h in fit(cfg, data=tiny).history] == [1]


# --- early stopping -----------------------------------------------------------------------------------------------
def scripted(monkeypatch, values):
    """val/adv_acc reads ``values`` in turn (the real attack still runs: only its number is replaced)."""
    it = iter(values)
    real = Trainer.robust_val_acc

    def fake(self):
        real(self)
        return next(it)

    monkeypatch.setattr(Trainer, "robust_val_acc", fake)


def test_early_stopping_keeps_the_best_epoch_weights(tiny, monkeypatch):
    scripted(monkeypatch, [0.1, 0.3, 0.2, 0.3, 0.5])
    cfg = config(epochs=5, adversarial={"name": "pgd", "eps": 0.3, "steps": 2},
                 adv_training={"early_stop_patience": 2})
    states = {}

    def keep(end):
        states[end.epoch] = {k: v.clone() for k, v in end.trainer.model.state_dict().items()}

    result = fit(cfg, callbacks=[keep], data=tiny)
    # Best 0.3 at epoch 2 (a tie later is no improvement); epochs 3 and 4 do not beat it: stop after epoch 4.
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.stopped_early and result.kept_epoch == 2 and result.trainer.epoch == 4
    final = result.model.state_dict()
    assert all(torch.equal(final[k], states[2][k]) for k in final)
    assert not all(torch.equal(final[k], states[4][k]) for k in final)


def test_warmup_epochs_are_not_candidates_for_early_stopping(tiny, monkeypatch):
    # At the full ε a model still warming up scores ~0: a tie of zeros must not stop the run (patience 1 would
    # stop after epoch 2 and keep epoch 1) nor may a warm-up epoch be kept.
    scripted(monkeypatch, [0.01, 0.0, 0.0, 0.2, 0.1, 0.1])
    cfg = config(epochs=6, adversarial={"name": "pgd", "eps": 0.3, "steps": 2},
                 adv_training={"eps_warmup_epochs": 2.5, "early_stop_patience": 2})
    result = fit(cfg, data=tiny)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5, 6]  # epoch 3 first counts (ε full by its end)
    assert result.kept_epoch == 4 and not result.stopped_early


def test_patience_never_exhausted_trains_every_epoch_and_keeps_the_best(tiny, monkeypatch):
    scripted(monkeypatch, [0.2, 0.4, 0.3, 0.0])  # the last for the run without patience
    cfg = config(epochs=3, adversarial={"name": "pgd", "eps": 0.3, "steps": 2},
                 adv_training={"early_stop_patience": 5})
    result = fit(cfg, data=tiny)
    assert len(result.history) == 3 and not result.stopped_early and result.kept_epoch == 2
    off = fit(config(epochs=1, adversarial={"name": "pgd", "eps": 0.3, "steps": 2}), data=tiny)
    assert off.kept_epoch == 1 and off.trainer.best is None  # no patience: the last epoch, nothing tracked


# --- checkpoints ----------------------------------------------------------------------------------------------------
WARMING = {"adversarial": {"name": "pgd", "eps": 0.3, "steps": 3},
           "adv_training": {"eps_warmup_epochs": 2.5, "eps_schedule": "cosine", "steps_warmup_epochs": 2,
                            "clean_weight": 0.2, "early_stop_patience": 3, "val_examples": 100, "val_steps": 2}}


def same_history(a, b) -> bool:
    timing = ("train/images_per_s", "train/epoch_time_s")
    return [{k: v for k, v in h.items() if k not in timing} for h in a] == \
        [{k: v for k, v in h.items() if k not in timing} for h in b]


@pytest.mark.parametrize("loss", ["gce", "cot"])
def test_resume_mid_warmup_equals_the_uninterrupted_run(tiny, tmp_path, loss):
    cfg = config(epochs=4, loss={"name": loss}, **WARMING)
    straight = fit(cfg, data=tiny)
    ckpts = {}

    def save(end):
        ckpts[end.epoch] = end.trainer.save_checkpoint(tmp_path / f"epoch{end.epoch}.pt")
        return end.epoch == 3

    fit(cfg, callbacks=[save], data=tiny)
    assert torch.load(ckpts[1], weights_only=True)["best"] is None  # still warming up: no candidate yet
    state = torch.load(ckpts[3], weights_only=True)
    assert state["best"]["epoch"] == 3 and set(state["best"]["model"]) == set(state["model"])
    for epoch in (1, 3):  # mid warm-up, and with a best epoch to carry
        resumed = fit(cfg, data=tiny, resume_from=ckpts[epoch])
        assert same_history(resumed.history, straight.history[epoch:])
        assert resumed.kept_epoch == straight.kept_epoch
        a, b = resumed.model.state_dict(), straight.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)  # bit for bit on the CPU


def test_a_checkpoint_past_its_patience_resumes_to_the_restore(tiny, tmp_path, monkeypatch):
    scripted(monkeypatch, [0.5, 0.1, 0.1])
    cfg = config(epochs=5, adversarial={"name": "pgd", "eps": 0.3, "steps": 2},
                 adv_training={"early_stop_patience": 1})
    paths = []

    def save(end):
        paths.append(end.trainer.save_checkpoint(tmp_path / f"e{end.epoch}.pt"))

    first = fit(cfg, callbacks=[save], data=tiny)
    assert first.kept_epoch == 1 and len(first.history) == 2
    again = fit(cfg, data=tiny, resume_from=paths[-1])  # the run's last checkpoint: it had stopped
    assert again.history == [] and again.kept_epoch == 1
    assert all(torch.equal(p, q) for p, q in zip(again.model.parameters(), first.model.parameters(), strict=True))


def test_checkpoints_without_the_best_key_still_load(tiny, tmp_path):
    cfg = config(epochs=2, adversarial={"name": "pgd", "eps": 0.3, "steps": 2})
    old = tmp_path / "old.pt"
    fit(cfg, callbacks=[lambda end: end.trainer.save_checkpoint(old) and True], data=tiny)
    state = torch.load(old, weights_only=True)
    del state["best"]  # as written before early stopping existed
    torch.save(state, old)
    resumed = fit(config(epochs=2, adversarial={"name": "pgd", "eps": 0.3, "steps": 2},
                         adv_training={"early_stop_patience": 2}), data=tiny, resume_from=old)
    assert [h["epoch"] for h in resumed.history] == [2] and resumed.kept_epoch == 2


# --- the config -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("adv_training", "field"),
    [
        ({"eps_warmup_epochs": -1}, "adv_training.eps_warmup_epochs"),
        ({"eps_schedule": "exp"}, r"adv_training.eps_schedule: must be one of \['linear', 'cosine'\]"),
        ({"steps_warmup_epochs": "2"}, "adv_training.steps_warmup_epochs"),
        ({"clean_weight": 1.5}, r"adv_training.clean_weight: must be a number in \[0, 1\]"),
        ({"val_steps": 0}, "adv_training.val_steps"),
        ({"val_examples": 2.5}, "adv_training.val_examples"),
        ({"early_stop_patience": 0}, "adv_training.early_stop_patience: must be null or an integer >= 1"),
        ({"patience": 3}, "adv_training: unknown key"),
    ],
)
def test_bad_adv_training_config_names_the_field(adv_training, field):
    with pytest.raises(ConfigError, match=field):
        config(adversarial={"name": "pgd", "eps": 0.3}, adv_training=adv_training)


def test_adv_training_round_trips_through_flat_params():
    cfg = config(adversarial=PGD, adv_training={"eps_warmup_epochs": 5, "eps_schedule": "cosine",
                                                "clean_weight": 0.5, "early_stop_patience": 3})
    flat = cfg.to_flat()
    assert flat["adv_training.eps_warmup_epochs"] == 5 and flat["adv_training.eps_schedule"] == "cosine"
    assert flat["adv_training.early_stop_patience"] == 3 and flat["adv_training.val_steps"] == 10
    assert TrainConfig.from_flat(flat) == cfg
    assert TrainConfig.from_dict({"data": {"dataset": "mnist5k"}}).adv_training == cfg.__class__().adv_training
    with pytest.raises(ConfigError, match="adversarial: must be an L∞ or L2 attack"):
        config(adversarial={"name": "jsma", "eps": 0.1})  # val/adv_acc has no PGD for L0


# --- the collapse, and training that trains (slow: real MNIST-5k runs) ----------------------------------------------
def one_class_share(model, x) -> float:
    with torch.no_grad():
        pred = model(x).argmax(1)
    return float(torch.bincount(pred, minlength=10).max()) / len(pred)


def accuracies(model, data) -> tuple[float, float]:
    """Clean and PGD-20 (ε 0.3, CE, random start) accuracy on the first 500 test images."""
    x, y = next(iter(DeviceLoader(data.test, 500)))
    model.eval()
    attack = build_attack(AttackConfig(name="pgd", eps=0.3, steps=20))
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    torch.manual_seed(0)
    x_adv = attack(model, x, y)
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == y).float().mean().item()
    return clean, robust


@pytest.mark.slow
def test_pgd_training_at_0_3_from_scratch_collapses_and_the_warmup_escapes():
    """40 batches (measured 9.4-10.2% clean on every seed, one class predicted; 2 of 3 seeds stay so for 10 epochs):
    at least one seed collapses; the same budget with an ε warm-up does not (measured 66.6-69.2%)."""
    collapsed = []
    for seed in (0, 1, 2):
        data = load_dataset("mnist5k", seed=seed)
        x, _ = next(iter(DeviceLoader(data.test, 500)))
        model = fit(mnist_config(seed, epochs=2, max_batches=20), data=data).model.eval()
        clean, robust = accuracies(model, data)
        if clean < 0.15 and one_class_share(model, x) > 0.9:
            collapsed.append(seed)
            assert robust <= clean
        warm = fit(mnist_config(seed, epochs=2, max_batches=20, adv_training={"eps_warmup_epochs": 2}), data=data)
        assert accuracies(warm.model, data)[0] > 0.5, seed
    assert collapsed, "PGD-10 at ε = 0.3 from scratch trained on every seed"


@pytest.mark.slow
def test_warmup_gives_pgd_accuracy_at_0_3_on_every_seed():
    """4 epochs, ε warmed up over 2 (measured: clean 87.6-88.6%, PGD-20 34.4-35.2%; standard training 0.0%).
    Thresholds about 10 points below the measurements: a collapse would sit at 10% clean and ≤ 10% PGD."""
    data0 = load_dataset("mnist5k", seed=0)
    standard = fit(mnist_config(0, epochs=4, adversarial=None), data=data0).model
    _, standard_robust = accuracies(standard, data0)
    assert standard_robust < 0.05
    for seed in (0, 1, 2):
        data = data0 if seed == 0 else load_dataset("mnist5k", seed=seed)
        result = fit(mnist_config(seed, epochs=4, adv_training={"eps_warmup_epochs": 2}), data=data)
        clean, robust = accuracies(result.model, data)
        assert clean > 0.78 and robust > 0.25 and robust > standard_robust + 0.2, (seed, clean, robust)
        assert result.history[-1][ADV_ACC] > 0.2  # the per-epoch metric sees it too (PGD-10, validation)
