"""The ``gce-sweep`` command line. Heavy imports (torch, ray, mlflow) happen inside commands, so --help is fast."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from sweeps.cli_tracking import register as register_tracking_commands

app = typer.Typer(
    help="gce-sweeps: adversarial-robustness sweeps (CE / COT / GCE) tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Train, attack and track robustness experiments."""


@app.command()
def train(
    dataset: Annotated[str, typer.Option(help="Dataset name (mnist5k, digits, mnist, fashion_mnist, cifar10, …).")]
    = "mnist5k",
    model: Annotated[str, typer.Option(help="Model name (lenet5, resnet20/32/56, preact_resnet18, …).")] = "lenet5",
    loss: Annotated[str, typer.Option(help="Training loss: ce, cot or gce.")] = "gce",
    alpha: Annotated[float | None, typer.Option(help="GCE guiding exponent α (default 1/3; gce only).")] = None,
    normalization: Annotated[str, typer.Option(help="GCE/COT normaliser: paper (log(K-1)) or code (log K).")]
    = "paper",
    epochs: Annotated[int, typer.Option(min=1)] = 2,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    optimizer: Annotated[str, typer.Option(help="sgd, adam or adamw.")] = "adam",
    lr: Annotated[float, typer.Option()] = 1e-3,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    data_root: Annotated[Path | None, typer.Option(help="Dataset folder (default $GCE_DATA_ROOT or ./data).")]
    = None,
    download: Annotated[bool, typer.Option(help="Download torchvision datasets if missing.")] = False,
    checkpoint: Annotated[Path | None, typer.Option(help="Write the final checkpoint here.")] = None,
    plugin: Annotated[list[str] | None, typer.Option(help="A plugin module (or module:object) to import first; "
                                                          "repeatable. Installed entry points load anyway.")] = None,
) -> None:
    """One training run without tracking: per-epoch metrics, then clean test accuracy."""
    from gce.config import ConfigError, TrainConfig
    from gce.plugins import PluginError, load_plugins

    if plugin and str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))  # as for a spec's plugins: a console script's path lacks the cwd
    try:
        load_plugins(plugin or [])
    except PluginError as err:
        raise typer.BadParameter(str(err), param_hint="--plugin") from err
    try:
        config = TrainConfig.from_dict({
            "data": {"dataset": dataset, "root": str(data_root) if data_root else None, "download": download},
            "model": {"name": model},
            "loss": {"name": loss, "alpha": alpha, "normalization": normalization},
            "optim": {"name": optimizer, "lr": lr},
            "epochs": epochs, "batch_size": batch_size, "seed": seed, "device": device,
        })
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from err
    _train(config, checkpoint)


def _train(config, checkpoint: Path | None) -> None:
    from rich.console import Console

    from gce.data import DeviceLoader
    from gce.train import fit

    console = Console(soft_wrap=True)

    def show(end) -> None:
        m = end.metrics
        console.print(f"epoch {end.epoch:3d}  train/loss {m['train/loss']:+.4f}  train/acc {m['train/acc']:.4f}  "
                      f"val/clean_acc {m['val/clean_acc']:.4f}  {m['train/images_per_s']:,.0f} img/s")

    result = fit(config, callbacks=[show])
    trainer = result.trainer
    test = DeviceLoader(result.data.test, config.data.eval_batch_size, device=trainer.device)
    metrics = trainer.evaluate(test, prefix="test")
    console.print(f"test/clean_acc {metrics['test/clean_acc']:.4f} on {len(result.data.test)} images "
                  f"({config.data.dataset}, {config.model.name}, loss {config.loss.name}, device {trainer.device})")
    if checkpoint is not None:
        console.print(f"checkpoint: {trainer.save_checkpoint(checkpoint)}")

register_tracking_commands(app)


SET_HELP = "Override a spec field: PATH=VALUE (YAML), e.g. --set base.epochs=5 --set seeds=[0,1]. Repeatable."


def _load(spec: str, smoke: bool, overrides: list[str] | None = None):
    from sweeps.loading import load_spec
    from sweeps.spec import SpecError

    try:
        loaded = load_spec(spec, overrides or [])
        return loaded.smoke() if smoke else loaded
    except SpecError as err:
        raise typer.BadParameter(str(err), param_hint="SPEC") from err


@app.command()
def validate(
    spec: Annotated[str, typer.Argument(help="A spec file, or the name of a shipped spec (see `gce-sweep specs`).")],
    smoke: Annotated[bool, typer.Option(help="Validate the --smoke version of the spec.")] = False,
    show: Annotated[int, typer.Option(help="How many trial configs to print.")] = 5,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
) -> None:
    """Dry run: check the spec, print the trial count and the first trial configs. Starts nothing."""
    from rich.console import Console

    loaded = _load(spec, smoke, set_)
    console = Console(soft_wrap=True)
    console.print(f"spec {loaded.name!r} is valid: experiment {loaded.experiment!r}, {loaded.trial_count()} trial(s)"
                  f"{loaded.stacks_text()}, search {loaded.search.algorithm}, scheduler {loaded.scheduler.name}, "
                  f"objective {', '.join(f'{o.metric} ({o.mode})' for o in loaded.objectives)}")
    if loaded.search.algorithm == "grid":
        trials = [(p, s) for p in loaded.grid_points() for s in loaded.seeds]
        for point, seed in trials[:show]:
            loaded.trial_config(point, seed)  # already validated: this is what the trial will run
            console.print(f"  {point | {'seed': seed}}")
        if len(trials) > show:
            console.print(f"  … and {len(trials) - show} more")
    else:
        console.print(f"  space: {', '.join(f'{k} ~ {d.kind}{d.values}' for k, d in loaded.space.items())}; "
                      f"seeds {loaded.seeds}")


@app.command()
def specs() -> None:
    """List the specs shipped with the package."""
    from sweeps.loading import load_spec, shipped_specs

    for name, path in sorted(shipped_specs().items()):
        spec = load_spec(path)
        typer.echo(f"{name:16s} {spec.trial_count():4d} trials  {spec.description}")


@app.command()
def run(
    spec: Annotated[str, typer.Argument(help="A spec file, or the name of a shipped spec (e.g. quickstart).")],
    smoke: Annotated[bool, typer.Option(help="Shrink the sweep to seconds: 1 epoch of a few batches, small eval.")]
    = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default $RAY_ADDRESS or local Ray).")]
    = None,
    storage: Annotated[Path | None, typer.Option(help="Ray Tune results folder (default .gce-sweeps/ray_results).")]
    = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
) -> None:
    """Run a sweep: trials scheduled by Ray Tune, each trained, attacked and logged to MLflow."""
    from rich.console import Console

    from sweeps.launcher import run_sweep

    loaded = _load(spec, smoke, set_)
    console = Console(soft_wrap=True)
    with _driver_errors("SPEC"):
        result = run_sweep(loaded, address=address, storage=storage, console=console)
    _finish(console, result)


@app.command()
def resume(
    sweep: Annotated[str, typer.Argument(help="The sweep id printed by `run` (or its results folder).")],
    storage: Annotated[Path | None, typer.Option(help="Ray Tune results folder (default .gce-sweeps/ray_results).")]
    = None,
) -> None:
    """Continue a sweep whose driver stopped: finished trials are kept, the rest continue from checkpoints."""
    from rich.console import Console

    from sweeps.launcher import resume_sweep

    console = Console(soft_wrap=True)
    with _driver_errors("SWEEP"):
        result = resume_sweep(sweep, storage=storage, console=console)
    _finish(console, result)


@app.command()
def evaluate(
    target: Annotated[str, typer.Argument(help="A sweep id, a sweep's parent run id, an experiment, or one trial's "
                                               "run id.")],
    attacks: Annotated[Path | None, typer.Option(help="A YAML file with an evaluation: block (attacks, max_examples, "
                                                      "standalone, primary_eps) as in a spec; a whole spec works.")]
    = None,
    autoattack: Annotated[str | None, typer.Option(help="Shorthand for one attack {name: autoattack, version: "
                                                        "VERSION}: standard or plus.")] = None,
    eps: Annotated[str | None, typer.Option(help="With --autoattack: the radii, e.g. 0.1,0.3.")] = None,
    norm: Annotated[str, typer.Option(help="With --autoattack: linf or l2.")] = "linf",
    surrogate: Annotated[str | None, typer.Option(help="Transfer: craft the attacks on this run's model (a run id), "
                                                       "or on the sweep's run with the target's params but KEY=VALUE "
                                                       "(e.g. loss.name=ce).")] = None,
    split: Annotated[str, typer.Option(help="val, test or both.")] = "both",
    max_examples: Annotated[int | None, typer.Option(min=1, help="Points per split (default: the trial's own "
                                                                 "subsample, or the file's max_examples).")] = None,
    name: Annotated[str | None, typer.Option(help="The evaluation's name: its worst case is logged as "
                                                  "worst_case_<name> (default reeval-<digest>, or autoattack).")]
    = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default $RAY_ADDRESS or local Ray).")]
    = None,
    cpus: Annotated[float, typer.Option(min=0.01, help="CPUs per run's Ray task.")] = 1,
    gpus: Annotated[float, typer.Option(min=0, help="GPUs per run's Ray task (a fraction packs several).")] = 0,
    ray: Annotated[bool, typer.Option("--ray/--no-ray", help="--no-ray: evaluate the runs one after another "
                                                             "in this process.")] = True,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                                     help="MLflow server; default: the embedded one.")] = None,
) -> None:
    """Evaluate finished trial runs again with a new attack list (or transfer attacks from a surrogate run), into
    the same runs; each run's checkpoint is rebuilt, nothing is retrained. Evaluating again adds nothing."""
    from rich.console import Console

    from sweeps.reevaluate import EvaluateError, evaluate_target, load_evaluation, outcome_table

    if split not in ("val", "test", "both"):
        raise typer.BadParameter(f"split must be val, test or both; got {split!r}", param_hint="--split")
    console = Console(soft_wrap=True)
    failure, interrupted, outcomes, ev = None, False, [], None
    with _driver_errors("TARGET"):
        try:
            ev = load_evaluation(attacks=attacks, autoattack=autoattack, eps=eps, norm=norm, name=name,
                                 splits=("val", "test") if split == "both" else (split,), surrogate=surrogate,
                                 max_examples=max_examples)
            from tracking.connection import resolve_tracking
            from tracking.queries import client_for

            uri = resolve_tracking(tracking_uri).uri

            def progress(out, i: int, n: int) -> None:
                console.print(f"[{i}/{n}] {out.trial_id} ({out.label}): {out.status}"
                              + (f": {out.reason}" if out.reason else ""))

            outcomes = evaluate_target(client_for(uri), uri, target, ev, address=address, use_ray=ray, cpus=cpus,
                                       gpus=gpus, progress=progress)
        except EvaluateError as err:
            failure = err
        except KeyboardInterrupt:
            interrupted = True
    if failure is not None:
        typer.echo(f"error: {failure}", err=True)
        raise typer.Exit(2)
    if interrupted:
        typer.echo("interrupted: the runs evaluated so far keep their metrics; the same command evaluates the rest",
                   err=True)
        raise typer.Exit(130)
    Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200).print(outcome_table(outcomes, ev))
    counts = {s: sum(o.status == s for o in outcomes) for s in ("evaluated", "skipped", "failed")}
    console.print(f"evaluation {ev.name!r}: {counts['evaluated']} run(s) evaluated, {counts['skipped']} skipped, "
                  f"{counts['failed']} failed; tag {ev.tag} on each evaluated run")
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        from sweeps.record import default_storage

        where = default_storage().parent / "last_error.txt"
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_text("\n".join(f"run {o.run_id} ({o.trial_id}):\n{o.detail}" for o in failed))
        console.print(f"[red]{len(failed)} run(s) failed[/] (tracebacks in {where})")
        raise typer.Exit(1)


@contextlib.contextmanager
def _driver_errors(param_hint: str) -> Iterator[None]:
    """What stops a driver, as one line: a spec or sweep that cannot run (exit 2), the tracking server gone
    (exit 1), an interrupt (exit 130; every run was closed as KILLED with how to resume), anything else (exit 1,
    its traceback saved to a file)."""
    from sweeps.spec import SpecError
    from tracking.connection import TrackingUnavailable

    try:
        yield
    except SpecError as err:
        raise typer.BadParameter(str(err), param_hint=param_hint) from err
    except TrackingUnavailable as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    except KeyboardInterrupt as err:
        typer.echo("interrupted: the sweep's runs are closed as KILLED; `gce-sweep resume <sweep id>` continues it",
                   err=True)
        raise typer.Exit(130) from err
    except Exception as err:  # not the user's doing: one line here, the traceback in a file for a bug report
        import traceback

        from sweeps.record import default_storage

        where = default_storage().parent / "last_error.txt"
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_text(traceback.format_exc())
        typer.echo(f"error: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''} "
                   f"(traceback in {where})", err=True)
        raise typer.Exit(1) from err


def _finish(console, result) -> None:
    console.print(f"sweep {result.sweep_id}: {result.trials} trial(s), {result.errors} failed; "
                  f"parent run {result.parent_run_id}")
    if result.unfinished:
        console.print(f"[yellow]{result.unfinished} trial(s) did not finish[/]: gce-sweep resume {result.sweep_id}")
    if result.best:
        console.print(f"best {result.best['metric']} = {result.best['value']:.4f}: {result.best['config']}")
    console.print(f"query: gce-sweep best {result.experiment!r}   ·   resume: gce-sweep resume {result.sweep_id}")
    if result.errors or result.unfinished:
        raise typer.Exit(1)

if __name__ == "__main__":
    app()

