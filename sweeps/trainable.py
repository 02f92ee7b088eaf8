"""The Ray Tune function trainable: config -> gce.fit -> a report per epoch -> robust evaluation -> MLflow.

Thin on purpose (Ray's mnist_pytorch example): the science is gce.train.fit and gce.evaluate; this file only
reads the trial's assignment, loops, reports and tracks. Each trial logs to its own MLflow run, found again
by (sweep id, trial id), so a restored trial continues its run and its epoch count from the last checkpoint.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from ray import tune

from sweeps.evaluation import evaluate_trial
from sweeps.spec import SweepSpec

__all__ = ["SweepContext", "train_trial", "trial_assignment"]

CHECKPOINT_FILE = "trial.pt"


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares; passed once through Ray's object store (tune.with_parameters)."""

    spec: dict[str, Any]  # SweepSpec.model_dump(): plain data travels to workers, objects are rebuilt there
    sweep_id: str
    parent_run_id: str
    tracking_uri: str
    experiment: str

    def sweep_spec(self) -> SweepSpec:
        return SweepSpec.model_validate(self.spec)


def trial_assignment(config: dict[str, Any], spec: SweepSpec) -> tuple[dict[str, Any], int]:
    """(point, seed) of a trial: a grid trial carries them whole; an Optuna trial has one key per dimension."""
    if "point" in config:
        return dict(config["point"]), int(config["seed"])
    point = {k: config[k] for k in spec.space if k in config and config[k] is not None}
    return point, int(config.get("seed", spec.seeds[0]))


@lru_cache(maxsize=2)
def _dataset(name: str, root: str | None, download: bool, val_size: float, seed: int, limit: int | None):
    """Datasets are reused across trials of a reused actor (same split seed), not reloaded per trial."""
    from gce.data import load_dataset

    return load_dataset(name, root, download=download, val_size=val_size, seed=seed, limit=limit)


def train_trial(config: dict[str, Any], context: SweepContext) -> None:
    from gce.train import fit, resolve_device
    from tracking.logger import RunLogger

    # Where a trial's time goes, logged with its results: data, training, per-epoch tracking, Ray reporting
    # (checkpoint + tune.report), evaluation and artifacts (benchmarks.trial_profile reads it back).
    clock = _Clock()
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no "checkpoint created" line every epoch
    spec = context.sweep_spec()
    point, seed = trial_assignment(config, spec)
    train_config = spec.trial_config(point, seed)
    torch.set_num_threads(max(1, int(spec.resources.cpu)))  # a trial uses its CPU share, not the whole machine
    trial_id = tune.get_context().get_trial_id()
    # Unset options (α of a CE trial, no adversarial training) are left out, not logged as "None".
    params = {k: v for k, v in train_config.to_flat().items() if v is not None}
    params["sweep.point"] = _describe(point)
    with clock("run_start"):  # the trial's MLflow run: tracking cost too
        logger = RunLogger(context.tracking_uri, context.experiment)
        run_id = logger.start_trial(context.sweep_id, trial_id, params, parent_run_id=context.parent_run_id,
                                    run_name=f"{trial_id} {_describe(point)} seed={seed}")
        logger.clear_error(run_id)  # a retried trial (max_failures) must not keep its last attempt's error
    ended = False
    try:
        with clock("data"):
            d = train_config.data
            data = _dataset(d.dataset, d.root, d.download, d.val_size, seed, d.limit)
        resume = tune.get_checkpoint()
        if resolve_device(train_config.device).type == "cuda":  # a CPU trial must not create a CUDA context
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            resume_path = None
            if resume is not None:
                resume_path = Path(resume.to_directory(tmp)) / CHECKPOINT_FILE

            def report(end) -> None:
                with clock("log"):
                    logger.log_metrics(run_id, end.metrics, step=end.epoch)
                with clock("report"), tempfile.TemporaryDirectory() as ckpt_dir:
                    end.trainer.save_checkpoint(Path(ckpt_dir) / CHECKPOINT_FILE)
                    tune.report(end.metrics, checkpoint=tune.Checkpoint.from_directory(ckpt_dir))

            result = fit(train_config, callbacks=[report], data=data, resume_from=resume_path)
        train_s = time.perf_counter() - started
        final = evaluate_trial(spec, result.trainer, logger, run_id)
        final.update({"time/train_s": train_s, "epoch": result.trainer.epoch})
        final.update(clock.metrics(train_s, final["time/artifacts_s"]))
        final.update(_peak_memory(result.trainer.device))
        logger.log_metrics(run_id, final, step=result.trainer.epoch)
        logger.end_run(run_id, "FINISHED")
        ended = True
        # Tune's last result is what searchers and `best` read: give it the final clean metrics too.
        tune.report({**result.trainer.evaluate(), **final})
    except SystemExit:
        # Tune ends a trial's thread at a report when the scheduler stops it, and when the driver shuts down:
        # only the driver knows which, so its callbacks (and the launcher) close the run. Metrics still queued
        # (the server was away) are delivered first, or said to be lost.
        try:
            logger.flush()
        except Exception as err:  # the stop must go on: the loss is reported, not hidden
            print(f"trial {trial_id}: metrics not stored: {err}", file=sys.stderr)
        raise
    except BaseException as err:
        if not ended:
            try:
                logger.log_text(run_id, traceback.format_exc(), "error/traceback.txt")
            finally:
                logger.end_run(run_id, "FAILED", error=err)
        raise


class _Clock:
    """Seconds per named phase, accumulated over `with clock(name):` blocks."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self, fit_s: float, artifacts_s: float) -> dict[str, float]:
        """``time/*`` metrics: fit's wall time split into compute, tracking and reporting; shares of the trial
        (evaluation reports its own time/eval_s and time/artifacts_s)."""
        sec = self.seconds
        log, report = sec.get("log", 0.0), sec.get("report", 0.0)
        trial = time.perf_counter() - self.start
        return {"time/data_s": sec.get("data", 0.0), "time/fit_compute_s": max(fit_s - log - report, 0.0),
                "time/log_s": log, "time/run_start_s": sec.get("run_start", 0.0), "time/report_s": report,
                "time/trial_s": trial, "time/report_share": report / trial,
                "time/tracking_share": (sec.get("run_start", 0.0) + log + artifacts_s) / trial}


def _peak_memory(device: torch.device) -> dict[str, float]:
    """The worker's peak resident memory (whole process: the trials of a reused actor share it) and, on CUDA,
    this trial's peak allocated device memory."""
    from gce.memory import peak_rss_mb

    out = {"mem/peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        out["mem/cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _describe(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()) or "base"
