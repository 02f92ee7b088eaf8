"""The Ray Tune function trainable: config -> gce.fit -> a report per epoch -> robust evaluation -> MLflow.

Thin on purpose (Ray's mnist_pytorch example): the science is gce.train.fit and gce.evaluate; this file only
reads the trial's assignment, loops, reports and tracks, in three named steps (start, train, finish). Each
trial logs to its own MLflow run, found again by (sweep id, trial id), so a restored trial continues its run
and its epoch count from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from ray import tune

from gce.metrics import CUDA_PEAK, PEAK_RSS, share_key, time_key
from sweeps.evaluation import evaluate_trial
from sweeps.record import SweepRecord
from sweeps.search import describe, trial_assignment

if TYPE_CHECKING:
    from tracking.logger import RunLogger

__all__ = ["train_trial"]

CHECKPOINT_FILE = "trial.pt"
NODE_TAG, NODE_IP_TAG = "gce.ray_node", "gce.ray_node_ip"  # the node this attempt of the trial runs on
ATTEMPT_TAG, NODES_TAG = "gce.attempt", "gce.ray_nodes"  # attempts so far; their nodes, oldest first
KEPT_EPOCH_TAG = "gce.kept_epoch"  # early stopping on val/adv_acc: the epoch whose weights were evaluated
LEDGER_FILE = "epochs.json"  # the metrics of every epoch the checkpoint covers


@lru_cache(maxsize=8)  # a stack's members may split by their own seeds
def _dataset(name: str, root: str | None, download: bool, val_size: float, seed: int, limit: int | None):
    """Datasets are reused across trials of a reused actor (same split seed), not reloaded per trial."""
    from gce.data import load_dataset

    return load_dataset(name, root, download=download, val_size=val_size, seed=seed, limit=limit)


@dataclass
class _Trial:
    """One trial's state while it runs: its config, its MLflow run and where its time went."""

    record: SweepRecord
    config: Any  # gce.config.TrainConfig
    trial_id: str
    logger: RunLogger
    run_id: str
    clock: _Clock
    logged_epochs: int = 0  # epochs whose metrics an earlier attempt of this trial already stored
    final: dict[str, float] | None = None  # the final metrics, when an earlier attempt stored them
    reopened: bool = True  # False: the run had finished already and is left as it is
    monitor: Any = None  # MLflow's system-metrics sampler while the trial trains and evaluates

    def stop_monitor(self) -> None:
        if self.monitor is not None:
            monitor, self.monitor = self.monitor, None
            with contextlib.suppress(Exception):  # system metrics are a view, never a reason to fail a trial
                monitor.finish()


def train_trial(config: dict[str, Any], record: SweepRecord) -> None:
    """Tune's function trainable: open (or reopen) the trial's run, train with a report and checkpoint per
    epoch, evaluate, log the final metrics and close the run."""
    if "members" in config:
        from sweeps.stacking import train_stack

        return train_stack(config, record)
    clock = _Clock()
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no "checkpoint created" line every epoch
    trial = _start(config, record, clock)
    ended = False
    try:
        if trial.final is None and record.sweep_spec.system_metrics.enabled:
            trial.monitor = trial.logger.monitor_system(trial.run_id, record.sweep_spec.system_metrics.interval_s)
        if trial.final is not None:  # an earlier attempt evaluated and logged it
            if trial.reopened:  # only the run's end was lost
                trial.logger.end_run(trial.run_id, "FINISHED")
            ended = True
            tune.report(trial.final)
            return
        result, train_s = _train(trial)
        final = _finish(trial, result, train_s)
        ended = True
        # Tune's last result is what searchers and `best` read: give it the final clean metrics too.
        tune.report({**result.trainer.evaluate(), **final, "epoch": result.trainer.epoch})
    except SystemExit:
        # Tune ends a trial's thread at a report when the scheduler stops it, and when the driver shuts down:
        # only the driver knows which, so its callbacks (and the launcher) close the run. Metrics still queued
        # (the server was away) are delivered first, or said to be lost.
        try:
            trial.logger.flush()
        except Exception as err:  # the stop must go on: the loss is reported, not hidden
            print(f"trial {trial.trial_id}: metrics not stored: {err}", file=sys.stderr)
        raise
    except BaseException as err:
        if not ended:
            trial.stop_monitor()
            try:
                trial.logger.log_text(trial.run_id, traceback.format_exc(), "error/traceback.txt")
            finally:
                trial.logger.end_run(trial.run_id, "FAILED", error=err)
        raise
    finally:
        trial.stop_monitor()


def _start(config: dict[str, Any], record: SweepRecord, clock: _Clock, trial_id: str | None = None) -> _Trial:
    """The trial's TrainConfig and its MLflow run, found by (sweep id, trial id): a restored or retried trial
    continues its own run. ``trial_id``: a stack member's own id (default: the Ray trial's)."""
    from sweeps.runtime import import_plugins
    from tracking.logger import RunLogger

    spec = record.sweep_spec
    import_plugins(record)  # the spec's plugins, in this worker, before their names are looked up
    point, seed = trial_assignment(config, spec)
    train_config = spec.trial_config(point, seed)
    torch.set_num_threads(max(1, int(spec.resources.cpu)))  # a trial uses its CPU share, not the whole machine
    trial_id = trial_id or tune.get_context().get_trial_id()
    # Unset options (α of a CE trial, no adversarial training) are left out, not logged as "None".
    params = {k: v for k, v in train_config.to_flat().items() if v is not None}
    params["sweep.point"] = describe(point)
    with clock("run_start"):  # the trial's MLflow run: tracking cost too
        logger = RunLogger(record.tracking_uri, record.experiment)
        found = logger.find_run(record.sweep_id, trial_id)
        if found is not None and found.info.status == "FINISHED" and time_key("trial") in found.data.metrics:
            # It finished before its driver died, before Tune's saved state could say so: kept, not reopened.
            return _Trial(record, train_config, trial_id, logger, found.info.run_id, clock,
                          final=dict(found.data.metrics), reopened=False)
        run_id = logger.start_trial(record.sweep_id, trial_id, params, parent_run_id=record.parent_run_id,
                                    run_name=f"{trial_id} {describe(point)} seed={seed}",
                                    description=f"Trial {trial_id} of sweep `{record.sweep_id}` ({spec.name}): "
                                                f"{describe(point, seed)}.")
        run = logger.run(run_id)  # one request: what an earlier attempt stored, and its error tag
        logger.clear_error(run_id, run)  # a retried trial (max_failures) must not keep its last attempt's error
        logger.set_tags(run_id, attempt_tags(run.data.tags))
        stored = dict(run.data.metrics)
    # Exactly once: an earlier attempt's epochs are in the run already. Its metrics went out in order, one
    # log_batch an epoch, so they are the epochs 1..latest "epoch"; the replay of those skips logging.
    final = stored if time_key("trial") in stored else None
    return _Trial(record, train_config, trial_id, logger, run_id, clock, int(stored.get("epoch", 0)), final)


def attempt_tags(tags: dict[str, str]) -> dict[str, str]:
    """Where this attempt of the trial runs: the Ray node (id and IP) and the attempt's number, with the nodes of
    every attempt so far in order — a trial retried after its node died shows both nodes in its run."""
    import ray

    context = ray.get_runtime_context()
    node = context.get_node_id()
    ip = ray.util.get_node_ip_address()
    attempt = int(tags.get(ATTEMPT_TAG, 0)) + 1
    nodes = [n for n in tags.get(NODES_TAG, "").split(",") if n] + [f"{node[:12]}@{ip}"]
    return {NODE_TAG: node, NODE_IP_TAG: ip, ATTEMPT_TAG: str(attempt), NODES_TAG: ",".join(nodes)[-5000:]}


def _train(trial: _Trial):
    """gce.train.fit from the trial's last checkpoint (if any): per epoch, its metrics to MLflow in one batch,
    then a checkpoint and the metrics to Tune. Returns (FitResult, seconds)."""
    from gce.train import fit, resolve_device

    cfg, clock, logger = trial.config, trial.clock, trial.logger
    with clock("data"):
        d = cfg.data
        data = _dataset(d.dataset, d.root, d.download, d.val_size, cfg.seed, d.limit)
    if trial.logged_epochs == 0:  # lineage once, with the run's first epoch (a restored trial logged it already)
        with clock("run_start"):  # tracking cost outside fit's wall time
            logger.log_datasets(trial.run_id, data)
    if resolve_device(cfg.device).type == "cuda":  # a CPU trial must not create a CUDA context
        torch.cuda.reset_peak_memory_stats()

    epochs: dict[int, dict[str, float]] = {}  # every epoch's metrics so far: the ledger each checkpoint carries

    def report(end) -> None:
        epochs[end.epoch] = end.metrics
        if end.epoch > trial.logged_epochs:  # a replayed epoch (restored from an older checkpoint) is not logged
            with clock("log"):
                logger.log_metrics(trial.run_id, end.metrics, step=end.epoch)
        with clock("report"), tempfile.TemporaryDirectory() as ckpt_dir:
            end.trainer.save_checkpoint(Path(ckpt_dir) / CHECKPOINT_FILE)
            (Path(ckpt_dir) / LEDGER_FILE).write_text(json.dumps(epochs))
            # The profile so far rides along to Tune (not to MLflow): a trial the scheduler stops ends inside this
            # call, and the driver's callback then logs the profile from the trial's last result.
            profile = clock.metrics(time.perf_counter() - started, 0.0) | _peak_memory(end.trainer.device)
            profile[time_key("train")] = time.perf_counter() - started
            tune.report({**end.metrics, **profile}, checkpoint=tune.Checkpoint.from_directory(ckpt_dir))
        _prune_checkpoints(trial.record, trial.trial_id)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        resume = tune.get_checkpoint()
        resume_path = Path(resume.to_directory(tmp)) / CHECKPOINT_FILE if resume is not None else None
        if resume_path is not None:
            _restored(trial, epochs, resume_path.parent / LEDGER_FILE)
        result = fit(cfg, callbacks=[report], data=data, resume_from=resume_path)
    return result, time.perf_counter() - started


def _restored(trial: _Trial, epochs: dict[int, dict[str, float]], ledger: Path) -> None:
    """A trial restored from a checkpoint: the epochs its checkpoint covers whose metrics never reached the
    server (still queued when the earlier attempt was killed, e.g. during an outage) are logged now, once; the
    run records where the trial continued from."""
    if ledger.exists():
        epochs.update({int(e): m for e, m in json.loads(ledger.read_text()).items()})
    for epoch in sorted(e for e in epochs if e > trial.logged_epochs):
        trial.logger.log_metrics(trial.run_id, epochs[epoch], step=epoch)
    trial.logged_epochs = max([trial.logged_epochs, *epochs])
    trial.logger.set_tags(trial.run_id, {"gce.restored_from_epoch": max(epochs, default=0)})


def _prune_checkpoints(record: SweepRecord, trial_id: str, keep: int = 2, min_age_s: float = 60.0) -> None:
    """Delete this trial's older checkpoints, keeping the newest ``keep`` and every one younger than
    ``min_age_s``: the experiment state on storage (a second or two behind) always names one of those, so a
    resume after a kill at any moment finds its checkpoint. Local storage only (a URI is left to its owner)."""
    now = time.time()
    for folder in record.folder.glob(f"*_{trial_id}_*"):
        for old in sorted(folder.glob("checkpoint_*"))[:-keep]:
            with contextlib.suppress(OSError):
                if now - old.stat().st_mtime > min_age_s:
                    shutil.rmtree(old)


def _finish(trial: _Trial, result, train_s: float) -> dict[str, float]:
    """The final evaluation and the trial's profile, logged in one batch; the run ends FINISHED."""
    trainer = result.trainer
    if result.kept_epoch is not None and trainer.config.adv_training.early_stop_patience is not None:
        # Early stopping on val/adv_acc: the evaluated (and logged) weights are this epoch's, not the last one's.
        trial.logger.set_tags(trial.run_id, {KEPT_EPOCH_TAG: result.kept_epoch})
    final = evaluate_trial(trial.record.sweep_spec, trainer, trial.logger, trial.run_id)
    final[time_key("train")] = train_s  # "epoch" is logged per epoch already: not again at the last step
    final.update(trial.clock.metrics(train_s, final[time_key("artifacts")]))
    final.update(_peak_memory(trainer.device))
    trial.stop_monitor()  # its last points go out before the run ends
    trial.logger.log_metrics(trial.run_id, final, step=trainer.epoch)
    trial.logger.end_run(trial.run_id, "FINISHED")
    return final


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
        """The profile's ``time/*`` metrics: fit's wall time split into compute, tracking and reporting; shares
        of the trial (evaluation reports its own eval and artifacts times)."""
        sec = self.seconds
        log, report, run_start = sec.get("log", 0.0), sec.get("report", 0.0), sec.get("run_start", 0.0)
        trial = time.perf_counter() - self.start
        return {time_key("data"): sec.get("data", 0.0), time_key("fit_compute"): max(fit_s - log - report, 0.0),
                time_key("log"): log, time_key("run_start"): run_start, time_key("report"): report,
                time_key("trial"): trial, share_key("report"): report / trial,
                share_key("tracking"): (run_start + log + artifacts_s) / trial}


def _peak_memory(device: torch.device) -> dict[str, float]:
    """The worker's peak resident memory (whole process: the trials of a reused actor share it) and, on CUDA,
    this trial's peak allocated device memory."""
    from gce.memory import peak_rss_mb

    out = {PEAK_RSS: peak_rss_mb()}
    if device.type == "cuda":
        out[CUDA_PEAK] = torch.cuda.max_memory_allocated(device) / 2**20
    return out

