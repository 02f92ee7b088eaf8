"""Stacked trials in a real sweep (local Ray, real MLflow server): each member is an ordinary trial run, equal to
the same trial run unstacked, and found by `best` and `compare` like one."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from gce.metrics import EPOCH
from sweeps.launcher import run_sweep
from sweeps.loading import load_spec
from sweeps.spec import SpecError
from sweeps.stacking import DECISION_TAG, MEMBER_TAG, SIZE_TAG, STACK_TAG, VECTORIZED_TAG
from tracking.logger import ROLE_TAG, SWEEP_TAG, TRIAL_TAG
from tracking.queries import best_runs, compare_runs

pytestmark = pytest.mark.slow

BASE = {"data": {"dataset": "mnist5k", "limit": 512}, "model": {"name": "lenet5"},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "epochs": 2, "batch_size": 64, "max_batches": 4}
EVAL = {"max_examples": 64, "attacks": [{"name": "fgsm", "eps": [0.1]}]}


def spec(name: str, stack: int, **fields):
    return load_spec({"name": name, "experiment": "test-stacking", "base": BASE, "evaluation": EVAL,
                      "space": {"loss.name": ["ce", "gce"], "optim.lr": [0.05, 0.02]}, "seeds": [0, 1],
                      "resources": {"cpu": 1, "stack": stack}, "system_metrics": {"enabled": False}, **fields})


def trial_runs(client: MlflowClient, sweep_id: str) -> list:
    exp = client.get_experiment_by_name("test-stacking")
    return client.search_runs([exp.experiment_id],
                              f"tags.`{SWEEP_TAG}` = '{sweep_id}' AND tags.`{ROLE_TAG}` = 'trial'")


def by_assignment(runs) -> dict[tuple, object]:
    return {(r.data.params["sweep.point"], r.data.params["train.seed"]): r for r in runs}


def test_stacked_members_are_ordinary_runs_equal_to_unstacked_ones(ray_local, mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.url)
    stacked = run_sweep(spec("stacked", 4, resources={"cpu": 1, "stack": 4, "vectorize": False}),
                        tracking_uri=mlflow_server.url, storage=tmp_path / "a")
    assert stacked.trials == 8 and stacked.errors == 0
    solo = run_sweep(spec("solo", 1), tracking_uri=mlflow_server.url, storage=tmp_path / "b")
    assert solo.trials == 8 and solo.errors == 0
    forced = run_sweep(spec("vectorized", 4, resources={"cpu": 1, "stack": 4, "vectorize": True}),
                       tracking_uri=mlflow_server.url, storage=tmp_path / "c")
    assert forced.trials == 8 and forced.errors == 0
    vectorized = trial_runs(client, forced.sweep_id)
    assert {r.data.tags[VECTORIZED_TAG] for r in vectorized} == {"true"}

    members = trial_runs(client, stacked.sweep_id)
    assert len(members) == 8 and len({r.data.tags[TRIAL_TAG] for r in members}) == 8
    stacks = {r.data.tags[STACK_TAG] for r in members}
    assert len(stacks) == 2  # 8 trials of one shape in stacks of 4
    assert {r.data.tags[SIZE_TAG] for r in members} == {"4"}
    assert sorted(int(r.data.tags[MEMBER_TAG]) for r in members) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert {r.data.tags[VECTORIZED_TAG] for r in members} == {"false"}  # as forced (measured: test_stacked.py)
    assert json.loads(members[0].data.tags[DECISION_TAG])["vectorize"] is False

    alone = by_assignment(trial_runs(client, solo.sweep_id))
    for key, run in [*by_assignment(members).items(), *by_assignment(vectorized).items()]:
        twin = alone[key]
        assert run.info.status == "FINISHED"
        assert set(twin.data.metrics) <= set(run.data.metrics)  # every metric an unstacked trial logs
        assert {k: v for k, v in run.data.params.items()} == twin.data.params  # same params, nothing extra
        # Sequential members compute exactly the solo steps; vectorised ones equal them to float rounding
        # (tests/test_stacked.py measures metrics within 2e-4 of solo after 2 epochs; 2e-3 here, 10x).
        exact = run.data.tags[VECTORIZED_TAG] == "false"
        for metric in ("train/loss", *EPOCH):
            ours = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric)]
            theirs = [(m.step, m.value) for m in client.get_metric_history(twin.info.run_id, metric)]
            assert [s for s, _ in ours] == [s for s, _ in theirs] == [1, 2], (metric, ours)
            for (_, a), (_, b) in zip(ours, theirs, strict=True):
                if metric in ("train/images_per_s", "train/epoch_time_s"):
                    continue
                assert a == b if exact else a == pytest.approx(b, abs=2e-3), (key, metric, a, b)
        if exact:  # the same model: the same evaluation
            assert run.data.metrics["val/robust_acc/worst_case"] == twin.data.metrics["val/robust_acc/worst_case"]

    top = best_runs(client, "test-stacking", filter_string=f"tags.`{SWEEP_TAG}` = '{stacked.sweep_id}'")
    assert {r.info.run_id for r in top} == {r.info.run_id for r in members}
    groups = compare_runs(client, "test-stacking", filter_string=f"tags.`{SWEEP_TAG}` = '{stacked.sweep_id}'")
    assert len(groups) == 4 and all(len(g.runs) == 2 for g in groups)  # 4 configurations × 2 seeds


def test_stacking_is_refused_where_members_cannot_be_known_ahead():
    with pytest.raises(SpecError, match=r"resources\.stack.*search\.algorithm 'grid'"):
        load_spec({"name": "s", "experiment": "e", "base": BASE, "space": {"optim.lr": {"loguniform": [1e-3, 1e-1]}},
                   "search": {"algorithm": "tpe", "num_samples": 4}, "resources": {"stack": 4}})
    with pytest.raises(SpecError, match=r"resources\.stack.*scheduler\.name 'none'"):
        load_spec({"name": "s", "experiment": "e", "base": BASE, "space": {"optim.lr": [0.1, 0.01]},
                   "scheduler": {"name": "asha"}, "resources": {"stack": 2}})


def test_stacks_group_only_trials_of_one_shape():
    """Trials of another model (or COT among non-COT losses) go into stacks of their own."""
    s = load_spec({"name": "s", "experiment": "e", "base": BASE, "seeds": [0, 1, 2],
                   "space": {"loss.name": ["ce", "gce", "cot"], "model.name": ["lenet5", "mlp"]},
                   "resources": {"stack": 4}})
    groups = s.stack_groups()
    assert sum(len(g) for g in groups) == s.trial_count() == 18
    for group in groups:
        assert len(group) <= 4
        shapes = {(m["point"]["model.name"], m["point"]["loss.name"] == "cot") for m in group}
        assert len(shapes) == 1, group
    assert s.ray_trial_count() == len(groups) == 6  # (lenet5|mlp) × (ce+gce: 6 → 4+2 | cot: 3)
