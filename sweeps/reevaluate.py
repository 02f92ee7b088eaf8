"""``gce-sweep evaluate``: finished trial runs evaluated again, with another attack list, into the same runs.

A stronger attack should not mean retraining: every trial logs its final checkpoint (``checkpoints/final.pt``),
which is downloaded, rebuilt (``gce.train.load_checkpoint``) and attacked on the data its config names, with the
run's seed, so the points are the trial's own (same split, and by default the same subsample: ``<split>/eval_n``).

- Keys: the attack keys of the metric schema (``<split>/robust_acc/<label>/eps_<ε>``); the headline keys stay the
  trial's own (``<split>/clean_acc``, ``<split>/robust_acc/worst_case[*]``): the evaluation's worst case per threat
  model goes under ``worst_case_<name>`` and its time under ``time/reeval_<name>_s``. A key the run already holds
  is never written again (the run is skipped, saying which key): a re-evaluation adds, it never overwrites.
- Transfer (``--surrogate``): the attacks run on a surrogate's model and are scored on the run's model
  (``gce.transfer``), labels ``transfer-<attack label>``; the surrogate is a run id or ``key=value``: the sweep's
  finished trial with the run's params except ``key`` (and the params only one of them has under the key's group,
  e.g. ``loss.alpha`` for ``loss.name``).
- Idempotent: the tag ``gce.evaluation.<name>`` holds what was evaluated (attacks, subsample, surrogate, splits);
  the same evaluation again adds nothing, one that names another evaluation's name is refused for that run.
- Metrics go to the run at its last step in ``log_batch`` calls (``RunLogger``); the run stays FINISHED.
- One Ray task per run (``sweeps.runtime.init_ray``: a local Ray, or ``--address``); in-process for one run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from gce.metrics import SPLITS, clean_key, eval_n_key, format_eps, parse_robust, robust_key, time_key, worst_case_key
from sweeps.spec import EvaluationSpec, SpecError
from tracking.logger import ROLE_TAG, SWEEP_TAG, TRIAL_TAG

__all__ = ["CHECKPOINT", "EVALUATION_TAG", "EvaluateError", "Evaluation", "Outcome", "autoattack_block",
           "evaluate_target", "load_evaluation", "outcome_table", "own_metrics", "worst_label"]

CHECKPOINT = "checkpoints/final.pt"  # sweeps.evaluation logs it there (RunLogger.log_checkpoint)
EVALUATION_TAG = "gce.evaluation."  # + name: JSON of what the evaluation of that name ran on this run
SURROGATE_SUFFIX = ".surrogate"  # gce.evaluation.<name>.surrogate: the run whose model crafted the examples
ALREADY = "already evaluated"
_NOT_RESULTS = {"batch_size", "test", "checks", "plots"}  # EvaluationSpec fields that change no number
_PROGRESS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_RUN_ID = re.compile(r"[0-9a-f]{32}")


class EvaluateError(SpecError):
    """A target, attack list, name or surrogate selector that cannot be evaluated: the CLI prints it as one line."""


# --- what to evaluate -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    """One evaluation of a target: the attack list (an ``evaluation:`` block), its name and the surrogate."""

    name: str
    spec: EvaluationSpec
    splits: tuple[str, ...] = SPLITS
    surrogate: str | None = None  # the selector: a run id or key=value
    max_examples: int | None = None  # None: each run's own eval_n (the trial's subsample)
    plugins: tuple[str, ...] = ()

    def configs(self) -> list:
        return self.spec.attack_configs()

    def identity(self, surrogate_run: str | None) -> dict[str, Any]:
        """What makes two evaluations of one run the same (the splits aside): every field of the evaluation that
        can change a number (the attacks, AutoAttack, the chain and early-stop modes, the primary ε...), the
        subsample and the surrogate."""
        fields = self.spec.model_dump(mode="json", exclude=_NOT_RESULTS | {"max_examples"})
        return {**fields, "max_examples": self.max_examples, "surrogate": surrogate_run}

    @property
    def tag(self) -> str:
        return EVALUATION_TAG + self.name

    def primary(self) -> tuple[str, float]:
        from gce.evaluate import _group, _primary

        return _primary(_group(self.configs()), self.spec.primary_eps, None)

    def expected_keys(self, split: str) -> list[str]:
        """The keys this evaluation logs on ``split`` (``own_metrics`` of its result), the time key aside."""
        return [key for key, _, _ in self.planned(split)]

    def planned(self, split: str) -> list[tuple[str, str | None, float]]:
        """(key, norm, ε) of every key this evaluation logs on ``split``: the attacks' as the metric schema predicts
        them (a chain's members too, norm None), then the worst cases."""
        from gce.evaluate import norm_of
        from gce.metrics import expected
        from gce.transfer import transfer_label

        configs, keys, worst = self.configs(), [], {}
        by_key = {}
        for cfg in configs:
            label = transfer_label(cfg) if self.surrogate else cfg.label()
            chain = not self.spec.standalone and not self.surrogate  # transfer: always standalone
            by_key[robust_key(split, label, cfg.eps, chain=chain)] = (norm_of(cfg), cfg.eps)
            worst.setdefault((norm_of(cfg), cfg.eps), None)
        keys = [(k, *tm) for k, tm in by_key.items()]
        if not self.surrogate:  # what else the schema says these attacks report (AutoAttack's members)
            predicted = expected(configs, test=split == "test", standalone=self.spec.standalone, checks=False).exact
            for key in sorted(predicted):
                parsed = parse_robust(key)
                if parsed and parsed.split == split and not parsed.worst_case and key not in by_key:
                    keys.append((key, None, parsed.eps))
        return keys + [(robust_key(split, worst_label(self.name, n, e), e), n, e) for n, e in worst]

    @property
    def time_key(self) -> str:
        return time_key(f"reeval_{self.name}")


def autoattack_block(version: str, eps: Iterable[float], norm: str = "linf") -> dict[str, Any]:
    """``--autoattack standard --eps 0.1,0.3 --norm linf``: one attack like any other, named autoattack."""
    return {"attacks": [{"name": "autoattack", "version": version, "eps": list(eps), "norm": norm}]}


def load_evaluation(*, attacks: str | Path | None = None, autoattack: str | None = None, eps: str | None = None,
                    norm: str = "linf", name: str | None = None, splits: Iterable[str] = SPLITS,
                    surrogate: str | None = None, max_examples: int | None = None) -> Evaluation:
    """The evaluation the CLI's options describe, validated like a spec's ``evaluation:`` (every bad field named
    by its YAML path); EvaluateError otherwise."""
    if (attacks is None) == (autoattack is None):
        raise EvaluateError("give the attacks: --attacks FILE.yaml (an evaluation: block) or --autoattack VERSION "
                            "--eps E1,E2 (not both)")
    plugins: list[str] = []
    if autoattack is not None:
        if not eps:
            raise EvaluateError("--autoattack needs --eps, e.g. --eps 0.1,0.3")
        try:
            radii = [float(e) for e in eps.split(",") if e.strip()]
        except ValueError:
            raise EvaluateError(f"--eps {eps!r}: expected numbers separated by commas, e.g. 0.1,0.3") from None
        block, where = autoattack_block(autoattack, radii, norm), "--autoattack"
    else:
        if eps is not None:
            raise EvaluateError("--eps and --norm go with --autoattack; in --attacks FILE each attack has its eps")
        block, plugins, where = _read_block(Path(attacks))
    if max_examples is not None:
        block = {**block, "max_examples": max_examples}
    spec = _validated(block, plugins, where)
    if not spec.attack_configs():
        raise EvaluateError(f"{where}: no attacks (evaluation.attacks or evaluation.autoattack): nothing to evaluate")
    explicit = spec.max_examples if "max_examples" in spec.model_fields_set else None
    evaluation = Evaluation("-", spec, tuple(splits), surrogate, explicit, tuple(plugins))
    digest = hashlib.sha256(json.dumps(evaluation.identity(surrogate), sort_keys=True).encode()).hexdigest()[:6]
    if name is None:
        name = ("autoattack" if autoattack is not None else f"reeval-{digest}") if not surrogate else \
            ("transfer-autoattack" if autoattack is not None else f"transfer-{digest}")
    if not _NAME.fullmatch(name):
        raise EvaluateError(f"--name {name!r}: letters, digits, _ . - only (at most 64): it becomes part of metric "
                            "keys and a tag")
    splits = tuple(splits)
    if not splits or any(s not in SPLITS for s in splits):
        raise EvaluateError(f"--split: val, test or both; got {splits}")
    return replace(evaluation, name=name)


def _read_block(path: Path) -> tuple[dict, list[str], str]:
    """(the file's evaluation: block, its plugins, its name for messages). A whole spec file works too."""
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise EvaluateError(f"--attacks {where}: cannot read it ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise EvaluateError(f"{where}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("evaluation"), dict):
        raise EvaluateError(f"{where}: expected a mapping with an evaluation: block (attacks: [...], max_examples, …), "
                            "as in a spec")
    plugins = raw.get("plugins") or []
    if not isinstance(plugins, list):
        raise EvaluateError(f"{where}: plugins: must be a list of modules")
    return raw["evaluation"], [str(p) for p in plugins], where


def _validated(block: dict, plugins: list[str], where: str) -> EvaluationSpec:
    """The block checked as a spec's evaluation is (schema, then every attack built): one SpecError per problem,
    each with its YAML path."""
    from sweeps.loading import load_spec

    raw = {"name": "evaluate", "experiment": "evaluate", "evaluation": block, "plugins": plugins,
           "objective": {"metric": "val/clean_acc", "mode": "max"}}
    try:
        return load_spec(raw).evaluation
    except SpecError as err:
        raise EvaluateError(str(err).replace("<mapping>: invalid spec", f"{where}: invalid evaluation", 1)) from None


# --- the keys ---------------------------------------------------------------------------------------------------
def worst_label(name: str, norm: str, eps: float) -> str:
    """The label of an evaluation's own worst case at (norm, ε): ``worst_case_<name>`` (``-l2`` etc. as the
    schema's worst case has it)."""
    own = parse_robust(worst_case_key("val", norm, eps))
    return f"worst_case_{name}" + own.label.removeprefix("worst_case")


def own_metrics(result, split: str, name: str) -> dict[str, float]:
    """``result.to_metrics(split)`` without the keys the trial's own evaluation owns (clean accuracy, the worst
    case, headline and per ε), plus the evaluation's worst case per threat model under ``worst_case_<name>``."""
    out = {}
    for key, value in result.to_metrics(split).items():
        parsed = parse_robust(key)
        if key in (clean_key(split), worst_case_key(split)) or (parsed is not None and parsed.worst_case):
            continue
        out[key] = value
    for (norm, eps), acc in result.worst_case.items():
        out[robust_key(split, worst_label(name, norm, eps), eps)] = acc
    return out


# --- one run ----------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One run to evaluate: plain data, it travels to a Ray worker."""

    run_id: str
    experiment: str
    tracking_uri: str
    evaluation: Evaluation
    splits: tuple[str, ...]  # the ones not evaluated yet
    done: tuple[str, ...]  # evaluated by an earlier call of the same evaluation
    done_n: dict[str, int]  # ... on how many points
    step: int
    max_examples: dict[str, int]
    surrogate_run: str | None = None


@dataclass
class Outcome:
    run_id: str
    trial_id: str
    label: str
    status: str  # evaluated | skipped | failed
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    surrogate_run: str | None = None
    detail: str = ""  # a failure's traceback


@lru_cache(maxsize=2)
def _dataset(name: str, root: str | None, download: bool, val_size: float, seed: int, limit: int | None):
    from gce.data import load_dataset

    return load_dataset(name, root, download=download, val_size=val_size, seed=seed, limit=limit)


def evaluate_run(job: Job, threads: int | None = None) -> dict[str, float]:
    """Evaluate one run (a Ray task's body, or in-process) and log into it; returns what was logged."""
    import torch

    from gce.evaluate import evaluate_robustness
    from gce.train import load_checkpoint, objective, resolve_device
    from gce.transfer import evaluate_transfer
    from tracking.logger import RunLogger

    if threads:
        torch.set_num_threads(threads)
    _plugins_loaded(job.evaluation.plugins)
    started = time.perf_counter()
    ev = job.evaluation
    logger = RunLogger(job.tracking_uri, job.experiment)
    device = resolve_device("auto")
    with tempfile.TemporaryDirectory() as tmp:
        model, config = load_checkpoint(_download(logger, job.run_id, tmp), device)
        surrogate = surrogate_config = None
        if job.surrogate_run:
            surrogate, surrogate_config = load_checkpoint(_download(logger, job.surrogate_run, Path(tmp) / "s"), device)
            if surrogate_config.data.dataset != config.data.dataset:
                raise ValueError(f"surrogate {job.surrogate_run} was trained on {surrogate_config.data.dataset}, "
                                 f"this run on {config.data.dataset}")
    d = config.data
    data = _dataset(d.dataset, d.root, d.download, d.val_size, config.seed, d.limit)
    batch_size = ev.spec.resolved_batch_size(device)
    metrics: dict[str, float] = {}
    sizes = dict(job.done_n)
    for split in job.splits:
        points = data.val if split == "val" else data.test
        common = dict(batch_size=batch_size, max_examples=job.max_examples[split], seed=config.seed,
                      primary_eps=ev.spec.primary_eps, fast=ev.spec.fast)
        if surrogate is not None:
            result = evaluate_transfer(model, surrogate, points, ev.configs(),
                                       surrogate_loss=objective(surrogate_config), **common)
        else:
            result = evaluate_robustness(model, points, ev.configs(), train_loss=objective(config),
                                         standalone=ev.spec.standalone, **common)
        metrics.update(own_metrics(result, split, ev.name))
        sizes[split] = result.n
    unplanned = set(metrics) - {k for s in job.splits for k in ev.expected_keys(s)}
    if unplanned:  # only planned keys were checked against the run's own: nothing else may be written
        raise RuntimeError(f"the evaluation produced keys it did not plan: {sorted(unplanned)}")
    metrics[ev.time_key] = time.perf_counter() - started
    record = {**ev.identity(job.surrogate_run), "splits": sorted({*job.done, *job.splits}),
              "seed": config.seed, "n": sizes}
    tags = {ev.tag: json.dumps(record, sort_keys=True)}
    if job.surrogate_run:
        tags[ev.tag + SURROGATE_SUFFIX] = job.surrogate_run
    logger.log_metrics(job.run_id, metrics, step=job.step)  # metrics first: the tag says they are stored
    logger.set_tags(job.run_id, tags)
    logger.flush()
    return metrics


def _plugins_loaded(plugins: Iterable[str]) -> None:
    if plugins:
        from gce.plugins import load_plugins

        load_plugins(list(plugins))


def _download(logger, run_id: str, folder) -> str:
    """The run's checkpoint, without MLflow's progress bar (all an in-process evaluation's stderr would say)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    quiet = os.environ.get(_PROGRESS)
    os.environ[_PROGRESS] = "false"
    try:
        return logger.delivery.call(logger.client.download_artifacts, run_id, CHECKPOINT, str(folder))
    finally:
        if quiet is None:
            os.environ.pop(_PROGRESS, None)
        else:
            os.environ[_PROGRESS] = quiet


def _attempt(job: Job, threads: int | None = None) -> tuple[str, dict[str, float] | str, str]:
    """(status, metrics or the error's line, traceback): a worker never raises what is one run's problem."""
    try:
        return "evaluated", evaluate_run(job, threads), ""
    except Exception as err:
        text = str(err).strip().splitlines()
        return "failed", f"{type(err).__name__}: {text[0] if text else ''}", traceback.format_exc()


# --- the target -------------------------------------------------------------------------------------------------
def evaluate_target(client, tracking_uri: str, target: str, evaluation: Evaluation, *, address: str | None = None,
                    use_ray: bool = True, cpus: float = 1, gpus: float = 0,
                    progress: Callable[[Outcome, int, int], None] | None = None) -> list[Outcome]:
    """Evaluate every finished trial run of ``target`` (a sweep id, parent run id, experiment or one trial's run
    id) that has a checkpoint; the others are outcomes with status ``skipped`` and the reason."""
    experiment, runs = _target_runs(client, target)
    if not runs:
        raise EvaluateError(f"{target}: no trial runs to evaluate")
    labels = _labels(runs)
    outcomes: dict[str, Outcome] = {}
    jobs: list[Job] = []
    selector = _Selector(client, evaluation.surrogate) if evaluation.surrogate else None
    for run in runs:
        out = Outcome(run.info.run_id, run.data.tags.get(TRIAL_TAG, "-"), labels[run.info.run_id], "skipped")
        outcomes[run.info.run_id] = out
        out.reason = _ineligible(client, run)
        if out.reason:
            continue
        surrogate_run = None
        if selector is not None:
            surrogate_run, out.reason = selector.resolve(run)
            out.surrogate_run = surrogate_run
            if out.reason:
                continue
        job, out.reason = _plan(run, experiment, tracking_uri, evaluation, surrogate_run)
        if job is not None or out.reason == ALREADY:  # what an earlier call stored, for the table
            out.metrics = {k: v for s in evaluation.splits for k in evaluation.expected_keys(s)
                           if (v := run.data.metrics.get(k)) is not None}
        if job is not None:
            jobs.append(job)
    if selector is not None:
        selector.check_resolved()
    attempts = _execute(jobs, address=address, use_ray=use_ray, cpus=cpus, gpus=gpus, tracking_uri=tracking_uri,
                        experiment=experiment, plugins=evaluation.plugins)
    for i, (job, (status, result, detail)) in enumerate(attempts, 1):
        out = outcomes[job.run_id]
        out.status = status
        if status == "evaluated":
            out.metrics.update(result)
        else:
            out.reason, out.detail = result, detail
        if progress is not None:
            progress(out, i, len(jobs))
    return list(outcomes.values())


def _target_runs(client, target: str) -> tuple[str, list]:
    """(experiment name, the trial runs of ``target``, every status), resolved as best/report/ablate do."""
    from tracking.queries import QueryError, resolve_target

    try:
        experiment, sweep_id, _ = resolve_target(client, target)
    except QueryError as err:
        raise EvaluateError(str(err)) from None
    if _RUN_ID.fullmatch(target):
        run = client.get_run(target)
        if run.data.tags.get(ROLE_TAG) != "sweep":  # one run: a trial (or anything else, skipped with why)
            return experiment, [run]
    where = [f"tags.`{ROLE_TAG}` = 'trial'"] + ([f"tags.`{SWEEP_TAG}` = '{sweep_id}'"] if sweep_id else [])
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    return experiment, _search(client, exp_id, " AND ".join(where))


def _search(client, exp_id: str, where: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], where, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _labels(runs: list) -> dict[str, str]:
    """Each run's configuration as tables name it (``GCE α=1/3``), by the params that vary across the runs."""
    from tracking.labels import config_label, loss_label
    from tracking.queries import SEED_PARAM, varying_params

    params = {r.info.run_id: {k: v for k, v in r.data.params.items() if not SEED_PARAM.search(k)} for r in runs}
    varying = varying_params(params.values())
    return {rid: config_label(p, varying) if varying else loss_label(p) for rid, p in params.items()}


def _ineligible(client, run) -> str:
    """Why ``run`` cannot be evaluated ("" when it can): not a trial, not FINISHED, no checkpoint."""
    if run.data.tags.get(ROLE_TAG) != "trial":
        return "not a trial run (tag gce.role = trial)"
    if run.info.status != "FINISHED":
        return f"status {run.info.status}: only FINISHED runs are evaluated"
    if not _has_checkpoint(client, run.info.run_id):
        return f"no checkpoint artifact ({CHECKPOINT})"
    return ""


def _has_checkpoint(client, run_id: str) -> bool:
    return any(a.path == CHECKPOINT for a in client.list_artifacts(run_id, "checkpoints"))


def _plan(run, experiment: str, tracking_uri: str, ev: Evaluation, surrogate_run: str | None):
    """(Job, "") for what is left to evaluate on ``run``, or (None, why not)."""
    done: tuple[str, ...] = ()
    done_n: dict[str, int] = {}
    stored = run.data.tags.get(ev.tag)
    if stored is not None:
        try:
            record = json.loads(stored)
        except ValueError:
            record = {}
        identity = {k: record.get(k) for k in ev.identity(surrogate_run)}
        if identity != ev.identity(surrogate_run):
            return None, (f"the name {ev.name!r} holds another evaluation of this run (tag {ev.tag}); choose "
                          "another --name")
        done = tuple(record.get("splits", ()))
        done_n = {k: v for k, v in (record.get("n") or {}).items() if k in done}
    todo = tuple(s for s in ev.splits if s not in done)
    if not todo:
        return None, ALREADY
    clash = [k for s in todo for k in ev.expected_keys(s) if k in run.data.metrics]
    clash += [ev.time_key] if ev.time_key in run.data.metrics and not done else []
    if clash:
        named = all(k == ev.time_key or parse_robust(k).label.startswith("worst_case_") for k in clash)
        hint = "choose another --name" if named else \
            "give the attack another label (its loss or norm; budgets are not part of a label)"
        more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
        return None, f"the run already has {clash[0]}{more}: a re-evaluation never overwrites a metric; {hint}"
    sizes = {}
    for split in todo:
        own = run.data.metrics.get(eval_n_key(split))
        sizes[split] = ev.max_examples or (int(own) if own is not None and math.isfinite(own) and own >= 1
                                           else ev.spec.max_examples)
    step = int(run.data.metrics.get("epoch", 0))  # the trial logged its final metrics at its last epoch
    return Job(run.info.run_id, experiment, tracking_uri, ev, todo, done, done_n, step, sizes, surrogate_run), ""


class _Selector:
    """``--surrogate``: a run id, or key=value (the sibling trial with the run's params but ``key``)."""

    def __init__(self, client, text: str):
        self.client, self.text = client, text
        self.key = self.value = None
        self.resolved = 0
        self.unmatched: list[str] = []
        self._siblings: dict[str, list] = {}
        if _RUN_ID.fullmatch(text):
            try:
                run = client.get_run(text)
            except Exception as err:
                raise EvaluateError(f"--surrogate {text}: no such run on the tracking server") from err
            why = _ineligible(client, run)
            if why:
                raise EvaluateError(f"--surrogate {text}: cannot be a surrogate: {why}")
            return
        key, sep, value = text.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise EvaluateError(f"--surrogate {text!r}: expected a run id or KEY=VALUE, e.g. loss.name=ce")
        self.key, self.value = key.strip(), value.strip()

    def resolve(self, run) -> tuple[str | None, str]:
        """(surrogate run id, "") or (None, why this run gets none)."""
        run_id = run.info.run_id
        if self.key is None:
            return (None, f"it is the surrogate ({self.text})") if run_id == self.text else (self.text, "")
        sweep = run.data.tags.get(SWEEP_TAG)
        if sweep is None:
            raise EvaluateError(f"--surrogate {self.text}: run {run_id} belongs to no sweep; give the surrogate's "
                                "run id")
        siblings = self._sweep(run.info.experiment_id, sweep)
        if not any(self.key in r.data.params for r in siblings):
            known = sorted({k for r in siblings for k in r.data.params})
            raise EvaluateError(f"--surrogate {self.text}: no run of sweep {sweep} has a param {self.key!r}; "
                                f"params: {', '.join(known)}")
        found = [r for r in siblings if _matches(run.data.params, r.data.params, self.key, self.value)]
        if len(found) > 1:
            ids = ", ".join(r.info.run_id for r in found)
            raise EvaluateError(f"--surrogate {self.text}: {len(found)} runs of sweep {sweep} match for run {run_id} "
                                f"({ids}); the selector must pick one")
        if not found:
            self.unmatched.append(run_id)
            return None, f"no surrogate: no finished run of its sweep has {self.text} and its other params"
        if found[0].info.run_id == run_id:
            return None, f"it is its own surrogate ({self.text})"
        if not _has_checkpoint(self.client, found[0].info.run_id):
            return None, f"its surrogate {found[0].info.run_id} has no checkpoint artifact ({CHECKPOINT})"
        self.resolved += 1
        return found[0].info.run_id, ""

    def check_resolved(self) -> None:
        """A selector that matched for none of the runs it was tried on is a mistake, not a skip."""
        if self.key is not None and self.unmatched and not self.resolved:
            raise EvaluateError(f"--surrogate {self.text}: no finished trial run matches it for any run (tried "
                                f"{len(self.unmatched)}: {self.key} = {self.value} with their other params equal)")

    def _sweep(self, exp_id: str, sweep: str) -> list:
        if sweep not in self._siblings:
            where = f"tags.`{SWEEP_TAG}` = '{sweep}' AND tags.`{ROLE_TAG}` = 'trial' AND attributes.status = 'FINISHED'"
            self._siblings[sweep] = _search(self.client, exp_id, where)
        return self._siblings[sweep]


def _matches(target: Mapping[str, str], candidate: Mapping[str, str], key: str, value: str) -> bool:
    """Whether ``candidate`` has ``key`` = ``value`` and ``target``'s params otherwise. A param only one of them
    has (α of a GCE run against a CE run) is a difference unless it belongs to the key's group (``loss.*``)."""
    if not _same(candidate.get(key), value):
        return False
    group = key.split(".", 1)[0] + "."
    for name in (target.keys() | candidate.keys()) - {key, "sweep.point"}:
        if name in target and name in candidate:
            if target[name] != candidate[name]:
                return False
        elif not name.startswith(group):
            return False
    return True


def _same(stored: str | None, value: str) -> bool:
    if stored is None:
        return False
    if stored == value:
        return True
    try:
        return math.isclose(float(stored), float(value), rel_tol=1e-9)
    except ValueError:
        return stored.lower() == value.lower() and stored.lower() in ("true", "false", "none")


# --- running the jobs -------------------------------------------------------------------------------------------
def _execute(jobs: list[Job], *, address: str | None, use_ray: bool, cpus: float, gpus: float, tracking_uri: str,
             experiment: str, plugins: tuple[str, ...]):
    """(job, attempt) as each job ends: in this process for one job or without Ray, else one Ray task per job."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not jobs:
        return
    if not use_ray or (len(jobs) == 1 and not address):
        for job in jobs:
            yield job, _attempt(job)
        return
    import ray

    started_here = not ray.is_initialized()
    # The record's folder holds only what Ray's start-up notes (its session, staged plugins): gone afterwards.
    folder = tempfile.TemporaryDirectory(prefix="gce-evaluate-")
    try:
        _init_ray(address, tracking_uri, experiment, plugins, Path(folder.name))
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_attempt)
        pending = {task.remote(job, max(1, int(cpus))): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                attempt = ray.get(ready[0])
            except Exception as err:  # the worker itself died (out of memory, a node lost)
                text = str(err).strip().splitlines()
                attempt = ("failed", f"{type(err).__name__}: {text[0] if text else ''}", traceback.format_exc())
            yield job, attempt
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
        folder.cleanup()


def _init_ray(address: str | None, tracking_uri: str, experiment: str, plugins: tuple[str, ...], storage: Path) -> None:
    """The project's Ray start-up (``sweeps.runtime.init_ray`` through the launcher's environment for workers),
    with a record of this evaluation (in ``storage``) in place of a sweep's."""
    from sweeps.launcher import _init_ray as launcher_init_ray
    from sweeps.launcher import refuse_loopback
    from sweeps.record import SweepRecord
    from sweeps.runtime import check_address

    try:
        if address:
            check_address(address)  # a cluster that is not there fails now, naming it (as `run` does)
        refuse_loopback(address, tracking_uri, "workers")
    except SpecError as err:
        raise EvaluateError(str(err)) from None
    record = SweepRecord(f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}", "", tracking_uri,
                         experiment, str(storage),
                         {"name": "evaluate", "experiment": experiment, "plugins": list(plugins)}, address)
    try:
        launcher_init_ray(record)
    except SpecError as err:
        raise EvaluateError(str(err)) from None


# --- output -----------------------------------------------------------------------------------------------------
def outcome_table(outcomes: list[Outcome], evaluation: Evaluation):
    """A rich table: run, trial, configuration, outcome, and each new metric at the primary ε."""
    from rich.table import Table
    from rich.text import Text

    norm, eps = evaluation.primary()
    columns = [k for s in evaluation.splits for k, n, e in evaluation.planned(s) if (n, e) == (norm, eps)]
    table = Table(title=f"evaluation {evaluation.name!r}: robust accuracy at ε = {format_eps(eps)} ({norm})",
                  title_justify="left")
    for header in ("run id", "trial", "configuration", "outcome"):
        table.add_column(header)
    for key in columns:
        table.add_column(f"{key.partition('/')[0]} {parse_robust(key).label}", justify="right")
    for out in outcomes:
        outcome = out.status if not out.reason else f"{out.status}: {out.reason}"
        if out.surrogate_run and out.status == "evaluated":
            outcome += f" (surrogate {out.surrogate_run[:12]})"
        cells = [out.run_id[:12], out.trial_id, out.label, outcome]
        cells += [f"{out.metrics[k]:.4f}" if k in out.metrics else "—" for k in columns]
        table.add_row(*(Text(c) for c in cells))
    return table

