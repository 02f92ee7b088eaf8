"""``tracking.ablation`` on synthetic studies with known effects, and ``gce-sweep ablate`` against a real server."""

from __future__ import annotations

import json
import random
import uuid

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from sweeps.cli import app
from tracking import ablation
from tracking.ablation import EPS, LOSS, Factor, Observation, contrast, importance, interaction, main_effects
from tracking.logger import RunLogger

LOSS_F = Factor(LOSS, "loss", ("CE", "GCE α=1/3"), reference="CE")
EPS_F = Factor(EPS, "ε")
RADII = ("0.1", "0.2", "0.3")


def study(rng: random.Random, *, gain=lambda eps: 0.10, slope: float = -1.5, seeds: int = 5, noise: float = 0.01,
          seed_spread: float = 0.03) -> list[Observation]:
    """CE vs GCE at three ε: accuracy 0.95 + slope·ε (+ gain(ε) for GCE), a per-seed offset shared by both losses
    (same init and data order) and independent noise per observation."""
    out = []
    for s in range(seeds):
        offset = rng.gauss(0, seed_spread)
        for loss in LOSS_F.levels:
            for eps in RADII:
                value = 0.95 + slope * float(eps) + (gain(float(eps)) if loss != "CE" else 0.0)
                out.append(Observation({LOSS: loss, EPS: eps}, str(s), value + offset + rng.gauss(0, noise)))
    return out


def test_t_interval_matches_the_textbook_numbers():
    e = ablation.t_interval([1.0, 2.0, 3.0, 4.0])
    assert e.mean == 2.5 and e.n == 4
    assert e.high - e.mean == pytest.approx(3.182446 * 1.290994 / 2, rel=1e-5)  # t(0.975, 3) · s / √n
    assert ablation.t_interval([1.0]).n == 1 and ablation.t_interval([]).n == 0


def test_main_effects_rank_thefactors_of_and_their_intervals_cover_the_truth():
    effects = main_effects(study(random.Random(1)), [LOSS_F, EPS_F])
    assert [e.factor.key for e in effects] == [EPS, LOSS]  # ε moves 30 points, the loss 10
    eps, loss = effects
    assert (eps.best, eps.worst) == ("0.1", "0.3") and eps.effect.covers(0.30) and eps.effect.low > 0.25
    assert loss.best == "GCE α=1/3" and loss.reference == "CE"
    gain = loss.contrasts["GCE α=1/3"]
    assert gain.basis == "seeds" and gain.n == 5  # matched on ε and seed, replicated over seeds
    assert gain.covers(0.10) and gain.low > 0.05 and gain.high - gain.low < 0.05
    # A level's interval spans the other factors too: CE's marginal mean (over ε) is inside it.
    assert loss.levels["CE"].covers(0.95 - 1.5 * 0.2) and loss.levels["CE"].n == 15


def test_matched_effect_intervals_have_their_nominal_coverage():
    """Over many synthetic studies the 95% interval of GCE − CE covers the true +10 points about 95% of the time:
    matching on the seed removes the seed offsets without making the interval too narrow."""
    rng = random.Random(7)
    covered = sum(contrast(obs, [LOSS_F, EPS_F], LOSS_F, "GCE α=1/3", "CE").covers(0.10)
                  for obs in (study(rng, seeds=4, noise=0.02, seed_spread=0.05) for _ in range(300)))
    assert 0.91 * 300 <= covered <= 0.99 * 300


def test_interaction_contrast_detects_a_gain_that_grows_with_eps():
    grows = interaction(study(random.Random(2), gain=lambda eps: 0.02 + (eps - 0.1)), [LOSS_F, EPS_F], LOSS_F, EPS_F)
    for eps, truth in zip(RADII, (0.02, 0.12, 0.22), strict=True):
        assert grows.contrasts[("GCE α=1/3", eps)].covers(truth)
    dependence = grows.dependence["GCE α=1/3"]  # gain at ε=0.3 − gain at ε=0.1 = 20 points
    assert dependence.covers(0.20) and dependence.low > 0.1
    assert grows.cells[("CE", "0.3")].covers(0.95 - 0.45)
    flat = interaction(study(random.Random(2)), [LOSS_F, EPS_F], LOSS_F, EPS_F)
    assert flat.dependence["GCE α=1/3"].covers(0.0)  # a constant gain: no interaction


def test_importance_ranks_the_dominant_factor_first_and_is_deterministic():
    dominated_by_eps = importance(study(random.Random(3)), [LOSS_F, EPS_F])
    assert dominated_by_eps.evaluator == "fANOVA" and "variance" in dominated_by_eps.why
    names = [name for name, _ in dominated_by_eps.scores]
    assert names == ["ε", "loss", "seed"]
    assert dominated_by_eps.scores == importance(study(random.Random(3)), [LOSS_F, EPS_F]).scores
    dominated_by_loss = importance(study(random.Random(3), gain=lambda eps: 0.4, slope=-0.2), [LOSS_F, EPS_F])
    assert dominated_by_loss.scores[0][0] == "loss" and dominated_by_loss.scores[-1][0] == "seed"


def test_alpha_exists_only_for_gce_so_the_loss_is_one_factor_and_alpha_is_analysed_within_gce():
    params = [{"loss.name": "ce", "optim.lr": "0.001", "model.name": "lenet5"}]
    params += [{"loss.name": "gce", "loss.alpha": a, "optim.lr": lr, "model.name": m}
               for a in ("0.1", "0.3333333333333333") for lr, m in (("0.001", "lenet5"), ("0.01", "mlp"))]
    factors, levels = ablation.factors_of(params)
    by_key = {f.key: f for f in factors}
    assert by_key[LOSS].levels == ("CE", "GCE α=0.1", "GCE α=1/3") and by_key[LOSS].reference == "CE"
    alpha = by_key["loss.alpha"]
    assert alpha.label == "α" and alpha.note == "GCE runs only" and alpha.confounded == (LOSS,)
    assert "loss.alpha" not in levels[0] and levels[1]["loss.alpha"] == "0.1"
    merged = by_key["model.name+optim.lr"]  # they always change together: one factor, not two
    assert merged.label == "model, lr" and "always change together" in merged.note

    rng = random.Random(4)
    obs = []
    for s in range(4):
        for loss, alpha_level, gain in (("CE", None, 0.0), ("GCE α=0.1", "0.1", 0.05), ("GCE α=1/3", "1/3", 0.12)):
            for eps in RADII:
                lv = {LOSS: loss, EPS: eps, **({"loss.alpha": alpha_level} if alpha_level else {})}
                obs.append(Observation(lv, str(s), 0.9 - float(eps) + gain + rng.gauss(0, 0.005)))
    factors = [Factor(LOSS, "loss", ("CE", "GCE α=0.1", "GCE α=1/3"), "CE"),
               Factor("loss.alpha", "α", ("0.1", "1/3"), note="GCE runs only", confounded=(LOSS,)), EPS_F]
    effects = {e.factor.key: e for e in main_effects(obs, factors)}
    assert effects["loss.alpha"].levels["0.1"].n == 12  # GCE's runs only, not CE's
    assert effects["loss.alpha"].contrasts["1/3"].covers(0.07) and effects["loss.alpha"].contrasts["1/3"].n == 4
    assert effects[LOSS].contrasts["GCE α=1/3"].covers(0.12) and effects[LOSS].contrasts["GCE α=1/3"].basis == "seeds"
    assert importance(obs, factors).scores[0][0] == "ε"  # α is part of the loss factor there, not a column


def test_a_loss_option_is_part_of_the_loss_level_as_papers_name_it():
    # CE and COT log "loss.kwargs" = "{}" (no options); label smoothing logs its option, flattened.
    params = [{"loss.name": "ce", "loss.kwargs": "{}"}, {"loss.name": "cot", "loss.kwargs": "{}"},
              {"loss.name": "label_smoothing", "loss.kwargs.smoothing": "0.1"},
              {"loss.name": "label_smoothing", "loss.kwargs.smoothing": "0.3"},
              {"loss.name": "gce", "loss.alpha": "0.3333333333333333", "loss.kwargs": "{}"}]
    factors, levels = ablation.factors_of(params)
    assert [f.key for f in factors] == [LOSS]  # no separate "kwargs" factor
    assert factors[0].levels[0] == "CE" and set(factors[0].levels) == {"CE", "COT", "LS ε=0.1", "LS ε=0.3",
                                                                       "GCE α=1/3"}
    assert [lv[LOSS] for lv in levels] == ["CE", "COT", "LS ε=0.1", "LS ε=0.3", "GCE α=1/3"]


def test_one_seed_falls_back_to_cells_and_nothing_to_match_to_welch():
    one_seed = [o for o in study(random.Random(5)) if o.seed == "0"]
    gain = contrast(one_seed, [LOSS_F, EPS_F], LOSS_F, "GCE α=1/3", "CE")
    assert gain.basis == "cells" and gain.n == 3 and gain.covers(0.10)
    unmatched = [Observation({LOSS: o.levels[LOSS], EPS: o.levels[EPS]}, f"{o.levels[LOSS]}-{o.seed}", o.value)
                 for o in study(random.Random(5))]  # no seed is shared between the losses
    welch = contrast(unmatched, [LOSS_F, EPS_F], LOSS_F, "GCE α=1/3", "CE")
    assert welch.basis == "unmatched" and welch.covers(0.10)
    assert welch.high - welch.low > gain.high - gain.low  # the ε spread is not removed: a wider interval


def test_an_eps_one_loss_was_not_attacked_at_leaves_its_cells_empty_instead_of_failing():
    """An unbalanced grid (GCE's runs lack ε = 0.3): the contrast there has nothing to compare, so it is empty (n 0),
    and the rest of the analysis and its write-up stand. A NaN observation counts as missing, not as a value."""
    obs = [o for o in study(random.Random(8)) if not (o.levels[LOSS] != "CE" and o.levels[EPS] == "0.3")]
    obs.append(Observation({LOSS: "GCE α=1/3", EPS: "0.1"}, "0", float("nan")))
    it = interaction(obs, [LOSS_F, EPS_F], LOSS_F, EPS_F)
    missing = it.contrasts[("GCE α=1/3", "0.3")]
    assert missing.n == 0 and missing.basis == "unmatched" and it.cells[("GCE α=1/3", "0.3")].n == 0
    assert it.contrasts[("GCE α=1/3", "0.1")].covers(0.10) and it.contrasts[("GCE α=1/3", "0.1")].n == 5
    effects = {e.factor.key: e for e in main_effects(obs, [LOSS_F, EPS_F])}
    assert effects[LOSS].levels["GCE α=1/3"].n == 10 and effects[LOSS].contrasts["GCE α=1/3"].covers(0.10)
    data = ablation.Ablation("unbalanced", "robust accuracy", "val/robust_acc/worst_case", "test", [LOSS_F, EPS_F],
                             obs)
    sections, _ = ablation.ablation_sections(data)
    assert "Loss × ε interaction" in [sec.heading for sec in sections]


def test_an_alpha_logged_as_none_for_ce_is_no_level_of_alpha():
    """A tool that logs every param writes CE's α as "None": CE must not become a level of α (α would be the loss
    factor again, CE against GCE, labelled as α)."""
    params = [{"loss.name": "ce", "loss.alpha": "None"}, {"loss.name": "gce", "loss.alpha": "0.3333333333333333"}]
    factors, levels = ablation.factors_of(params)
    assert [f.key for f in factors] == [LOSS] and factors[0].levels == ("CE", "GCE α=1/3")
    assert levels == [{LOSS: "CE"}, {LOSS: "GCE α=1/3"}]


def test_sections_carry_their_plots_for_the_html_report():
    from types import SimpleNamespace

    from tracking.render import to_html

    obs = study(random.Random(6), seeds=3)
    data = ablation.Ablation("synthetic", "robust accuracy", "val/robust_acc/worst_case", "test", [LOSS_F, EPS_F], obs)
    sections, figures = ablation.ablation_sections(data)
    assert set(figures) == {"main_effects.png", "interaction.png", "parallel_coordinates.png"}
    assert all(png.startswith(b"\x89PNG") for png in figures.values())
    assert [name for sec in sections for name in sec.figures] == list(figures)  # each once, in its section
    assert [sec.heading for sec in sections] == ["Ablation: setup", "Main effects", "Effect sizes",
                                                 "Loss × ε interaction", "Factor importance (fANOVA)"]
    html = to_html(SimpleNamespace(title="synthetic", sections=sections))
    assert html.count("data:image/png;base64,") == 3 and "GCE α=1/3 − CE" in html


# --- end to end: a logged sweep, the CLI, the parent run's artifacts -------------------------------------------------
CE_AT = {0.1: 0.60, 0.2: 0.40, 0.3: 0.20}
NOISE = {("ce", 0): 0.004, ("ce", 1): -0.003, ("ce", 2): 0.001, ("gce", 0): 0.002, ("gce", 1): -0.001,
         ("gce", 2): 0.003}


@pytest.fixture(scope="module")
def logged(mlflow_server):
    """A sweep of CE vs GCE (α = 1/3) × 3 seeds; GCE is 10 points more robust at every ε on test."""
    experiment, sweep = f"ablate-{uuid.uuid4().hex[:6]}", f"sw-ablate-{uuid.uuid4().hex[:4]}"
    log = RunLogger(mlflow_server.url, experiment)
    parent = log.start_sweep(sweep, spec_name="fixture", spec_hash="h")
    log.log_spec(parent, {"name": "fixture", "experiment": experiment,
                          "objective": {"metric": "val/robust_acc/worst_case", "mode": "max"}})
    for (loss, seed), noise in NOISE.items():
        params = {"loss.name": loss, "train.seed": seed, "data.dataset": "mnist5k", "sweep.point": f"loss={loss}"}
        if loss == "gce":
            params["loss.alpha"] = 1 / 3
        run = log.start_trial(sweep, f"t-{loss}-{seed}", params, parent_run_id=parent)
        gain = 0.10 if loss == "gce" else 0.0
        metrics = {f"test/robust_acc/worst_case/eps_{eps}": acc + gain + noise + 0.01 * seed
                   for eps, acc in CE_AT.items()}
        metrics |= {"val/robust_acc/worst_case": CE_AT[0.1] + gain, "val/clean_acc": 0.95, "test/clean_acc": 0.95}
        log.log_metrics(run, metrics)
        log.end_run(run)
    log.end_run(parent)
    return mlflow_server.url, experiment, sweep, parent


def test_ablate_a_sweep_prints_the_effects_and_logs_the_plots_to_its_parent_run(logged, tmp_path):
    uri, _, _, parent = logged
    result = CliRunner().invoke(app, ["ablate", parent, "--out", str(tmp_path), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "test/robust_acc/worst_case at each ε (split: test)" in out and "Downloading" not in out
    # GCE − CE matched on ε and seed, over 3 seeds: mean of (0.002−0.004, −0.001+0.003, 0.003−0.001) + 10 points.
    assert "GCE α=1/3 − CE" in out and "+10.1 [" in out
    assert "0.1 − 0.3" in out and "+40.0 [" in out  # ε: 60 → 20 points
    assert "fANOVA" in out and "variance" in out
    lines = [line for line in out.splitlines() if line.startswith("│ ε ") or line.startswith("│ loss ")]
    assert lines and lines[0].startswith("│ ε")  # the largest effect first
    logged_files = {a.path for a in MlflowClient(uri).list_artifacts(parent, "ablation")}
    assert {"ablation/ablation.md", "ablation/main_effects.png", "ablation/interaction.png",
            "ablation/parallel_coordinates.png"} <= logged_files
    md = (tmp_path / "ablation.md").read_text()
    assert "| GCE α=1/3 − CE |" in md and "## Effect sizes" in md and "![main_effects.png](main_effects.png)" in md


def test_ablate_json_of_a_whole_experiment_by_sweep_id_and_by_name(logged, tmp_path):
    uri, experiment, sweep, parent = logged
    by_sweep = CliRunner().invoke(app, ["ablate", sweep, "--format", "json", "--out", str(tmp_path / "a"),
                                        "--tracking-uri", uri])
    assert by_sweep.exit_code == 0, by_sweep.output
    data = json.loads(by_sweep.stdout)
    assert data["parent_run_id"] == parent and data["objective"] == "val/robust_acc/worst_case"
    loss = next(e for e in data["main_effects"] if e["factor"] == "loss")
    assert loss["vs_reference"]["GCE α=1/3"]["mean"] == pytest.approx(0.10 + 0.002 / 3, abs=1e-9)
    dependence = data["interaction"]["dependence"]["GCE α=1/3"]  # the same gain at every ε
    assert dependence["mean"] == pytest.approx(0.0, abs=1e-9) and dependence["n"] == 3
    by_name = CliRunner().invoke(app, ["ablate", experiment, "--split", "test", "--out", str(tmp_path / "b"),
                                       "--tracking-uri", uri])
    assert by_name.exit_code == 0, by_name.output
    assert (tmp_path / "b" / "ablation.md").exists() and (tmp_path / "b" / "main_effects.png").exists()
    # Against another reference (a control, say): the same contrast, the other way round.
    against = CliRunner().invoke(app, ["ablate", sweep, "--format", "json", "--reference", "GCE α=1/3",
                                       "--out", str(tmp_path / "c"), "--tracking-uri", uri])
    assert against.exit_code == 0, against.output
    loss = next(e for e in json.loads(against.stdout)["main_effects"] if e["factor"] == "loss")
    assert loss["vs_reference"]["CE"]["mean"] == pytest.approx(-(0.10 + 0.002 / 3), abs=1e-9)
    unknown = CliRunner().invoke(app, ["ablate", sweep, "--reference", "LS", "--out", str(tmp_path / "d"),
                                       "--tracking-uri", uri])
    assert unknown.exit_code == 1 and "--reference 'LS' is not a loss of these runs; their losses: 'CE', " \
        "'GCE α=1/3'" in unknown.output


def test_ablate_errors_are_one_line_naming_what_is_missing(logged, tmp_path):
    uri, experiment, _, parent = logged
    runner = CliRunner()
    absent = runner.invoke(app, ["ablate", parent, "--metric", "val/robust_acc/nope/eps_0.1", "--out",
                                 str(tmp_path), "--tracking-uri", uri])
    assert absent.exit_code == 1 and "val/robust_acc/nope/eps_0.1" in absent.output
    assert "available: " in absent.output and "val/robust_acc/worst_case" in absent.output
    assert "Traceback" not in absent.output
    no_val = runner.invoke(app, ["ablate", parent, "--split", "val", "--out", str(tmp_path), "--tracking-uri", uri])
    assert no_val.exit_code == 1 and "val/robust_acc/worst_case" in no_val.output  # no per-ε val keys logged
    unknown = runner.invoke(app, ["ablate", "no-such-study", "--tracking-uri", uri])
    assert unknown.exit_code == 1 and "no experiment 'no-such-study'" in unknown.output
    empty = f"empty-{uuid.uuid4().hex[:6]}"
    RunLogger(uri, empty)
    none = runner.invoke(app, ["ablate", empty, "--tracking-uri", uri])
    assert none.exit_code == 1 and "no finished trial runs" in none.output
    single = f"single-{uuid.uuid4().hex[:6]}"
    log = RunLogger(uri, single)
    for seed in (0, 1):  # one configuration, one value: only the seed varies
        run = log.start_trial("sw-single", f"t{seed}", {"loss.name": "ce", "train.seed": seed})
        log.log_metrics(run, {"val/clean_acc": 0.9 + 0.01 * seed})
        log.end_run(run)
    alone = runner.invoke(app, ["ablate", single, "--metric", "val/clean_acc", "--tracking-uri", uri])
    assert alone.exit_code == 1 and "nothing but the seed varies" in alone.output
