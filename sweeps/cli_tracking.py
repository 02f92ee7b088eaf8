"""``gce-sweep ui | server | best | compare | report | ablate``: the tracking server and queries on it.

Lives in sweeps/ because the CLI does, but imports only tracking/ (and that lazily, inside the commands), so
``gce-sweep --help`` stays fast and these commands never start Ray.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

DirOption = Annotated[Path | None, typer.Option("--dir", help="Embedded server folder "
                                                "(default $GCE_TRACKING_DIR or ./.gce-sweeps/mlflow).")]
UriOption = Annotated[str | None, typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", show_envvar=True,
                                               help="MLflow server; default: the embedded one (started if needed).")]
MetricOption = Annotated[str, typer.Option(help="Rank by the final value of this (validation) metric.")]
ModeOption = Annotated[str, typer.Option(help="max or min.")]
FilterOption = Annotated[str, typer.Option("--filter",
                                           help="MLflow search filter, e.g. \"params.`loss.name` = 'gce'\".")]
FormatOption = Annotated[str, typer.Option("--format", help="table, json or csv.")]

server_app = typer.Typer(help="The embedded MLflow server (SQLite + artifacts in a local folder).",
                         no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the tracking commands to the ``gce-sweep`` app."""
    app.command()(ui)
    app.command()(best)
    app.command()(compare)
    app.command()(report)
    app.command()(ablate)
    app.add_typer(server_app, name="server")


def ui(directory: DirOption = None, port: Annotated[int, typer.Option(help="Preferred port.")] = 5000) -> None:
    """Print the MLflow UI's URL: $MLFLOW_TRACKING_URI if set, else the embedded server (started if needed)."""
    from tracking.connection import resolve_tracking

    with _errors():
        resolved = resolve_tracking(root=directory, port=port)
    info = resolved.server
    if info is None:
        typer.echo(f"MLflow UI: {resolved.uri} (from MLFLOW_TRACKING_URI)")
        return
    state = "running" if info.reused else "started"
    typer.echo(f"MLflow UI: {info.url} ({state}, pid {info.pid}, data in {info.root})")
    typer.echo(f"export MLFLOW_TRACKING_URI={info.url}   # to log or query from other shells")


@server_app.command("start")
def server_start(directory: DirOption = None, port: Annotated[int, typer.Option()] = 5000) -> None:
    """Start the embedded server (or find the one running for this folder)."""
    ui(directory, port)


@server_app.command("stop")
def server_stop(directory: DirOption = None) -> None:
    """Stop the embedded server of this folder; its data stays."""
    from tracking.server import stop_server

    typer.echo("stopped" if stop_server(directory) else "no embedded server is running for this folder")


@server_app.command("status")
def server_status(directory: DirOption = None) -> None:
    """Say whether the embedded server of this folder runs (exit code 1 if not)."""
    from tracking.server import running_server

    info = running_server(directory)
    typer.echo(f"running: {info.url} (pid {info.pid}, data in {info.root})" if info else "not running")
    raise typer.Exit(0 if info else 1)


def best(experiment: Annotated[str, typer.Argument(help="Experiment (study) name.")],
         metric: MetricOption = "val/robust_acc/worst_case", mode: ModeOption = "max",
         top: Annotated[int, typer.Option(min=1)] = 10, filter_string: FilterOption = "",
         fmt: FormatOption = "table", tracking_uri: UriOption = None) -> None:
    """The best finished trials by the final value of a validation metric, with its test twin beside it."""
    from tracking.queries import best_runs, held_out_metric
    from tracking.tables import best_records, render

    _check(metric, mode, fmt)
    with _errors():
        runs = best_runs(_client(tracking_uri), experiment, metric, mode, top, filter_string)
    title = f"{experiment}: top {len(runs)} by {metric} ({mode})" + (
        f", {held_out_metric(metric)} beside" if held_out_metric(metric) else "")
    _show(render(best_records(runs, metric), fmt, title))


def compare(experiment: Annotated[str, typer.Argument(help="Experiment (study) name.")],
            metric: MetricOption = "val/robust_acc/worst_case", mode: ModeOption = "max",
            filter_string: FilterOption = "",
            ignore_param: Annotated[list[str] | None, typer.Option(help="Also average over this param.")] = None,
            fmt: FormatOption = "table", tracking_uri: UriOption = None) -> None:
    """One row per configuration (all params but the seed): mean ± std over seeds and n, best first."""
    from tracking.queries import compare_runs, data_mismatch
    from tracking.tables import compare_records, render

    _check(metric, mode, fmt)
    with _errors():
        groups = compare_runs(_client(tracking_uri), experiment, metric, mode, filter_string, ignore_param or ())
    warning = data_mismatch(groups)
    if warning:
        typer.echo(warning, err=True)
    _show(render(compare_records(groups, metric), fmt, f"{experiment}: {len(groups)} configurations by {metric}"))


def report(target: Annotated[str, typer.Argument(help="Experiment name, or a sweep's parent run id.")],
           out: Annotated[Path | None, typer.Option(help="Folder for report.md, report.html and the plots.")] = None,
           split: Annotated[str, typer.Option(help="Split of the robust-accuracy table: test or val.")] = "test",
           tracking_uri: UriOption = None) -> None:
    """Markdown and HTML report of a study or one sweep, written like a results section: the GCE − CE gains
    (with the paper's), robustness-vs-ε charts, the ablation's answer (main effects, loss × ε, importance), clean
    accuracy and latent clusters, masking diagnostics, and the full attack × ε table last. A sweep's report is
    also logged to its parent run."""
    from tracking.report import make_report

    if split not in ("test", "val"):
        raise typer.BadParameter(f"split must be 'test' or 'val'; got {split!r}", param_hint="--split")
    with _errors():
        client = _client(tracking_uri)
        try:
            paths, parent = make_report(client, target, out, split=split)
        except ValueError as err:  # an experiment without finished trials
            raise typer.BadParameter(str(err), param_hint="TARGET") from err
    typer.echo(f"report: {paths[0]} and {paths[1]}" + (f" (also logged to run {parent})" if parent else ""))


def ablate(target: Annotated[str, typer.Argument(help="Experiment name, a sweep id, or a sweep's parent run id.")],
           metric: Annotated[str | None, typer.Option(help="Metric to explain (default: the sweep's objective); the "
                                                      "headline worst case opens into its per-ε keys.")] = None,
           split: Annotated[str, typer.Option(help="Split of the per-ε robust accuracies: test or val.")] = "test",
           out: Annotated[Path | None, typer.Option(help="Folder for ablation.md and the plots (default "
                                                    "reports/<sweep id or experiment>/ablation).")] = None,
           fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
           reference: Annotated[str | None, typer.Option(help="The loss the others are compared with, as the "
                                                         "tables name it (default CE), e.g. 'LS ε=0.1'.")] = None,
           tracking_uri: UriOption = None) -> None:
    """Which factor moved the objective, by how much, with what uncertainty: main effects (mean, 95% CI, matched
    effect sizes), the loss × ε interaction and an importance ranking. A sweep's plots go to its run."""
    from tracking.ablation import ablation_json, make_ablation

    if split not in ("test", "val"):
        raise typer.BadParameter(f"split must be 'test' or 'val'; got {split!r}", param_hint="--split")
    if fmt not in ("table", "json"):
        raise typer.BadParameter(f"--format must be table or json, got {fmt!r}")
    with _errors():
        ablation, analysis, sections, paths = make_ablation(_client(tracking_uri), target, metric=metric,
                                                            split=split, out=out, reference=reference)
    where = f"ablation: {paths[0]}" + (f" (also logged to run {ablation.parent_run_id} under ablation/)"
                                       if ablation.parent_run_id else "")
    if fmt == "json":
        import json

        typer.echo(json.dumps(ablation_json(ablation, analysis), indent=2))
        typer.echo(where, err=True)
        return
    _show_sections(ablation.title, sections)
    typer.echo(where)


def _show_sections(title: str, sections) -> None:
    """Report sections for a terminal: the heading, the prose, the table as a rich table, the notes."""
    import sys

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    console.print(Text(title, style="bold"))
    for section in sections:
        console.print()
        console.print(Text(section.heading, style="bold"))
        for text in section.prose:
            console.print(Text(text))
        if section.table is not None:
            table = Table()
            for i, name in enumerate(section.table.header):
                table.add_column(Text(name), justify="left" if i == 0 else "right")
            for row in section.table.rows:
                table.add_row(*(Text(cell) for cell in row))
            console.print(table)
        for text in [*section.notes, *section.items]:
            console.print(Text(text))


def _client(tracking_uri: str | None):
    from tracking.connection import resolve_tracking
    from tracking.queries import client_for

    return client_for(resolve_tracking(tracking_uri).uri)


def _check(metric: str, mode: str, fmt: str) -> None:
    from tracking.tables import FORMATS

    if mode not in ("max", "min"):
        raise typer.BadParameter(f"--mode must be max or min, got {mode!r}")
    if fmt not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if metric.startswith("test/"):
        typer.echo(f"warning: selecting on {metric} uses the test set to choose; select on val/ metrics", err=True)


def _show(result) -> None:
    if isinstance(result, str):
        typer.echo(result, nl=not result.endswith("\n"))
        return
    import sys

    from rich.console import Console

    # Piped output (a file, a pager, a test) gets the whole table rather than columns cut to 80 characters.
    Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200).print(result)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Tracking failures (unreachable server, unknown experiment, bad filter) as one line and exit code 1."""
    from tracking.connection import TrackingUnavailable
    from tracking.queries import QueryError

    try:
        yield
    except (TrackingUnavailable, QueryError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
