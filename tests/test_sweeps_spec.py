"""Sweep specs: parsing, expansion, conditional spaces, and bad specs rejected with their YAML path."""

import pytest
import yaml
from typer.testing import CliRunner

from sweeps.cli import app
from sweeps.loading import load_spec, shipped_specs
from sweeps.spec import MAX_GRID_TRIALS, SpecError
from sweeps.validate import check_semantics, expected_metrics

BASE = {"name": "t", "experiment": "e", "base": {"data": {"dataset": "mnist5k"}, "model": {"name": "lenet5"}}}
ATTACKS = {"attacks": [{"name": "fgsm", "eps": [0.1, 0.3]}, {"name": "pgd", "eps": [0.1, 0.3], "steps": 5}]}


def spec(**fields):
    return {**BASE, **fields}


def test_every_shipped_spec_validates_and_smokes():
    shipped = shipped_specs()
    assert {"quickstart", "paper_mnist", "paper_cifar10", "alpha_ablation", "adv_training", "pareto",
            "fashion_mnist"} <= set(shipped)
    for name in shipped:
        loaded = load_spec(name)
        assert loaded.trial_count() >= 1
        smoke = loaded.smoke()
        assert smoke.trial_count() <= loaded.trial_count()
        cfg = smoke.trial_config(*_first(smoke))
        assert cfg.epochs == 1 and cfg.max_batches is not None
        assert check_semantics(smoke) == [], name  # the shrunk spec is as valid as the original


def _first(s):
    point = s.grid_points()[0] if s.search.algorithm == "grid" else {}
    return point, s.seeds[0]


def test_conditional_alpha_only_in_gce_trials():
    s = load_spec(spec(space={"loss.name": ["ce", "cot", "gce"],
                              "loss.alpha": {"grid": [0.1, 1.0], "when": {"loss.name": "gce"}}},
                       seeds=[0, 1]))
    points = s.grid_points()
    assert len(points) == 4 and s.trial_count() == 8
    for point in points:
        cfg = s.trial_config(point, 0)
        assert ("loss.alpha" in point) == (point["loss.name"] == "gce")
        assert (cfg.loss.alpha is None) == (cfg.loss.name != "gce")
    assert {p.get("loss.alpha") for p in points} == {None, 0.1, 1.0}


def test_trial_config_applies_point_and_seed_without_touching_the_base():
    s = load_spec(spec(space={"optim.lr": [0.1, 0.01], "model.name": ["lenet5", "mlp"]}))
    cfg = s.trial_config({"optim.lr": 0.01, "model.name": "mlp"}, 7)
    assert cfg.optim.lr == 0.01 and cfg.model.name == "mlp" and cfg.seed == 7
    assert s.trial_config({}, 0).model.name == "lenet5"


def test_metric_names_follow_the_attacks():
    s = load_spec(spec(evaluation=ATTACKS))
    names = expected_metrics(s).exact
    assert {"val/robust_acc/worst_case", "val/robust_acc/pgd/eps_0.3", "test/robust_acc/fgsm/eps_0.1",
            "val/clean_acc", "val/robust_acc/worst_case/eps_0.1"} <= names
    assert s.objectives[0].metric == "val/robust_acc/worst_case"  # default objective when the spec attacks
    assert load_spec(spec()).objectives[0].metric == "val/clean_acc"  # and when it does not


def test_smoke_shrinks_the_work():
    s = load_spec(spec(evaluation=ATTACKS, seeds=[0, 1, 2], base={**BASE["base"], "epochs": 20}))
    smoke = s.smoke()
    assert smoke.seeds == [0] and smoke.evaluation.max_examples <= 64
    cfg = smoke.trial_config({}, 0)
    assert cfg.epochs == 1 and cfg.max_batches == 3 and cfg.data.limit == 512
    assert all(a.model_extra.get("steps", 1) <= 3 for a in smoke.evaluation.attacks)


BAD_SPECS = [
    # (what, spec or raw YAML text, fragment the message must contain)
    ("unknown top-level key", spec(epochs=3), "epochs: unknown key"),
    ("unknown base key", spec(base={"optim": {"learning_rate": 0.1}}), "optim: unknown key"),
    ("wrong type", spec(seeds="zero"), "seeds"),
    ("empty grid", spec(space={"loss.name": []}), "space.loss.name"),
    ("empty choice", spec(space={"loss.name": {"choice": []}}, search={"algorithm": "random"}), "space.loss.name"),
    ("alpha on non-GCE loss", spec(space={"loss.name": ["ce", "gce"], "loss.alpha": [0.1, 0.5]}),
     "when: {loss.name: gce}"),
    ("alpha in base for CE", spec(base={"loss": {"name": "ce", "alpha": 0.2}}), "base: loss.alpha"),
    ("negative eps", spec(evaluation={"attacks": [{"name": "pgd", "eps": [-0.1]}]}), "evaluation.attacks.0"),
    ("unknown attack", spec(evaluation={"attacks": [{"name": "deepfool", "eps": [0.1]}]}), "known attacks"),
    ("unknown model", spec(base={"model": {"name": "vgg16"}}), "model.name: must be one of"),
    ("unknown dataset", spec(base={"data": {"dataset": "imagenet"}}), "data.dataset"),
    ("unknown loss in space", spec(space={"loss.name": ["ce", "focal"]}), "space.loss.name"),
    ("loguniform at zero", spec(space={"optim.lr": {"loguniform": [0, 1]}}, search={"algorithm": "tpe"}),
     "space.optim.lr"),
    ("uniform reversed", spec(space={"optim.lr": {"uniform": [0.2, 0.1]}}, search={"algorithm": "tpe"}),
     "low must be below high"),
    ("distribution in grid search", spec(space={"optim.lr": {"uniform": [0.1, 0.2]}}), "search.algorithm 'grid'"),
    ("unknown searcher", spec(search={"algorithm": "bayesopt"}), "search.algorithm"),
    ("negative cpus", spec(resources={"cpu": -1}), "resources.cpu"),
    ("fractional gpu above 1", spec(resources={"gpu": 1.5}), "gpu"),
    ("zero concurrency", spec(max_concurrent_trials=0), "max_concurrent_trials"),
    ("unknown objective metric", spec(objective={"metric": "val/robustness"}), "objective.metric"),
    ("multi-objective with one metric", spec(search={"algorithm": "multi_objective"}), "two objectives"),
    ("asha on a final-only metric", spec(scheduler={"name": "asha", "metric": "val/robust_acc/worst_case"}),
     "scheduler.metric"),
    ("when on unknown dimension", spec(space={"loss.alpha": {"grid": [0.1], "when": {"loss.nam": "gce"}}}),
     "space.loss.alpha.when"),
    ("unknown space path", spec(space={"optim.lrr": [0.1]}), "space.optim.lrr"),
    ("huge grid", spec(space={"optim.lr": [i / 1e6 + 1e-6 for i in range(MAX_GRID_TRIALS + 1)]}), "limit"),
    ("primary eps not evaluated", spec(evaluation={**ATTACKS, "primary_eps": 0.2}), "primary_eps"),
    ("bad name", spec(name="has space"), "name"),
    ("not a mapping", "- just\n- a list\n", "must be a mapping"),
    ("YAML syntax error", "name: [unclosed\n", "not valid YAML"),
    ("several seeds in a sampled search", spec(space={"optim.lr": {"loguniform": [1e-4, 1e-2]}}, seeds=[0, 1],
                                               search={"algorithm": "tpe", "num_samples": 4}), "seeds:"),
    ("empty eps list", spec(evaluation={"attacks": [{"name": "fgsm", "eps": []}]}), "evaluation.attacks.0.eps"),
]


@pytest.mark.parametrize(("what", "raw", "fragment"), BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_spec_is_rejected_naming_the_field(what, raw, fragment, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert fragment in str(err.value), str(err.value)


def test_missing_spec_lists_the_shipped_ones():
    with pytest.raises(SpecError, match="shipped"):
        load_spec("no_such_spec")


def test_validate_command_prints_count_and_first_configs():
    result = CliRunner().invoke(app, ["validate", "quickstart"])
    assert result.exit_code == 0, result.output
    assert "5 trial(s)" in result.output and "'loss.alpha': 0.1" in result.output


def test_validate_command_rejects_a_bad_spec(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec(space={"loss.name": ["ce", "gce"], "loss.alpha": [0.1]})))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "loss.alpha" in result.output


def test_set_overrides_reach_base_space_and_seeds():
    s = load_spec("paper_mnist", ["base.data.dataset=mnist5k", "base.epochs=3", "space.loss.name=[ce, cot, gce]",
                                  "seeds=[4]"])
    cfg = s.trial_config(s.grid_points()[1], s.seeds[0])
    assert cfg.data.dataset == "mnist5k" and cfg.epochs == 3 and cfg.loss.name == "cot" and cfg.seed == 4
    with pytest.raises(SpecError, match="PATH=VALUE"):
        load_spec("quickstart", ["base.epochs"])
    with pytest.raises(SpecError, match="train.epochs"):
        load_spec("quickstart", ["base.epochs=0"])


def test_a_null_grid_value_unsets_the_base_value():
    s = load_spec(spec(base={**BASE["base"], "adversarial": {"name": "pgd", "eps": 0.1, "steps": 2}},
                       space={"adversarial": [None, {"name": "pgd", "eps": 0.3, "steps": 5}]}))
    configs = [s.trial_config(p, 0) for p in s.grid_points()]
    assert configs[0].adversarial is None and configs[1].adversarial.eps == 0.3


def test_evaluation_batch_size_auto_and_bad_values():
    auto = load_spec(spec(evaluation={**ATTACKS, "max_examples": 2000})).evaluation
    assert auto.batch_size == "auto"
    assert auto.resolved_batch_size("cpu") == 500  # CPU: bigger batches buy nothing
    assert auto.resolved_batch_size("cuda") == 2000  # accelerator: all at once, halved on out-of-memory
    fixed = load_spec(spec(evaluation={**ATTACKS, "batch_size": 64})).evaluation
    assert fixed.resolved_batch_size("cuda") == 64
    for bad in (0, "big"):
        with pytest.raises(SpecError, match="evaluation.batch_size"):
            load_spec(spec(evaluation={**ATTACKS, "batch_size": bad}))
