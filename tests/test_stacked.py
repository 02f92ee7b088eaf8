"""Stacked training (gce.stacked): every member equals its solo ``fit`` run.

Tolerances of the vectorised path, measured on this suite's settings (2-core CPU, torch 2.14): vmapped
convolutions sum in another order, and Adam turns a rounding-level gradient into a ±lr step, so members drift
from their solo runs by float noise. Parameters are compared as ‖θ_stacked − θ_solo‖₂ / ‖θ_solo − θ_init‖₂
(the difference as a share of what training moved), which one sign-flipped entry cannot dominate.

- LeNet-5 (3 members, Adam): measured ≤ 6.7e-4 relative (typically 1e-6..7e-6), metrics ≤ 1.6e-4.
- ResNet-20 (2 members, SGD, NCHW): ≤ 1.6e-3 relative, running stats ≤ 3.8e-5 of their largest value,
  metrics ≤ 1.5e-4; num_batches_tracked exact. (The same solo run on 1 thread instead of 2 differs by 4e-4.)

- LeNet-5 with PGD adversarial training (3 members, ε 0.1/0.2/0.3): PGD's sign steps amplify the drift:
  ≤ 8.4e-3 relative, metrics ≤ 2.6e-3 (its own, looser tolerances; a wrong batch gives 0.11, lr ×1.1 0.5).

Mutations, checked once against these settings (not kept as tests): one batch of member 1 swapped for member
0's gives 0.10-0.13 relative and metrics 8e-3..7e-2 off; a member's lr ×1.1 gives 0.09-0.29 and 2e-2..0.13;
two members swapped give ≥ 9. The tolerances below sit a few times above the noise and ≥ 7x below those.
"""

from __future__ import annotations

import math

import pytest
import torch

from gce.config import TrainConfig
from gce.data import load_dataset
from gce.metrics import ADV_ACC
from gce.stacked import StackedTrainer, StackError, check_stackable, fit_stacked, stack_key, stack_problems
from gce.train import Trainer, TrainingDiverged, fit

REL_PARAMS = 5e-3  # relative L2 of the parameter difference (see the module docstring)
METRICS_ATOL = 1e-3
ADV_REL_PARAMS, ADV_METRICS_ATOL = 3e-2, 1e-2
BUFFERS_REL = 5e-4  # BatchNorm running statistics, relative to each tensor's largest value
TIMING = ("train/images_per_s", "train/epoch_time_s")
KEYS = {"train/loss", "train/acc", "train/images_per_s", "train/epoch_time_s", "train/lr", "val/loss",
        "val/clean_acc", "epoch"}


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist5k", seed=0, limit=640, val_size=200)


def config(**overrides) -> TrainConfig:
    base = {"data": {"dataset": "mnist5k", "limit": 640, "val_size": 200}, "model": {"name": "lenet5"},
            "loss": {"name": "ce"}, "epochs": 2, "batch_size": 64, "seed": 0, "device": "cpu", "max_batches": 6}
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainConfig.from_dict(base)


LENET = [config(seed=0), config(seed=1, loss={"name": "gce", "alpha": 0.5}), config(seed=2, optim={"lr": 3e-3})]


@pytest.fixture(scope="module")
def lenet_solo(data):
    inits = [{k: v.clone() for k, v in Trainer(c, data).model.state_dict().items()} for c in LENET]
    return [fit(c, data=data) for c in LENET], inits


def relative_param_diff(stacked, solo, init) -> float:
    a, b = stacked.model.state_dict(), solo.model.state_dict()
    keys = [k for k in a if "running" not in k and "num_batches" not in k]
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in keys)
    moved = sum(float(((b[k] - init[k]) ** 2).sum()) for k in keys)
    return math.sqrt(diff / moved)


def assert_metrics(stacked_history, solo_history, atol: float = METRICS_ATOL, adversarial: bool = False) -> None:
    keys = KEYS | ({ADV_ACC} if adversarial else set())  # adversarial training adds its validation PGD accuracy
    assert [h["epoch"] for h in stacked_history] == [h["epoch"] for h in solo_history]
    for got, want in zip(stacked_history, solo_history, strict=True):
        assert set(got) == set(want) == keys
        for key in keys - set(TIMING):
            assert got[key] == pytest.approx(want[key], abs=atol), key
        assert got["train/images_per_s"] > 0 and got["train/epoch_time_s"] > 0


def assert_identical(result, reference, skip: int = 0) -> None:
    """Bit for bit (the sequential path is the solo computation); ``skip``: epochs the result resumed past."""
    a, b = result.model.state_dict(), reference.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert [{k: v for k, v in h.items() if k not in TIMING} for h in result.history] == \
        [{k: v for k, v in h.items() if k not in TIMING} for h in reference.history[skip:]]


def test_lenet_members_equal_their_solo_runs(data, lenet_solo):
    solo, inits = lenet_solo
    stacked = fit_stacked(LENET, data=data, vectorize=True)
    assert stacked[0].decision.vectorize and [r.member for r in stacked] == [0, 1, 2]
    for s, r, init in zip(stacked, solo, inits, strict=True):
        assert s.config == r.config and s.error is None and not s.stopped_early
        assert_metrics(s.history, r.history)
        assert relative_param_diff(s, r, init) < REL_PARAMS


def test_resnet_batchnorm_members_equal_their_solo_runs(data):
    # NCHW: oneDNN's channels-last weight gradients round 1e-3 relative on this CPU (solo and stacked alike), which
    # the early BN dynamics amplify to the size of a real mutation's effect.
    cfgs = [config(seed=s, model={"name": "resnet20"}, optim={"name": "sgd", "lr": 1e-3}, max_batches=3,
                   channels_last=False) for s in (0, 1)]
    inits = [{k: v.clone() for k, v in Trainer(c, data).model.state_dict().items()} for c in cfgs]
    solo = [fit(c, data=data) for c in cfgs]
    stacked = fit_stacked(cfgs, data=data, vectorize=True)
    for s, r, init in zip(stacked, solo, inits, strict=True):
        assert_metrics(s.history, r.history)
        assert relative_param_diff(s, r, init) < REL_PARAMS
        a, b = s.model.state_dict(), r.model.state_dict()
        stats = [k for k in b if "running" in k]
        assert stats and all(not torch.equal(b[k], init[k]) for k in stats)  # the statistics did move
        for k in stats:
            assert float((a[k] - b[k]).abs().max()) <= BUFFERS_REL * float(b[k].abs().max()), k
        counts = [k for k in b if k.endswith("num_batches_tracked")]
        assert counts and all(int(a[k]) == int(b[k]) == 6 for k in counts)


@pytest.mark.parametrize("kind", ["mixed losses", "cot", "adversarial"])
def test_sequential_path_is_exactly_solo(data, kind):
    if kind == "mixed losses":
        cfgs = LENET[:2]
    elif kind == "cot":  # two optimisers, alternating steps
        cfgs = [config(seed=0, loss={"name": "cot"}), config(seed=1, loss={"name": "cot"}, optim={"lr": 2e-3})]
    else:  # PGD random starts: each member draws from its own stream
        cfgs = [config(seed=s, adversarial={"name": "pgd", "eps": eps, "steps": 2}, max_batches=3)
                for s, eps in ((0, 0.1), (1, 0.2))]
    stacked = fit_stacked(cfgs, data=data, vectorize=False)
    assert not stacked[0].decision.vectorize
    for s, c in zip(stacked, cfgs, strict=True):
        assert_identical(s, fit(c, data=data))


def test_cot_members_vectorised_equal_their_solo_runs(data):
    cfgs = [config(seed=0, loss={"name": "cot"}), config(seed=1, loss={"name": "cot"}, optim={"lr": 2e-3})]
    inits = [{k: v.clone() for k, v in Trainer(c, data).model.state_dict().items()} for c in cfgs]
    for s, c, init in zip(fit_stacked(cfgs, data=data, vectorize=True), cfgs, inits, strict=True):
        r = fit(c, data=data)
        assert_metrics(s.history, r.history)
        assert relative_param_diff(s, r, init) < REL_PARAMS


def test_adversarial_members_vectorised_equal_their_solo_runs(data):
    cfgs = [config(seed=s, adversarial={"name": "pgd", "eps": eps, "steps": 3}) for s, eps in ((0, 0.1), (1, 0.2))]
    inits = [{k: v.clone() for k, v in Trainer(c, data).model.state_dict().items()} for c in cfgs]
    for s, c, init in zip(fit_stacked(cfgs, data=data, vectorize=True), cfgs, inits, strict=True):
        r = fit(c, data=data)
        assert_metrics(s.history, r.history, atol=ADV_METRICS_ATOL, adversarial=True)
        assert relative_param_diff(s, r, init) < ADV_REL_PARAMS


def test_checkpoints_from_a_stack_resume_solo_and_stacked(data, tmp_path):
    # Adversarial members: a checkpoint holding the wrong random stream would resume to other PGD starts.
    cfgs = [config(seed=s, adversarial={"name": "pgd", "eps": eps, "steps": 2}, max_batches=3)
            for s, eps in ((0, 0.1), (1, 0.2))]
    straight = [fit(c, data=data) for c in cfgs]
    paths = [tmp_path / f"member{i}.pt" for i in range(2)]
    seen = []

    def save_then_stop(ends):
        seen.append([e.trainer.index for e in ends])
        for end in ends:
            assert isinstance(end.trainer, Trainer) and end.epoch == 1
            end.trainer.save_checkpoint(paths[end.trainer.index])
        return True  # an interruption after epoch 1, for all members

    first = fit_stacked(cfgs, [save_then_stop], data=data, vectorize=False)
    assert seen == [[0, 1]] and all(r.stopped_early and len(r.history) == 1 for r in first)
    for i, c in enumerate(cfgs):  # a member's checkpoint is a solo one
        resumed = fit(c, data=data, resume_from=paths[i])
        assert [h["epoch"] for h in resumed.history] == [2]
        assert_identical(resumed, straight[i], skip=1)
    again = fit_stacked(cfgs, data=data, resume_from=paths, vectorize=False)
    for r, s in zip(again, straight, strict=True):
        assert [h["epoch"] for h in r.history] == [2]
        assert_identical(r, s, skip=1)
    # Members at different epochs: the one behind trains alone until they are level, then both go on.
    rounds = []
    mixed = fit_stacked(cfgs, [lambda ends: rounds.append([e.trainer.index for e in ends])], data=data,
                        resume_from=[paths[0], None], vectorize=False)
    assert rounds == [[1], [0, 1]]
    assert_identical(mixed[1], straight[1])
    assert_identical(mixed[0], straight[0], skip=1)


def test_early_stop_of_one_member_lets_the_others_go_on(data, lenet_solo):
    solo, inits = lenet_solo
    calls = []

    def stop_member0(ends):
        calls.append([e.trainer.index for e in ends])
        return [e.trainer.index == 0 for e in ends]

    stacked = fit_stacked(LENET, [stop_member0], data=data, vectorize=True)
    assert calls == [[0, 1, 2], [1, 2]]
    assert stacked[0].stopped_early and len(stacked[0].history) == 1
    assert_metrics(stacked[0].history, solo[0].history[:1])
    for i in (1, 2):
        assert not stacked[i].stopped_early
        assert_metrics(stacked[i].history, solo[i].history)
        assert relative_param_diff(stacked[i], solo[i], inits[i]) < REL_PARAMS


def test_a_diverged_member_leaves_the_stack_or_raises(data):
    cfgs = [config(seed=0, optim={"name": "sgd", "lr": 1e12}, max_batches=3),
            config(seed=1, optim={"name": "sgd", "lr": 0.01}, max_batches=3)]
    results = fit_stacked(cfgs, data=data, vectorize=True)
    assert isinstance(results[0].error, TrainingDiverged) and results[0].history == []
    assert "member 0" in str(results[0].error) and "train.seed=0" in str(results[0].error)
    assert results[1].error is None
    assert_metrics(results[1].history, fit(cfgs[1], data=data).history)
    with pytest.raises(TrainingDiverged, match=r"member 0 \(train.seed=0, optim.lr=1000000000000.0\).*diverged"):
        fit_stacked(cfgs, data=data, vectorize=False, on_diverged="raise")


def test_what_may_differ_and_what_may_not():
    base = config()
    free = [config(seed=3), config(loss={"name": "gce", "alpha": 0.2, "normalization": "code"}),
            config(optim={"lr": 0.1, "weight_decay": 1e-4}),
            config(loss={"name": "label_smoothing", "kwargs": {"smoothing": 0.2}})]
    assert {stack_key(c) for c in free} == {stack_key(base)}
    check_stackable([base, *free])
    adv = [config(adversarial={"name": "pgd", "eps": e, "steps": 2}) for e in (0.1, 0.3)]
    assert stack_key(adv[0]) == stack_key(adv[1]) != stack_key(base)
    cases = [(config(model={"name": "resnet20"}), "model.name"), (config(batch_size=32), "train.batch_size"),
             (config(optim={"name": "sgd"}), "optim.name"), (adv[0], "adversarial"),
             (config(loss={"name": "cot"}), "COT")]
    for other, field in cases:
        assert stack_key(other) != stack_key(base)
        problems = stack_problems([base, other])
        assert len(problems) >= 1 and field in problems[0], problems
        with pytest.raises(StackError, match=field):
            check_stackable([base, other])
    assert stack_problems([adv[0], config(adversarial={"name": "pgd", "eps": 0.1, "steps": 3})])[0].startswith(
        "adversarial.steps")
    with pytest.raises(StackError, match="train.max_batches"):
        fit_stacked([base, config(max_batches=2)])


def test_vectorize_none_measures_both_without_touching_the_members(data):
    cfgs = [config(seed=s, model={"name": "resnet20"}, batch_size=16, max_batches=1, epochs=1) for s in (0, 1)]
    stack = StackedTrainer(cfgs, data)
    d = stack.decision
    assert d.stacked_s > 0 and d.sequential_s > 0 and d.vectorize == (d.stacked_s < d.sequential_s)
    assert d.speedup == pytest.approx(d.sequential_s / d.stacked_s) and "measured" in d.reason
    assert d.to_dict()["vectorize"] == d.vectorize
    for member, c in zip(stack.members, cfgs, strict=True):  # weights, BN statistics and streams as built
        fresh = Trainer(c, data)
        a, b = member.model.state_dict(), fresh.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)
        assert torch.equal(member.state_dict()["torch_rng"], torch.get_rng_state())
        assert member.optimizer.state_dict()["state"] == {}


def test_a_model_with_dropout_cannot_be_vectorised(data):
    cfgs = [config(seed=s, model={"name": "wide_resnet", "kwargs": {"depth": 10, "widen_factor": 1, "dropout": 0.3}},
                   batch_size=8, max_batches=1, epochs=1) for s in (0, 1)]
    assert not StackedTrainer(cfgs, data).decision.vectorize  # None: the vectorised step does not run
    with pytest.raises(RuntimeError, match="random numbers"):
        fit_stacked(cfgs, data=data, vectorize=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vectorised_members_equal_their_solo_runs_on_cuda():
    """On the GPU (where stacking is meant to pay): fp32, members vectorised vs each member alone on the same
    device. Tolerances as on the CPU, loosened 4x for cuDNN's own kernel choices."""
    cuda = [TrainConfig.from_dict({**c.to_dict(), "device": "cuda", "precision": "fp32"}) for c in LENET]
    data = load_dataset("mnist5k", seed=0, limit=640, val_size=200)
    inits = [{k: v.clone() for k, v in Trainer(c, data).model.state_dict().items()} for c in cuda]
    solo = [fit(c, data=data) for c in cuda]
    stacked = fit_stacked(cuda, data=data, vectorize=True)
    for s, alone, init in zip(stacked, solo, inits, strict=True):
        assert relative_param_diff(s, alone, init) < 4 * REL_PARAMS
        assert_metrics(s.history, alone.history, atol=4 * METRICS_ATOL)
