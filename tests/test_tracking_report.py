"""`gce-sweep report` on a fixture study with known numbers, against the real embedded MLflow server."""

from __future__ import annotations

import re
import uuid

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from sweeps.cli import app
from tracking.logger import RunLogger
from tracking.report import Section, build_report, make_report, to_html, to_markdown

ROBUST = {  # (loss, α, seed) -> metrics; COT has one seed, so its cells carry their count
    ("ce", None, 0): {"test/robust_acc/pgd/eps_0.1": 0.60, "test/robust_acc/worst_case/eps_0.1": 0.50,
                      "test/robust_acc/pgd-train/eps_0.1": 0.60, "test/robust_acc/fgsm-train/eps_0.3": 0.05},
    ("ce", None, 1): {"test/robust_acc/pgd/eps_0.1": 0.70, "test/robust_acc/worst_case/eps_0.1": 0.60,
                      "test/robust_acc/pgd-train/eps_0.1": 0.70},
    ("gce", 1 / 3, 0): {"test/robust_acc/pgd/eps_0.1": 0.80, "test/robust_acc/worst_case/eps_0.1": 0.75,
                        "test/robust_acc/pgd-train/eps_0.1": 0.90},
    ("gce", 1 / 3, 1): {"test/robust_acc/pgd/eps_0.1": 0.90, "test/robust_acc/worst_case/eps_0.1": 0.85,
                        "test/robust_acc/pgd-train/eps_0.1": 0.95},
    ("cot", None, 0): {"test/robust_acc/pgd/eps_0.1": 0.30, "test/robust_acc/worst_case/eps_0.1": 0.20},
}


@pytest.fixture(scope="module")
def study(mlflow_server):
    experiment = f"report-{uuid.uuid4().hex[:6]}"
    log = RunLogger(mlflow_server.url, experiment)
    parent = log.start_sweep("sw-report", spec_name="fixture", spec_hash="h")
    for (loss, alpha, seed), metrics in ROBUST.items():
        run = log.start_trial("sw-report", f"t-{loss}-{seed}", {"loss.name": loss, "loss.alpha": alpha,
                                                                "train.seed": seed, "data.dataset": "mnist5k"},
                              parent_run_id=parent)
        log.log_metrics(run, {**metrics, "val/clean_acc": 0.9, "test/clean_acc": 0.95,
                              "val/latent/silhouette": 0.5, "val/robust_acc/worst_case": metrics[
                                  "test/robust_acc/worst_case/eps_0.1"]})
        flag = "raised" if (loss, seed) == ("gce", 1) else "ok"
        log.set_tags(run, {"check/raised": "attack_loss_weaker_than_ce" if flag == "raised" else "none",
                           "check/attack_loss_weaker_than_ce": flag,
                           "check/attack_loss_weaker_than_ce/detail": "fgsm-train 0.470 > fgsm 0.080"})
        log.end_run(run)
    log.end_run(parent)
    return mlflow_server.url, experiment, parent


@pytest.fixture(scope="module")
def report(study):
    uri, experiment, _ = study
    return build_report(MlflowClient(uri), experiment)


def test_configurations_are_named_as_a_paper_names_them_baseline_first(report):
    # compare_runs ranks GCE first (best validation worst case); the report reads CE, COT, GCE by α.
    assert report.labels == ["CE", "COT", "GCE α=1/3"]
    assert [g.params["loss.name"] for g in report.groups] == ["ce", "cot", "gce"]
    assert "3 configurations (CE, COT, GCE α=1/3) × 1–2 seeds on MNIST-5k" in report.sections[0].prose[0]


def test_the_answer_comes_first_and_the_full_table_last(report):
    assert [s.heading for s in report.sections] == [
        "Setup", "GCE − CE: robust accuracy gained (test)", "Clean accuracy and latent clusters",
        "Gradient-masking diagnostics", "Robust accuracy, every attack (test)"]
    answer = report.sections[1]
    # One robustness chart per configuration (and one legend for them all), right with the answer.
    assert list(answer.figures) == ["robustness_ce.png", "robustness_cot.png", "robustness_gce_alpha_1_3.png",
                                    "robustness_legend.png"]
    assert all(png.startswith(b"\x89PNG") for png in answer.figures.values())
    assert "pareto_front.png" in report.sections[2].figures
    assert "worst_case_curves.png" in report.sections[-1].figures
    html = to_html(report)
    positions = [html.index(f"<h2>{s.heading}</h2>") for s in report.sections]
    assert positions == sorted(positions)


def test_gains_table_is_laid_out_like_the_papers_table_3(report):
    md = to_markdown(report)
    # GCE − CE, difference of the seed means ± its standard error, the paper's gap beside ours at each ε; the
    # ε = 0.3 columns that no attack of ours fills (only CE ran fgsm-train there) are left out, the paper's kept.
    assert ("| attack | ε = 0.1 standard | ε = 0.1 own loss | ε = 0.1 paper | ε = 0.3 paper |\n"
            "|:---|---:|---:|---:|---:|") in md
    assert "| PGD | +20.0 ± 7.1 | +27.5 ± 5.6 | +5.0 | +2.2 |" in md
    assert "| FGSM |  |  | +9.3 | +32.2 |" in md  # no gap of ours is invented where GCE has no number
    assert "| worst case | +25.0 ± 7.1 |  |  |  |" in md
    assert "GCE α=1/3 − CE is +27.5 points (the paper: +5.0)" in md
    assert "per-example worst case over every attack, +25.0 ± 7.1 at ε = 0.1" in md


def test_full_table_gives_the_paper_its_own_columns(report):
    md = to_markdown(report)
    assert "| attack | ε | CE | COT | GCE α=1/3 | paper CE | paper COT | paper GCE |" in md
    assert "| PGD | 0.1 | 65.0 ± 7.1 | 30.0 (1) | 85.0 ± 7.1 |  |  |  |" in md  # n shown only where it differs
    assert "| PGD (own loss) | 0.1 | 65.0 ± 7.1 | – | 92.5 ± 3.5 | 46.85 |  | 51.85 |" in md
    assert "| FGSM (own loss) | 0.3 | 5.0 (1) | – | – | 14.99 |  | 47.21 |" in md
    assert "| worst case | 0.1 | 55.0 ± 7.1 | 20.0 (1) | 80.0 ± 7.1 |  |  |  |" in md
    assert "·" not in md and "loss.name" not in md


def test_diagnostics_by_configuration(report):
    md = to_markdown(report)
    assert "| attack_loss_weaker_than_ce | ok 2/2 | ok 1/1 | **raised 1/2** |" in md
    assert "- GCE α=1/3, seed 1: `attack_loss_weaker_than_ce` — fgsm-train 0.470 > fgsm 0.080" in md


def test_html_keeps_numbers_on_one_line_and_sets_the_paper_apart(report):
    html = to_html(report)
    assert html.count("data:image/png;base64,") == len(report.figures) >= 6
    assert re.search(r"th,td\{[^}]*white-space:nowrap", html) and re.search(r"th,td\{[^}]*text-align:right", html)
    assert '<th class="ref sep">paper CE</th><th class="ref">paper COT</th><th class="ref">paper GCE</th>' in html
    assert '<th colspan="3" class="sep">ε = 0.1</th>' in html  # the gains table's ε header spans its columns
    assert "<strong>raised 1/2</strong>" in html and "<code>attack_loss_weaker_than_ce</code>" in html
    assert "**" not in html and "`" not in html


def test_extra_sections_go_right_after_the_answer_with_their_figures(study, report):
    uri, experiment, _ = study
    seen = []

    def ablation(partial):
        seen.append(list(partial.labels))
        return [Section("Ablation", ["α matters little."], figures={"ablation.png": b"\x89PNG fake"})]

    extended = build_report(MlflowClient(uri), experiment, extra=ablation)
    assert seen == [report.labels]  # the extension sees the configurations as the report names them
    assert [s.heading for s in extended.sections][1:3] == [report.sections[1].heading, "Ablation"]
    assert extended.figures["ablation.png"] == b"\x89PNG fake"
    assert "## Ablation\n\nα matters little.\n\n![ablation.png](ablation.png)" in to_markdown(extended)
    with pytest.raises(ValueError, match="pareto_front.png"):
        build_report(MlflowClient(uri), experiment, extra=[Section("Clash", figures={"pareto_front.png": b""})])


def test_report_command_on_a_parent_run_logs_the_report_to_it(study, tmp_path):
    uri, _, parent = study
    result = CliRunner().invoke(app, ["report", parent, "--out", str(tmp_path), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.md").exists() and (tmp_path / "report.html").exists()
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent, "report")}
    assert {"report/report.md", "report/report.html", "report/worst_case_curves.png",
            "report/robustness_gce_alpha_1_3.png"} <= logged
    md = (tmp_path / "report.md").read_text()  # the ablation's answer comes with the report, after the gains
    assert md.index("GCE − CE") < md.index("## Main effects") < md.index("## Clean accuracy")
    assert "## Factor importance (fANOVA)" in md
    assert "GCE runs only" not in md  # CE's α is logged as "None" here: no level of an α factor


def test_a_trial_run_id_stands_for_its_sweep_and_an_unknown_run_id_is_an_error(study, tmp_path):
    uri, experiment, parent = study
    client = MlflowClient(uri)
    trial = next(r.info.run_id for r in client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
                 if r.info.run_id != parent)
    paths, logged_to = make_report(client, trial, tmp_path / "by-trial")
    assert logged_to == parent and paths[0].exists()  # the sweep's report, on its parent run: never on a trial
    result = CliRunner().invoke(app, ["report", "0" * 32, "--out", str(tmp_path), "--tracking-uri", uri])
    assert result.exit_code == 1 and f"no run {'0' * 32}" in result.output and "Traceback" not in result.output


def test_report_on_an_unknown_experiment_is_a_clear_error(mlflow_server, tmp_path):
    result = CliRunner().invoke(app, ["report", "no-such-study", "--out", str(tmp_path),
                                      "--tracking-uri", mlflow_server.url])
    assert result.exit_code == 1 and "no experiment 'no-such-study'" in result.output


def test_a_section_that_varies_as_a_whole_gets_one_short_label():
    from tracking.queries import Group
    from tracking.report import _label

    adversarial = {"adversarial.name": "pgd", "adversarial.eps": "0.3", "adversarial.steps": "10",
                   "adversarial.restarts": "1", "loss.name": "gce", "loss.alpha": "0.3333333333333333"}
    varying = ["adversarial.eps", "adversarial.name", "adversarial.restarts", "adversarial.steps", "loss.alpha",
               "loss.name"]
    assert _label(Group(adversarial), varying) == "GCE α=1/3, adversarial=pgd ε=0.3 steps=10"
    assert _label(Group({"loss.name": "ce"}), varying) == "CE, adversarial=none"
    # Two keys of a section are not "the section as a whole": each is named.
    assert _label(Group({"optim.lr": "0.001", "optim.name": "adam"}), ["optim.lr", "optim.name"]) \
        == "lr=0.001, optimiser=Adam"


def test_the_papers_gce_is_alpha_one_third_and_alpha_zero_is_an_alpha_of_its_own():
    from tracking.queries import Group
    from tracking.report_sections import _paper_pair

    ce, zero = Group({"loss.name": "ce"}), Group({"loss.name": "gce", "loss.alpha": "0.0"})
    third, default = Group({"loss.name": "gce", "loss.alpha": "0.3333333333333333"}), Group({"loss.name": "gce"})
    pair = _paper_pair([ce, zero, third])
    assert pair[0] is ce and pair[1] is third
    assert _paper_pair([ce, zero, default])[1] is default  # no α logged: the 1/3 default


def _group(params: dict, metrics: list[dict]):
    from types import SimpleNamespace

    from tracking.queries import Group

    return Group(params, [SimpleNamespace(data=SimpleNamespace(metrics=m)) for m in metrics])


def test_the_alpha_chart_is_drawn_only_when_alpha_alone_tells_the_gce_configurations_apart():
    from tracking.report_figures import summary_figures

    keys = [("test/robust_acc/worst_case/eps_0.1", "worst_case", 0.1)]
    by_alpha = [_group({"loss.name": "gce", "loss.alpha": a}, [{keys[0][0]: 0.5}]) for a in ("0.1", "0.5")]
    assert set(summary_figures(by_alpha, ["a", "b"], keys)) == {"worst_case_curves.png", "alpha_curve.png"}
    with_lr = [_group({"loss.name": "gce", "loss.alpha": a, "optim.lr": lr}, [{keys[0][0]: 0.5}])
               for a in ("0.1", "0.5") for lr in ("0.01", "0.001")]  # a point per α would be one lr's, unsaid
    assert set(summary_figures(with_lr, ["a", "b", "c", "d"], keys)) == {"worst_case_curves.png"}


def test_a_run_with_a_nan_metric_is_no_point_of_the_pareto_front():
    from tracking.report_figures import pareto_figure

    run = {"val/clean_acc": 0.9, "val/robust_acc/worst_case": 0.4}
    assert pareto_figure([_group({}, [run, {**run, "val/robust_acc/worst_case": float("nan")}])], ["x"]) == {}
    assert set(pareto_figure([_group({}, [run, {**run, "val/clean_acc": 0.8}])], ["x"])) == {"pareto_front.png"}


def test_the_papers_numbers_stand_only_beside_standard_training():
    from tracking.report import paper_dataset

    standard = [_group({"data.dataset": "mnist5k", "loss.name": name}, []) for name in ("ce", "gce")]
    assert paper_dataset(standard) == "mnist5k"
    adversarial = [_group({"data.dataset": "mnist5k", "loss.name": name, "adversarial.name": "pgd"}, [])
                   for name in ("ce", "gce")]
    assert paper_dataset(adversarial) is None  # Tables 3/5 are for standard training: no paper column beside AT
    assert paper_dataset([standard[0], adversarial[1]]) is None
    assert paper_dataset([*standard, _group({"data.dataset": "cifar10", "loss.name": "ce"}, [])]) is None
