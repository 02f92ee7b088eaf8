"""A stack of trials in one Ray trial (``resources.stack``): K members trained as one model by ``gce.stacked``,
each still its own MLflow run — its params, per-epoch metrics, checkpoint, evaluation and artifacts exactly as
an unstacked trial's, so `best`, `compare` and the UI cannot tell them apart.

Member ``i`` of Ray trial ``T`` is trial ``T.i`` (its run's ``gce.trial_id``); its run also carries
``gce.stack`` (T), ``gce.stack_member``, ``gce.stack_size`` and the stack's decision (``gce.stack_vectorized``,
``gce.stack_decision``: stacked vs one-after-another seconds per step, measured at the stack's start). One Tune
checkpoint per epoch holds every member's solo-format checkpoint and ledger (``<member trial id>/``), so a
retried or resumed stack continues each member from its own epoch, logging nothing twice.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from ray import tune

from sweeps.record import SweepRecord
from sweeps.trainable import (
    CHECKPOINT_FILE,
    LEDGER_FILE,
    _Clock,
    _dataset,
    _finish,
    _peak_memory,
    _prune_checkpoints,
    _restored,
    _start,
    _Trial,
)
from tracking.connection import TrackingUnavailable

__all__ = ["MEMBER_TAG", "STACK_TAG", "member_trial_id", "member_trial_ids", "train_stack"]

STACK_TAG, MEMBER_TAG, SIZE_TAG = "gce.stack", "gce.stack_member", "gce.stack_size"
VECTORIZED_TAG, DECISION_TAG = "gce.stack_vectorized", "gce.stack_decision"


def member_trial_id(stack_trial_id: str, index: int) -> str:
    return f"{stack_trial_id}.{index}"


def member_trial_ids(trial) -> list[str]:
    """The trial ids of a Ray trial's runs: its own, or one per member of a stack."""
    members = (trial.config or {}).get("members")
    return [member_trial_id(trial.trial_id, i) for i in range(len(members))] if members else [trial.trial_id]


def train_stack(config: dict[str, Any], record: SweepRecord) -> None:
    """The trainable of a stack: open every member's run, train the members stacked with a report and a
    checkpoint per epoch, evaluate each member, close its run; Tune's last result is the best member's."""
    clock = _Clock()
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    spec = record.sweep_spec
    stack_id = tune.get_context().get_trial_id()
    members = config["members"]
    trials = [_start(m, record, clock, trial_id=member_trial_id(stack_id, i)) for i, m in enumerate(members)]
    ended: set[int] = set()
    try:
        finals: dict[int, dict[str, float]] = {}
        for i, trial in enumerate(trials):
            if trial.final is not None:  # an earlier attempt evaluated and logged it
                if trial.reopened:
                    trial.logger.end_run(trial.run_id, "FINISHED")
                finals[i] = trial.final
                ended.add(i)
            else:
                trial.logger.set_tags(trial.run_id, {STACK_TAG: stack_id, MEMBER_TAG: i, SIZE_TAG: len(members)})
        pending = [i for i in range(len(trials)) if i not in ended]
        failed = 0
        if pending:
            lead = trials[pending[0]]  # the stack's system metrics (one device, one sampler) go to its first run
            if spec.system_metrics.enabled:
                lead.monitor = lead.logger.monitor_system(lead.run_id, spec.system_metrics.interval_s)
            results, train_s = _train_members([trials[i] for i in pending], record, stack_id)
            unavailable = None
            for i, result in reversed(list(zip(pending, results, strict=True))):  # the lead last: its sampler
                trial = trials[i]
                if result.error is not None:  # diverged: this member fails, the others were trained on
                    trial.stop_monitor()
                    trial.logger.log_text(trial.run_id, f"{type(result.error).__name__}: {result.error}\n",
                                          "error/traceback.txt")
                    trial.logger.end_run(trial.run_id, "FAILED", error=result.error)
                    failed += 1
                else:
                    try:  # one member's failed evaluation fails that member, not its stack-mates
                        finals[i] = {**result.trainer.evaluate(), **_finish(trial, result, train_s)}
                    except Exception as err:
                        trial.stop_monitor()
                        try:
                            trial.logger.log_text(trial.run_id, traceback.format_exc(), "error/traceback.txt")
                        finally:
                            trial.logger.end_run(trial.run_id, "FAILED", error=err)
                        failed += 1
                        if isinstance(err, TrackingUnavailable):  # the driver must learn of the outage
                            unavailable = err
                ended.add(i)
            if unavailable is not None:
                raise unavailable
        if not finals:
            raise RuntimeError(f"every member of stack {stack_id} failed")
        objective = spec.objectives[0]
        sign = 1.0 if objective.mode == "max" else -1.0

        def rank(i: int) -> float:  # a NaN objective (a diverged evaluation) never wins
            value = finals[i].get(objective.metric, float("nan"))
            return sign * value if value == value else float("-inf")

        best = max(finals, key=rank)
        tune.report({**finals[best], "epoch": max(t.config.epochs for t in trials), "stack/best_member": best,
                     "stack/size": len(members), "stack/failed": failed})
    except SystemExit:  # stopped by Tune (driver shutdown): the driver's callbacks close the runs
        for trial in trials:
            try:
                trial.logger.flush()
            except Exception as err:
                print(f"trial {trial.trial_id}: metrics not stored: {err}", file=sys.stderr)
        raise
    except BaseException as err:
        text = traceback.format_exc()
        for i, trial in enumerate(trials):
            if i not in ended:
                trial.stop_monitor()
                try:
                    trial.logger.log_text(trial.run_id, text, "error/traceback.txt")
                finally:
                    trial.logger.end_run(trial.run_id, "FAILED", error=err)
        raise
    finally:
        for trial in trials:
            trial.stop_monitor()


def _train_members(trials: list[_Trial], record: SweepRecord, stack_id: str):
    """``gce.stacked.fit_stacked`` from the members' checkpoints (if any): per epoch, each member's metrics to its
    run, then one Tune checkpoint holding every member's. Returns (results in ``trials`` order, seconds)."""
    from gce.stacked import fit_stacked
    from gce.train import resolve_device

    clock = trials[0].clock
    configs = [t.config for t in trials]
    with clock("data"):  # the validation split follows each member's seed, as in its solo run
        datas = [_dataset(c.data.dataset, c.data.root, c.data.download, c.data.val_size, c.seed, c.data.limit)
                 for c in configs]
    for trial, data in zip(trials, datas, strict=True):
        if trial.logged_epochs == 0:
            with clock("run_start"):
                trial.logger.log_datasets(trial.run_id, data)
    device = resolve_device(configs[0].device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ledgers: dict[str, dict[int, dict[str, float]]] = {t.trial_id: {} for t in trials}

    def report(ends) -> None:
        for end in ends:
            trial = trials[end.trainer.index]
            ledgers[trial.trial_id][end.epoch] = end.metrics
            # Each member's checkpoint as of *its* last epoch end, written now: a member that waits, stops or
            # later diverges keeps its last good state in every checkpoint after.
            folder = snapshots / trial.trial_id
            end.trainer.save_checkpoint(folder / CHECKPOINT_FILE)
            (folder / LEDGER_FILE).write_text(json.dumps(ledgers[trial.trial_id]))
            if end.epoch > trial.logged_epochs:
                with clock("log"):
                    trial.logger.log_metrics(trial.run_id, end.metrics, step=end.epoch)
        with clock("report"), tempfile.TemporaryDirectory() as ckpt_dir:
            shutil.copytree(snapshots, ckpt_dir, dirs_exist_ok=True)
            accs = [e.metrics.get("val/clean_acc", float("nan")) for e in ends]
            profile = clock.metrics(time.perf_counter() - started, 0.0) | _peak_memory(device)
            tune.report({"epoch": max(e.epoch for e in ends), "val/clean_acc": max(accs), **profile},
                        checkpoint=tune.Checkpoint.from_directory(ckpt_dir))
        _prune_checkpoints(record, stack_id)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as kept:
        snapshots = Path(kept)
        paths: list[Path | None] = [None] * len(trials)
        resume = tune.get_checkpoint()
        if resume is not None:
            root = Path(resume.to_directory(tmp))
            for j, trial in enumerate(trials):
                path = root / trial.trial_id / CHECKPOINT_FILE
                if path.exists():
                    paths[j] = path
                    _restored(trial, ledgers[trial.trial_id], path.parent / LEDGER_FILE)
                    shutil.copytree(path.parent, snapshots / trial.trial_id)  # until its next epoch end
        results = fit_stacked(configs, [report], data=datas, resume_from=paths, on_diverged="leave",
                              vectorize=record.sweep_spec.resources.vectorize)
    decision = results[0].decision
    for trial in trials:
        trial.logger.set_tags(trial.run_id, {VECTORIZED_TAG: str(decision.vectorize).lower(),
                                             DECISION_TAG: json.dumps(decision.to_dict())})
    return results, time.perf_counter() - started
