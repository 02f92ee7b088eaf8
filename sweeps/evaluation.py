"""A trial's final evaluation: robust accuracy on val (and test), masking diagnostics, clusters, artifacts.

Selection happens on validation metrics; the test split is evaluated the same way and reported beside them,
never used to choose. Every number goes to the trial's MLflow run in one batch, the plots as PNG artifacts.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gce.checks import CheckConfig, run_checks
from gce.data import DeviceLoader
from gce.evaluate import batches, evaluate_robustness, norm_of, predict
from gce.latent import confusion_matrix, latent_clusters

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
    attacks = [cfg for attack in ev.attacks for cfg in attack.configs()]
    run = dict(train_loss=trainer.loss_fn, standalone=ev.standalone, primary_eps=ev.primary_eps,
               batch_size=batch_size, max_examples=ev.max_examples, seed=trainer.config.seed)
    metrics: dict[str, float] = {}
    val = evaluate_robustness(model, data.val, attacks, **run)
    metrics.update(val.to_metrics("val"))
    # The per-epoch val/clean_acc covers the whole split; the attacked subsample's own clean accuracy (the
    # baseline of its robust numbers) gets its own key rather than a second, different point at the last step.
    metrics["val/eval_clean_acc"], metrics["val/eval_n"] = metrics.pop("val/clean_acc"), val.n
    if ev.test:
        test = evaluate_robustness(model, data.test, attacks, **run)
        metrics.update(test.to_metrics("test"))
        metrics["test/eval_n"] = test.n
    clusters = latent_clusters(model, data.val, max_examples=min(ev.max_examples, 1000), batch_size=batch_size)
    metrics.update(clusters.to_metrics("val"))
    tags: dict[str, str] = {}
    if ev.checks and attacks and val.primary is not None and val.primary[0] == "linf":
        diagnosis = run_checks(model, data.val, CheckConfig(max_examples=min(ev.max_examples, 500),
                                                            batch_size=batch_size, seed=trainer.config.seed),
                               result=val, train_loss=trainer.loss_fn)
        metrics.update(diagnosis.to_metrics())
        tags.update(diagnosis.to_tags())
    metrics["time/eval_s"] = time.perf_counter() - started
    if tags:
        logger.set_tags(run_id, tags)
    _artifacts(spec, trainer, logger, run_id, val, clusters)
    return metrics


def _artifacts(spec: SweepSpec, trainer: Trainer, logger: RunLogger, run_id: str, val, clusters) -> None:
    """Checkpoint, config and the plots the paper's argument needs (curves, confusion, embedding, examples)."""
    model, data = trainer.model, trainer.data
    logger.log_spec(run_id, trainer.config.to_dict(), "config.json")
    with tempfile.TemporaryDirectory() as tmp:
        logger.log_checkpoint(run_id, trainer.save_checkpoint(Path(tmp) / "final.pt"))
    if not spec.evaluation.plots:
        return
    for norm, curve in val.curves().items():
        series = {label: dict(zip(curve.eps, accs, strict=True)) for label, accs in curve.accuracy.items()}
        logger.log_robustness_curves(run_id, series, curve.clean_acc, name=f"robustness_curves_{norm}.png")
    matrix = confusion_matrix(model, DeviceLoader(data.val, spec.evaluation.resolved_batch_size(trainer.device),
                                               device=trainer.device))
    logger.log_confusion_matrix(run_id, matrix.numpy())
    logger.log_embedding(run_id, clusters.embedding.coords.numpy(), clusters.embedding.labels.numpy())
    if val.primary is not None:
        _adversarial_grid(trainer, logger, run_id, val)


def _adversarial_grid(trainer: Trainer, logger: RunLogger, run_id: str, val) -> None:
    """Eight validation images next to their adversarial versions under the primary ε's last attack."""
    from gce.attacks import build_attack

    norm, eps = val.primary
    configs = [c for c in val.attacks if c.eps == eps and norm_of(c) == norm]
    attack = build_attack(configs[-1], train_loss=trainer.loss_fn)
    x, y = next(batches(trainer.data.val, 8, device=trainer.device, max_examples=8))
    x_adv = attack(trainer.model, x, y)
    with torch.no_grad():
        clean_pred, adv_pred = predict(trainer.model, x), predict(trainer.model, x_adv)
    logger.log_adversarial_grid(run_id, x.cpu(), x_adv.cpu(), y.cpu(), clean_pred.cpu(), adv_pred.cpu())

