"""A trial's final evaluation: robust accuracy on val (and test), masking diagnostics, clusters, artifacts.

Selection happens on validation metrics; the test split is evaluated the same way and reported beside them,
never used to choose. Every number goes to the trial's MLflow run in one batch, the plots as PNG artifacts.
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gce.checks import CheckConfig, run_checks
from gce.data import DeviceLoader
from gce.evaluate import batches, evaluate_robustness, norm_of, predict
from gce.latent import confusion_matrix, latent_clusters
from gce.metrics import EVAL_CLEAN, clean_key, eval_n_key, time_key
from gce.seeding import seeded

if TYPE_CHECKING:
    from gce.train import Trainer
    from sweeps.spec import SweepSpec
    from tracking.logger import RunLogger

__all__ = ["evaluate_trial"]


def evaluate_trial(spec: SweepSpec, trainer: Trainer, logger: RunLogger, run_id: str) -> dict[str, float]:
    started = time.perf_counter()
    ev = spec.evaluation
    model, data = trainer.model, trainer.data
    batch_size = ev.resolved_batch_size(trainer.device)
    attacks = ev.attack_configs()
    run = dict(train_loss=trainer.loss_fn, standalone=ev.standalone, primary_eps=ev.primary_eps, fast=ev.fast,
               batch_size=batch_size, max_examples=ev.max_examples, seed=trainer.config.seed)
    metrics: dict[str, float] = {}
    val = evaluate_robustness(model, data.val, attacks, **run)
    metrics.update(val.to_metrics("val"))
    # The per-epoch val/clean_acc covers the whole split; the attacked subsample's own clean accuracy (the
    # baseline of its robust numbers) gets its own key rather than a second, different point at the last step.
    metrics[EVAL_CLEAN], metrics[eval_n_key("val")] = metrics.pop(clean_key("val")), val.n
    clusters = latent_clusters(model, data.val, max_examples=min(ev.max_examples, 1000), batch_size=batch_size)
    metrics.update(clusters.to_metrics("val"))
    # Artifacts need only the validation results: they render and upload in a thread while the test split and
    # the diagnostics are attacked (torch releases the GIL; matplotlib and HTTP need little else).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gce-artifacts") as pool:
        prep = time.perf_counter()
        inputs = _artifact_inputs(spec, trainer, val, clusters, batch_size)
        artifacts_s = time.perf_counter() - prep
        uploads = pool.submit(_log_artifacts, logger, run_id, inputs)
        if ev.test:
            test = evaluate_robustness(model, data.test, attacks, **run)
            metrics.update(test.to_metrics("test"))
            metrics[eval_n_key("test")] = test.n
        tags: dict[str, str] = {}
        if ev.checks and attacks and val.primary is not None and val.primary[0] == "linf":
            diagnosis = run_checks(model, data.val, CheckConfig(max_examples=min(ev.max_examples, 500),
                                                                batch_size=batch_size, seed=trainer.config.seed),
                                   result=val, train_loss=trainer.loss_fn)
            metrics.update(diagnosis.to_metrics())
            tags.update(diagnosis.to_tags())
        wait = time.perf_counter()
        uploads.result()  # an upload's error fails the trial like any other
        # What the trial spent on artifacts: preparing them and waiting for the thread (its rendering, when it
        # contends with the attacks for the GIL or the cores, shows up in time/eval_s instead).
        metrics[time_key("artifacts")] = artifacts_s + time.perf_counter() - wait
        metrics[time_key("eval")] = time.perf_counter() - started - metrics[time_key("artifacts")]
    if tags:
        logger.set_tags(run_id, tags)
    return metrics


@dataclass
class _ArtifactInputs:
    """Everything the artifacts need, computed on the trial's thread (which owns the model)."""

    config: dict
    checkpoint_dir: tempfile.TemporaryDirectory
    checkpoint: Path
    curves: list = field(default_factory=list)  # (norm, series, clean accuracy)
    confusion: Any = None
    embedding: tuple | None = None
    grid: tuple | None = None  # (x, x_adv, y, clean predictions, adversarial predictions), on the CPU


def _artifact_inputs(spec: SweepSpec, trainer: Trainer, val, clusters, batch_size: int) -> _ArtifactInputs:
    """Checkpoint, config and what the plots the paper's argument needs (curves, confusion, embedding,
    examples) are drawn from."""
    folder = tempfile.TemporaryDirectory()
    try:
        inputs = _ArtifactInputs(trainer.config.to_dict(), folder,
                                 trainer.save_checkpoint(Path(folder.name) / "final.pt"))
        if spec.evaluation.plots:
            _plot_inputs(inputs, trainer, val, clusters, batch_size)
    except BaseException:
        folder.cleanup()
        raise
    return inputs


def _plot_inputs(inputs: _ArtifactInputs, trainer: Trainer, val, clusters, batch_size: int) -> None:
    for norm, curve in val.curves().items():
        series = {label: dict(zip(curve.eps, accs, strict=True)) for label, accs in curve.accuracy.items()}
        inputs.curves.append((norm, series, curve.clean_acc))
    inputs.confusion = confusion_matrix(trainer.model, DeviceLoader(trainer.data.val, batch_size,
                                                                    device=trainer.device)).numpy()
    inputs.embedding = (clusters.embedding.coords.numpy(), clusters.embedding.labels.numpy())
    if val.primary is not None:
        inputs.grid = _adversarial_grid(trainer, val)


def _log_artifacts(logger: RunLogger, run_id: str, inputs: _ArtifactInputs) -> None:
    with inputs.checkpoint_dir:
        logger.log_spec(run_id, inputs.config, "config.json")
        logger.log_checkpoint(run_id, inputs.checkpoint)
    for norm, series, clean_acc in inputs.curves:
        logger.log_robustness_curves(run_id, series, clean_acc, name=f"robustness_curves_{norm}.png")
    if inputs.confusion is not None:
        logger.log_confusion_matrix(run_id, inputs.confusion)
    if inputs.embedding is not None:
        logger.log_embedding(run_id, *inputs.embedding)
    if inputs.grid is not None:
        logger.log_adversarial_grid(run_id, *inputs.grid)


def _adversarial_grid(trainer: Trainer, val) -> tuple:
    """Eight validation images and their adversarial versions under the primary ε's last attack."""
    from gce.attacks import build_attack

    norm, eps = val.primary
    configs = [c for c in val.attacks if c.eps == eps and norm_of(c) == norm]
    attack = build_attack(configs[-1], train_loss=trainer.loss_fn)
    x, y = next(batches(trainer.data.val, 8, device=trainer.device, max_examples=8))
    with seeded(trainer.config.seed, trainer.device):  # a random start must not shift the evaluations' randomness
        x_adv = attack(trainer.model, x, y)
    with torch.no_grad():
        clean_pred, adv_pred = predict(trainer.model, x), predict(trainer.model, x_adv)
    return x.cpu(), x_adv.cpu(), y.cpu(), clean_pred.cpu(), adv_pred.cpu()
