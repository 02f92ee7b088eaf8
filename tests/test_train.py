import math

import pytest
import torch

from gce.config import ConfigError, TrainConfig
from gce.data import DeviceLoader, load_dataset
from gce.train import TrainingDiverged, fit, load_checkpoint


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k", seed=0)


def config(**overrides) -> TrainConfig:
    base = {"data": {"dataset": "mnist5k"}, "model": {"name": "lenet5"}, "loss": {"name": "gce"},
            "epochs": 2, "batch_size": 64, "seed": 0, "device": "cpu"}
    for key, value in overrides.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return TrainConfig.from_dict(base)


@pytest.mark.parametrize("loss", ["ce", "gce", "cot"])
def test_short_run_on_real_mnist_learns(mnist5k, loss):
    result = fit(config(loss={"name": loss}), data=mnist5k)
    history = result.history
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["val/clean_acc"] > 0.7  # chance is 0.1
    assert history[-1]["train/acc"] > history[0]["train/acc"]
    for key in ("train/loss", "train/acc", "val/loss", "val/clean_acc", "train/images_per_s"):
        assert math.isfinite(history[-1][key])
    if loss == "gce":
        assert -1.0 <= history[-1]["train/loss"] <= 0.0  # the paper-normalised GCE range


def test_same_seed_same_run_and_other_seed_differs(mnist5k):
    a = fit(config(epochs=1, max_batches=10), data=mnist5k).history
    b = fit(config(epochs=1, max_batches=10), data=mnist5k).history
    c = fit(config(epochs=1, max_batches=10, seed=1), data=mnist5k).history
    assert a[0]["train/loss"] == b[0]["train/loss"] and a[0]["val/loss"] == b[0]["val/loss"]
    assert a[0]["train/loss"] != c[0]["train/loss"]


def test_checkpoint_round_trip_gives_identical_predictions(mnist5k, tmp_path):
    result = fit(config(epochs=1, max_batches=20), data=mnist5k)
    path = result.trainer.save_checkpoint(tmp_path / "ckpt.pt")
    model, cfg = load_checkpoint(path)
    assert cfg == result.config
    x, _ = next(iter(DeviceLoader(mnist5k.test, 256)))
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model(x), rtol=0, atol=0)
    # Never a pickled module: the file loads with weights_only=True and holds state dicts.
    state = torch.load(path, weights_only=True)
    assert set(state) >= {"config", "model", "optimizer", "epoch"}


@pytest.mark.parametrize("loss", ["gce", "cot"])  # COT: two optimisers, both must resume
def test_resume_continues_to_the_same_weights(mnist5k, tmp_path, loss):
    cfg = config(epochs=2, max_batches=15, optim={"name": "adam", "lr": 1e-3}, loss={"name": loss},
                 schedule={"name": "cosine"})
    straight = fit(cfg, data=mnist5k)
    ckpt = tmp_path / "epoch1.pt"

    def save_then_stop(end):
        end.trainer.save_checkpoint(ckpt)
        return True  # simulate an interruption after epoch 1

    first = fit(cfg, callbacks=[save_then_stop], data=mnist5k)
    assert first.stopped_early and len(first.history) == 1
    resumed = fit(cfg, data=mnist5k, resume_from=ckpt)
    assert [h["epoch"] for h in resumed.history] == [2]  # the epoch count continues
    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_lr_schedules(mnist5k):
    step = fit(config(epochs=3, max_batches=2, schedule={"name": "step", "step_size": 1, "gamma": 0.5}),
               data=mnist5k).history
    assert [h["train/lr"] for h in step] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    cosine = fit(config(epochs=4, max_batches=2, schedule={"name": "cosine"}), data=mnist5k).history
    lrs = [h["train/lr"] for h in cosine]
    assert lrs[0] == pytest.approx(1e-3) and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))


def test_diverging_training_raises(mnist5k):
    with pytest.raises(TrainingDiverged, match="diverged"):
        fit(config(epochs=1, max_batches=20, loss={"name": "ce"}, optim={"name": "sgd", "lr": 1e12}), data=mnist5k)


def test_flat_config_round_trip():
    cfg = config(loss={"name": "gce", "alpha": 0.2}, optim={"name": "sgd", "lr": 0.1, "nesterov": True},
                 model={"name": "wide_resnet", "kwargs": {"depth": 16}})
    flat = cfg.to_flat()
    assert flat["loss.alpha"] == 0.2 and flat["optim.lr"] == 0.1 and flat["train.epochs"] == 2
    assert flat["model.kwargs.depth"] == 16 and flat["loss.normalization"] == "paper"
    assert all(not isinstance(v, dict) or v == {} for v in flat.values())
    assert TrainConfig.from_flat(flat) == cfg


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"loss": {"name": "ce", "alpha": 0.5}}, "loss.alpha"),
        ({"loss": {"name": "gce", "alpha": -1.0}}, "loss.alpha"),
        ({"loss": {"name": "focal"}}, "loss.name"),
        ({"model": {"name": "vgg"}}, "model.name"),
        ({"data": {"dataset": "imagenet"}}, "data.dataset"),
        ({"optim": {"name": "lbfgs"}}, "optim.name"),
        ({"optim": {"lr": -0.1}}, "optim.lr"),
        ({"optim": {"name": "adam", "nesterov": True}}, "optim.nesterov"),
        ({"schedule": {"name": "exp"}}, "schedule.name"),
        ({"epochs": 0}, "train.epochs"),
        ({"batch_size": 2.5}, "train.batch_size"),
        ({"device": "tpu"}, "train.device"),
        ({"optim": {"learning_rate": 0.1}}, "optim: unknown key"),
        ({"epoch": 3}, "train: unknown key"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        config(**overrides)


def test_pgd_adversarial_training_buys_robustness(mnist5k):
    """Madry et al.: minimising the loss on PGD examples raises accuracy under the same attack."""
    from gce.attacks import AttackConfig, build_attack

    x, y = next(iter(DeviceLoader(mnist5k.val, 300)))
    attack = build_attack(AttackConfig("pgd", eps=0.2, steps=10))
    robust = {}
    for name, adversarial in (("standard", None), ("adversarial", {"name": "pgd", "eps": 0.2, "steps": 3})):
        cfg = config(epochs=2, max_batches=40, loss={"name": "gce"}, adversarial=adversarial)
        model = fit(cfg, data=mnist5k).model
        with torch.no_grad():
            robust[name] = (model(attack(model, x, y)).argmax(1) == y).float().mean().item()
    assert robust["adversarial"] > robust["standard"] + 0.1, robust


def test_adversarial_config_round_trips_through_flat_params():
    cfg = config(adversarial={"name": "pgd", "eps": 0.3, "steps": 7, "loss": "train"})
    flat = cfg.to_flat()
    assert flat["adversarial.eps"] == 0.3 and flat["adversarial.loss"] == "train"
    assert TrainConfig.from_flat(flat) == cfg
    assert TrainConfig.from_flat(config().to_flat()).adversarial is None
    with pytest.raises(ValueError, match="eps"):
        config(adversarial={"name": "pgd", "eps": -0.1})
