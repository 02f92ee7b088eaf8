"""The ``gce-sweep`` command line. Heavy imports (torch, ray, mlflow) happen inside commands, so --help is fast."""

from __future__ import annotations

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
) -> None:
    """One training run without tracking: per-epoch metrics, then clean test accuracy."""
    from gce.config import ConfigError, TrainConfig

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

if __name__ == "__main__":
    app()
