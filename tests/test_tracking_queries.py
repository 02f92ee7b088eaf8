"""``best`` and ``compare`` on a fixture experiment whose right answers are known."""

import csv
import io
import json
import math
import statistics
import uuid

import pytest
from typer.testing import CliRunner

from sweeps.cli import app
from tracking.logger import RunLogger
from tracking.queries import QueryError, best_runs, client_for, compare_runs, held_out_metric, resolve_target

runner = CliRunner()
VAL, TEST = "val/robust_acc/worst_case", "test/robust_acc/worst_case"
# (loss, seed, final val, test); gce seed 0 first logs 0.90 then 0.50: "best" uses the final value.
FINISHED = [("gce", 0, 0.50, 0.48), ("gce", 1, 0.56, 0.52), ("gce", 2, 0.53, 0.50),
            ("ce", 0, 0.40, 0.39), ("ce", 1, 0.44, 0.41), ("cot", 0, 0.61, 0.30)]


@pytest.fixture(scope="module")
def study(mlflow_server):
    name = f"queries-{uuid.uuid4().hex[:6]}"
    log = RunLogger(mlflow_server.url, name)
    parent = log.start_sweep("q", spec_name="fixture", spec_hash="0")
    ids = {}
    for i, (loss, seed, val, test) in enumerate(FINISHED):
        run = log.start_trial("q", f"t{i}", {"loss.name": loss, "model.name": "lenet5", "seed": seed},
                              parent_run_id=parent)
        if (loss, seed) == ("gce", 0):
            log.log_metrics(run, {VAL: 0.90}, step=0)
        log.log_metrics(run, {VAL: val, TEST: test, "val/robust_acc/pgd/eps=0.3": val / 2}, step=1)
        log.end_run(run)
        ids[(loss, seed)] = run
    unfinished = [("gce", 3, "RUNNING"), ("gce", 4, "FAILED"), ("cot", 5, None)]  # None: finished, no metric
    for j, (loss, seed, status) in enumerate(unfinished):
        run = log.start_trial("q", f"u{j}", {"loss.name": loss, "model.name": "lenet5", "seed": seed},
                              parent_run_id=parent)
        if status is not None:
            log.log_metrics(run, {VAL: 0.99, TEST: 0.99}, step=1)
        if status != "RUNNING":
            log.end_run(run, status or "FINISHED")
    log.end_run(parent)
    return name, ids, mlflow_server.url


def test_best_ranks_finished_trials_by_the_final_value(study):
    name, ids, uri = study
    client = client_for(uri)
    top = best_runs(client, name, VAL, "max", top=3)
    assert [r.info.run_id for r in top] == [ids["cot", 0], ids["gce", 1], ids["gce", 2]]
    gce = best_runs(client, name, VAL, top=5, filter_string="params.`loss.name` = 'gce'")
    assert [r.info.run_id for r in gce] == [ids["gce", 1], ids["gce", 2], ids["gce", 0]]
    assert [r.info.run_id for r in best_runs(client, name, VAL, "min", top=1)] == [ids["ce", 0]]
    by_eps = best_runs(client, name, "val/robust_acc/pgd/eps=0.3", top=1)  # '=' is stored as '_'
    assert by_eps[0].info.run_id == ids["cot", 0]
    assert held_out_metric(VAL) == TEST and held_out_metric("train/loss") is None


def test_compare_groups_seeds_by_configuration(study):
    name, ids, uri = study
    groups = compare_runs(client_for(uri), name, VAL)
    assert [g.params["loss.name"] for g in groups] == ["cot", "gce", "ce"]
    cot, gce, ce = groups
    assert "seed" not in gce.params and len(gce.runs) == 3
    assert gce.stat(VAL).mean == pytest.approx(statistics.fmean([0.50, 0.56, 0.53]))
    assert gce.stat(VAL).std == pytest.approx(statistics.stdev([0.50, 0.56, 0.53]))
    assert ce.stat(TEST).mean == pytest.approx(0.40) and ce.stat(TEST).n == 2
    assert len(cot.runs) == 2 and cot.stat(VAL).n == 1 and math.isnan(cot.stat(VAL).std)


def test_cli_prints_tables_json_and_csv(study):
    name, ids, uri = study
    out = runner.invoke(app, ["best", name, "--top", "2", "--format", "json", "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [r["run_id"] for r in rows] == [ids["cot", 0], ids["gce", 1]]
    assert rows[1][VAL] == 0.56 and rows[1][TEST] == 0.52 and rows[1]["params.loss.name"] == "gce"

    out = runner.invoke(app, ["compare", name, "--format", "csv", "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.output)))
    assert [r["params.loss.name"] for r in rows] == ["cot", "gce", "ce"]
    assert float(rows[1][f"{VAL} mean"]) == pytest.approx(0.53) and rows[1]["n"] == "3"

    out = runner.invoke(app, ["compare", name, "--tracking-uri", uri])
    assert out.exit_code == 0 and "0.5300 ± 0.0300" in out.output and "loss.name" in out.output
    out = runner.invoke(app, ["best", name, "--metric", TEST, "--tracking-uri", uri])
    assert out.exit_code == 0 and "selecting on test/" in out.output


def test_bad_queries_are_clear_errors(study):
    name, _, uri = study
    with pytest.raises(QueryError, match="known: .*" + name):
        best_runs(client_for(uri), "no-such-study")
    out = runner.invoke(app, ["best", name, "--filter", "params.loss = ", "--tracking-uri", uri])
    assert out.exit_code == 1 and "rejected the search" in out.output
    out = runner.invoke(app, ["best", name, "--mode", "biggest", "--tracking-uri", uri])
    assert out.exit_code == 2 and "max or min" in out.output


def test_a_report_or_ablation_target_resolves_to_its_experiment_sweep_and_parent_run(mlflow_server):
    """What ``report`` and ``ablate`` accept: an experiment, a sweep id, a sweep's parent run id, or a trial's run
    id (its sweep's: nothing is logged to a trial); anything else is a QueryError, not a traceback."""
    name, sweep = f"resolve-{uuid.uuid4().hex[:6]}", f"sw-{uuid.uuid4().hex[:6]}"
    log = RunLogger(mlflow_server.url, name)
    parent = log.start_sweep(sweep, spec_name="fixture", spec_hash="0")
    trial = log.start_trial(sweep, "t0", {"loss.name": "ce"}, parent_run_id=parent)
    client = client_for(mlflow_server.url)
    assert resolve_target(client, name) == (name, None, None)
    assert resolve_target(client, sweep) == resolve_target(client, parent) == (name, sweep, parent)
    assert resolve_target(client, trial) == (name, sweep, parent)
    with pytest.raises(QueryError, match="no run 0{32}"):
        resolve_target(client, "0" * 32)
    with pytest.raises(QueryError, match="no experiment 'no-such-study'.*nor is it a sweep id"):
        resolve_target(client, "no-such-study")
