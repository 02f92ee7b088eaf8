"""Train K small models at once, stacked into one vectorised model (``torch.func``), each member its solo run.

A LeNet-5 step leaves a GPU idle on kernel launches; K members sharing one launch per layer fill it. Stacking
must not change the science, so each member keeps everything a solo ``fit`` has: its own ``Trainer`` (model
initialised from its seed, optimiser and schedule - per-member lr and weight decay just work - loader with its
own data order, attack and random stream). Per step the members' leaf parameters are stacked *differentiably*
(``torch.stack``, not ``torch.func.stack_module_state``, which detaches them), the K batches run through
``functional_call`` under ``vmap``, each member's loss is taken on its slice with its own loss function, one
backward sends each member's gradient to its own parameters and each member's own optimiser steps them.
BatchNorm running statistics, updated in place on the stacked buffers, are copied back to each member.

Only factors that keep the model's shapes and the step's structure may differ between members (``stack_key``):
seed, loss (non-COT; COT only with COT), α/normalisation, lr, weight decay and adversarial ε. Adversarial
training's schedules, clean/adversarial mix and early stopping (``adv_training``) are shared, and each member
applies them to itself as its solo run does: its own warmed-up ε, its own val/adv_acc, its own stop and restore.

Vectorised convolutions may sum in another order than the solo ones: members then equal their solo runs to
float rounding (see tests/test_stacked.py for the measured differences), not bit for bit. ``vectorize=False``
trains the same members one ordinary step after another: exactly the solo computation.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call, vmap

from gce.config import TrainConfig
from gce.data import DataBundle, load_dataset
from gce.losses import cross_entropy
from gce.train import EpochEnd, FitResult, Trainer, TrainingDiverged, _load, resolve_device

__all__ = [
    "FREE_FIELDS",
    "StackDecision",
    "StackError",
    "StackedFitResult",
    "StackedTrainer",
    "check_stackable",
    "fit_stacked",
    "stack_key",
    "stack_problems",
]

#: Flat config fields (``TrainConfig.to_flat``) members of one stack may differ in: none changes a shape or the
#: step's structure. ``loss.kwargs.*`` go with ``loss.name`` (a loss's own options).
FREE_FIELDS = ("train.seed", "loss.name", "loss.alpha", "loss.normalization", "loss.kwargs", "optim.lr",
               "optim.weight_decay", "adversarial.eps")

Callback = Callable[[list[EpochEnd]], "bool | Sequence[bool] | None"]


class StackError(ValueError):
    """Configs that cannot train as one stack; the message names each field that differs."""


# --- which configs stack ---------------------------------------------------------------------------------------
def _fixed_fields(config: TrainConfig) -> dict[str, Any]:
    flat = config.to_flat()
    fixed = {k: v for k, v in flat.items() if k not in FREE_FIELDS and not k.startswith("loss.kwargs.")}
    # COT alternates two optimisers' steps on every batch: its step has another structure than any other loss's.
    fixed["loss.name (cot or not)"] = "cot" if config.loss.name == "cot" else "non-cot"
    return fixed


def stack_key(config: TrainConfig) -> str:
    """Configs with equal keys may be stacked: a digest of every field outside ``FREE_FIELDS``."""
    text = json.dumps(_fixed_fields(config), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stack_problems(configs: Sequence[TrainConfig]) -> list[str]:
    """One line per field in which a member differs from member 0 in a way stacking cannot carry; [] if none."""
    if not configs:
        return ["no configs to stack"]
    problems: list[str] = []
    ref = _fixed_fields(configs[0])
    for i, config in enumerate(configs[1:], start=1):
        fields = _fixed_fields(config)
        for key in sorted(set(ref) | set(fields)):
            a, b = ref.get(key, "<unset>"), fields.get(key, "<unset>")
            if a == b:
                continue
            if key.startswith("loss.name"):
                problems.append(f"loss.name: member {i} has {config.loss.name!r}, member 0 "
                                f"{configs[0].loss.name!r}; COT (two optimisers, alternating steps) stacks only "
                                "with COT")
            else:
                if key.startswith("adversarial") and (configs[0].adversarial is None) != (config.adversarial is None):
                    key, a, b = "adversarial", configs[0].adversarial, config.adversarial  # one line, not one per field
                line = (f"{key}: member {i} has {b!r}, member 0 {a!r}; stacked members may differ only in "
                        f"{', '.join(FREE_FIELDS)}")
                if line not in problems:
                    problems.append(line)
    return problems


def check_stackable(configs: Sequence[TrainConfig]) -> None:
    """Raise ``StackError`` listing every field that keeps these configs from training as one stack."""
    problems = stack_problems(configs)
    if problems:
        raise StackError("cannot stack these configs:\n  " + "\n  ".join(problems))


# --- one member ------------------------------------------------------------------------------------------------
class _Rng:
    """A member's own torch random stream (CPU, and CUDA there): its draws (PGD random starts, dropout) are the
    ones its solo run makes, whatever the other members draw in between."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.cpu_state, self.cuda_state = self._get()

    def _get(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if self.cuda else [])

    def _set(self, cpu: torch.Tensor, cuda: list[torch.Tensor]) -> None:
        torch.set_rng_state(cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(cuda)

    def capture(self) -> None:
        self.cpu_state, self.cuda_state = self._get()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        outer = self._get()
        self._set(self.cpu_state, self.cuda_state)
        try:
            yield
        finally:
            self.capture()
            self._set(*outer)


@contextlib.contextmanager
def _caller_rng(device: torch.device) -> Iterator[None]:
    """Leave the caller's random state as it was (members seed and draw on their own streams)."""
    rng = _Rng(device)
    try:
        yield
    finally:
        rng._set(rng.cpu_state, rng.cuda_state)


class _Member(Trainer):
    """A solo ``Trainer`` whose random stream lives beside the global one: its checkpoints hold *its* stream,
    so they are the solo format and resume exactly, in a stack or alone."""

    def __init__(self, config: TrainConfig, data: DataBundle | None, index: int):
        super().__init__(config, data)
        self.index = index
        self.rng = _Rng(self.device)  # right after the seeded init: where the solo run's training draws begin

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["torch_rng"] = self.rng.cpu_state.clone()
        state["cuda_rng"] = [s.clone() for s in self.rng.cuda_state]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with _caller_rng(self.device):
            super().load_state_dict(state)
            self.rng.capture()

    def describe(self) -> str:
        return f"member {self.index} (train.seed={self.config.seed}, optim.lr={self.config.optim.lr})"


# --- results and the decision ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StackDecision:
    """Whether the stack trains vectorised, and why. Timings are seconds per forward+backward of all members on
    one batch each (best of a few, on deep copies), None where not measured."""

    vectorize: bool
    stacked_s: float | None
    sequential_s: float | None
    reason: str

    @property
    def speedup(self) -> float | None:
        """Sequential time over stacked time (> 1: stacking is faster)."""
        if not self.stacked_s or self.sequential_s is None:
            return None
        return self.sequential_s / self.stacked_s

    def to_dict(self) -> dict[str, Any]:
        return {"vectorize": self.vectorize, "stacked_s": self.stacked_s, "sequential_s": self.sequential_s,
                "speedup": self.speedup, "reason": self.reason}


@dataclass
class StackedFitResult(FitResult):
    """A member's ``FitResult``, plus its index, the stack's decision and, if it diverged, the error."""

    member: int = 0
    decision: StackDecision | None = None
    error: TrainingDiverged | None = None


# --- the stack ---------------------------------------------------------------------------------------------------
class StackedTrainer:
    """K solo ``Trainer`` members (``members``) trained together, vectorised or one step after another.

    ``data``: None loads each member's dataset as solo ``fit`` would (the validation split depends on the seed);
    one ``DataBundle`` is shared by all; a sequence gives one per member. ``resume_from``: per member, a solo
    checkpoint path or None. ``vectorize``: True, False, or None to time both on deep copies and take the
    faster (``decision`` says which and the timings).

    Members at different epochs (after a resume) are handled by training, each round, only the members at the
    lowest epoch: the ones ahead wait, and all are stacked again once they are level. Attacks of adversarial
    training run per member (its own attack, model and stream), then the step is stacked. The vectorised step
    runs eagerly (``compile`` is not applied to it); evaluation runs per member, as solo.
    """

    def __init__(self, configs: Sequence[TrainConfig], data: DataBundle | Sequence[DataBundle | None] | None = None,
                 *, resume_from: Sequence[str | Path | None] | None = None, vectorize: bool | None = None):
        configs = list(configs)
        check_stackable(configs)
        k = len(configs)
        datas = _member_data(configs, data)
        resumes = [None] * k if resume_from is None else list(resume_from)
        if len(resumes) != k:
            raise ValueError(f"resume_from: one path (or None) per member: {k} members, got {len(resumes)}")
        self.device = resolve_device(configs[0].device)
        with _caller_rng(self.device):
            self.members = [_Member(c, d, i) for i, (c, d) in enumerate(zip(configs, datas, strict=True))]
        for member, path in zip(self.members, resumes, strict=True):
            if path is not None:
                member.load_state_dict(_load(path, member.device))
        sizes = {(len(m.data.train), len(m.train_loader)) for m in self.members}
        if len(sizes) > 1:
            raise StackError(f"data: members' training splits differ in size (examples, batches per epoch): "
                             f"{[(len(m.data.train), len(m.train_loader)) for m in self.members]}; stacked "
                             "members need the same batch shapes at every step")
        self.active: list[int] = [m.index for m in self.members if m.epoch < m.config.epochs and not m.should_stop()]
        self.errors: dict[int, TrainingDiverged] = {}
        template = copy.deepcopy(self.members[0].model).train()
        for p in template.parameters():
            p.requires_grad_(False)
        self._template = template
        self._param_names = [n for n, _ in template.named_parameters()]
        self._buffer_names = [n for n, _ in template.named_buffers()]
        self._params = [[dict(m.model.named_parameters())[n] for n in self._param_names] for m in self.members]
        self._buffers = [[dict(m.model.named_buffers())[n] for n in self._buffer_names] for m in self.members]
        self.decision = self._decide(vectorize)

    @property
    def vectorize(self) -> bool:
        return self.decision.vectorize

    def stop(self, index: int) -> None:
        """Take member ``index`` out of the stack; the others go on."""
        if index in self.active:
            self.active.remove(index)

    # --- one epoch ---------------------------------------------------------------------------------------------
    def train_epoch(self) -> dict[int, dict[str, float]]:
        """One epoch of the active members at the lowest epoch: {member index: its solo ``train_epoch`` metrics}.

        ``train/images_per_s`` is the member's own images over the stacked epoch's wall time (the time all
        members of the round took together); ``train/epoch_time_s`` is that wall time. A member whose loss is
        not finite leaves the stack, its ``TrainingDiverged`` in ``errors``, and is not in the result.
        """
        if not self.active:
            return {}
        low = min(self.members[i].epoch for i in self.active)
        ms = [self.members[i] for i in self.active if self.members[i].epoch == low]
        for m in ms:
            m.model.train()
            m.train_loader.set_epoch(m.epoch)
        loss_sums = [torch.zeros((), device=self.device) for _ in ms]
        corrects = [torch.zeros((), device=self.device, dtype=torch.long) for _ in ms]
        seen = [0] * len(ms)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        n_batches = len(ms[0].train_loader)
        sync()
        start = time.perf_counter()
        for b, batches in enumerate(zip(*(iter(m.train_loader) for m in ms), strict=True)):
            xs, ys, cleans = [], [], []
            for m, (x, y) in zip(ms, batches, strict=True):
                if m.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                clean = None
                if m.attack is not None:  # the member's own attack on its own model, from its own stream
                    with m.rng.active():
                        x, clean = m.adversarial_inputs(x, y, b, n_batches)
                xs.append(x)
                ys.append(y)
                cleans.append(clean)
            step = self._stacked_step if self.vectorize else self._sequential_step
            outs = step(ms, xs, ys, cleans)
            for j, (logits, loss) in enumerate(outs):
                loss_sums[j] += loss * ys[j].shape[0]
                corrects[j] += (logits.argmax(1) == ys[j]).sum()
                seen[j] += ys[j].shape[0]
        sync()
        elapsed = time.perf_counter() - start
        out: dict[int, dict[str, float]] = {}
        for j, m in enumerate(ms):
            train_loss = loss_sums[j].item() / max(seen[j], 1)
            if not math.isfinite(train_loss):
                self.errors[m.index] = TrainingDiverged(
                    f"{m.describe()}: train/loss is {train_loss} at epoch {m.epoch + 1}: training diverged")
                self.stop(m.index)
                continue
            lr = m.optimizer.param_groups[0]["lr"]
            for scheduler in (m.scheduler, m.complement_scheduler):
                if scheduler is not None:
                    scheduler.step()
            m.epoch += 1
            out[m.index] = {"train/loss": train_loss, "train/acc": corrects[j].item() / max(seen[j], 1),
                            "train/images_per_s": seen[j] / elapsed, "train/epoch_time_s": elapsed, "train/lr": lr}
        return out

    def evaluate(self, index: int) -> dict[str, float]:
        """Member ``index``'s solo validation metrics (run alone: evaluation is not where stacking pays)."""
        m = self.members[index]
        with m.rng.active():
            return m.evaluate()

    # --- the two ways of taking a step ---------------------------------------------------------------------------
    @staticmethod
    def _phases(m: _Member) -> list[tuple[Callable[..., torch.Tensor], torch.optim.Optimizer]]:
        if m.config.loss.name == "cot":  # as Trainer.train_epoch: a CE step, then a complement step
            return [(cross_entropy, m.optimizer), (m.complement_fn, m.complement_optimizer)]
        return [(m.loss_fn, m.optimizer)]

    def _sequential_step(self, ms: list[_Member], xs, ys, cleans) -> list[tuple[torch.Tensor, torch.Tensor]]:
        outs = []
        for m, x, y, clean in zip(ms, xs, ys, cleans, strict=True):
            with m.rng.active():
                results = [m._step(fn, x, y, opt, clean) for fn, opt in self._phases(m)]
            loss = results[0][1]
            for _, more in results[1:]:  # COT: ce + complement, as solo
                loss = loss + more
            outs.append((results[0][0], loss))
        return outs

    def _stacked_forward(self, indices: list[int], x: torch.Tensor, params=None, buffers=None) -> torch.Tensor:
        """Logits (K, B, classes) of the members ``indices`` on x (K, B, ...), in one vmapped call. BatchNorm's
        in-place running-statistics updates land in the stacked buffers, which go back to each member."""
        params = params if params is not None else self._params
        buffers = buffers if buffers is not None else self._buffers
        stacked_p = {n: torch.stack([params[i][j] for i in indices]) for j, n in enumerate(self._param_names)}
        stacked_b = {n: torch.stack([buffers[i][j] for i in indices]) for j, n in enumerate(self._buffer_names)}

        def one(p, b, xi):
            return functional_call(self._template, (p, b), (xi,))

        try:
            logits = vmap(one, randomness="error")(stacked_p, stacked_b, x)
        except RuntimeError as err:
            if "randomness" in str(err):
                raise RuntimeError(
                    f"model {self.members[0].config.model.name!r} draws random numbers in its forward (dropout?): "
                    "a vectorised step cannot give each member its solo draws; use vectorize=False") from err
            raise
        if self._buffer_names:
            with torch.no_grad():
                dst = [buffers[i][j] for i in indices for j in range(len(self._buffer_names))]
                src = [stacked_b[n][k] for k in range(len(indices)) for n in self._buffer_names]
                torch._foreach_copy_(dst, src)
        return logits

    def _stacked_step(self, ms: list[_Member], xs, ys, cleans) -> list[tuple[torch.Tensor, torch.Tensor]]:
        indices = [m.index for m in ms]
        x = torch.stack(xs)
        clean = None if cleans[0] is None else torch.stack(cleans)  # the mix's weight is shared by all members
        w = ms[0].config.adv_training.clean_weight
        phases = [self._phases(m) for m in ms]
        first_logits, totals = None, None
        for phase in range(len(phases[0])):
            with ms[0]._autocast():  # as Trainer._step: the adversarial forward, then the clean one
                logits = self._stacked_forward(indices, x)
                clean_logits = None if clean is None else self._stacked_forward(indices, clean)
            losses = [phases[k][phase][0](logits[k].float(), ys[k]) for k in range(len(ms))]
            if clean_logits is not None:
                losses = [(1 - w) * loss + w * phases[k][phase][0](clean_logits[k].float(), ys[k])
                          for k, loss in enumerate(losses)]
            for k in range(len(ms)):
                phases[k][phase][1].zero_grad(set_to_none=True)
            # Each member's parameters reach only its own loss: the sum's gradient is each member's own.
            torch.stack(losses).sum().backward()
            for k in range(len(ms)):
                phases[k][phase][1].step()
            losses = [loss.detach() for loss in losses]
            if first_logits is None:
                first_logits, totals = logits.detach(), losses
            else:
                totals = [t + loss for t, loss in zip(totals, losses, strict=True)]
        return [(first_logits[k], totals[k]) for k in range(len(ms))]

    # --- the decision ----------------------------------------------------------------------------------------------
    def _decide(self, vectorize: bool | None) -> StackDecision:
        if vectorize is not None:
            return StackDecision(bool(vectorize), None, None, f"vectorize={bool(vectorize)} was asked for")
        return self.measure()

    def measure(self, repeats: int = 3, passes: int = 2) -> StackDecision:
        """Time a forward+backward of all members both ways (best of ``repeats`` x ``passes``, interleaved, after
        a warm-up) on deep copies, and decide for the faster: what ``vectorize=None`` does. The members'
        weights, statistics, optimisers and random streams are untouched."""
        try:
            stacked_s, sequential_s = self._time_both(repeats, passes)
        except RuntimeError as err:
            return StackDecision(False, None, None, f"the vectorised step does not run: {err}")
        faster = stacked_s < sequential_s
        return StackDecision(faster, stacked_s, sequential_s,
                             f"measured: stacked {stacked_s * 1e3:.2f} ms vs sequential {sequential_s * 1e3:.2f} ms "
                             f"per step of {len(self.members)} members: {'stacked' if faster else 'sequential'} "
                             "is faster")

    def _time_both(self, repeats: int, passes: int) -> tuple[float, float]:
        """Best seconds per forward+backward of all members: (stacked, sequential)."""
        ms = self.members
        copies = [copy.deepcopy(m.model).train() for m in ms]
        params = [[dict(c.named_parameters())[n] for n in self._param_names] for c in copies]
        buffers = [[dict(c.named_buffers())[n] for n in self._buffer_names] for c in copies]
        xs, ys = [], []
        for m in ms:
            n = min(m.config.batch_size, len(m.train_loader.labels))
            x = m.train_loader.images[:n].float().div_(255.0)
            xs.append(x.contiguous(memory_format=torch.channels_last) if m.channels_last else x)
            ys.append(m.train_loader.labels[:n])
        indices = list(range(len(ms)))
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        def stacked():
            with ms[0]._autocast():
                logits = self._stacked_forward(indices, torch.stack(xs), params, buffers)
            torch.stack([m.loss_fn(logits[k].float(), ys[k]) for k, m in enumerate(ms)]).sum().backward()

        def sequential():
            for m, c, x, y in zip(ms, copies, xs, ys, strict=True):
                with m._autocast():
                    logits = c(x)
                m.loss_fn(logits.float(), y).backward()

        best = {stacked: math.inf, sequential: math.inf}
        with _caller_rng(self.device):
            for fn in best:  # warm-up: first-call kernels, allocator
                fn()
            for _ in range(repeats):  # interleaved, so that a slow spell of the machine hits both
                for fn in best:
                    sync()
                    start = time.perf_counter()
                    for _ in range(passes):
                        fn()
                    sync()
                    best[fn] = min(best[fn], (time.perf_counter() - start) / passes)
        return best[stacked], best[sequential]


def _member_data(configs: list[TrainConfig], data) -> list[DataBundle]:
    if isinstance(data, DataBundle):
        return [data] * len(configs)
    if data is not None:
        data = list(data)
        if len(data) != len(configs):
            raise ValueError(f"data: one DataBundle per member: {len(configs)} members, got {len(data)}")
    loaded: dict[tuple, DataBundle] = {}  # members of one seed share one load
    out = []
    for i, c in enumerate(configs):
        if data is not None and data[i] is not None:
            out.append(data[i])
            continue
        d = c.data
        key = (d.dataset, d.root, d.download, d.val_size, c.seed, d.limit)
        if key not in loaded:
            loaded[key] = load_dataset(d.dataset, d.root, download=d.download, val_size=d.val_size, seed=c.seed,
                                       limit=d.limit)
        out.append(loaded[key])
    return out


def _stop_flags(value: Any, n: int) -> list[bool]:
    if value is None or isinstance(value, bool):
        return [bool(value)] * n
    flags = [bool(v) for v in value]
    if len(flags) != n:
        raise ValueError(f"a callback returned {len(flags)} stop flags for {n} members' EpochEnds")
    return flags


def fit_stacked(configs: Sequence[TrainConfig], callbacks: Sequence[Callback] = (), *,
                data: DataBundle | Sequence[DataBundle | None] | None = None,
                resume_from: Sequence[str | Path | None] | None = None, vectorize: bool | None = None,
                on_diverged: str = "leave") -> list[StackedFitResult]:
    """``fit`` for K stacked members: one ``StackedFitResult`` per config, in order, each as its solo run's.

    Each callback is called once per epoch with the list of ``EpochEnd`` of the members that trained it
    (``end.trainer`` is the member's own ``Trainer``: ``end.trainer.save_checkpoint(path)`` writes a solo
    checkpoint). It may return a bool for all of them or one bool per EpochEnd: a stopped member leaves the
    stack, the others go on. A diverged member (non-finite train loss) leaves the stack with its
    ``TrainingDiverged`` in ``result.error`` (``on_diverged="leave"``), or it is raised (``"raise"``), naming
    the member, its seed and lr. ``decision`` on every result says whether the stack ran vectorised and why.
    """
    if on_diverged not in ("leave", "raise"):
        raise ValueError(f"on_diverged must be 'leave' or 'raise'; got {on_diverged!r}")
    stack = StackedTrainer(configs, data, resume_from=resume_from, vectorize=vectorize)
    results = [StackedFitResult(m.model, m.config, m.data, trainer=m, member=m.index, decision=stack.decision)
               for m in stack.members]
    while stack.active:
        trained = stack.train_epoch()
        for index, err in stack.errors.items():
            if results[index].error is None:
                results[index].error = err
                if on_diverged == "raise":
                    raise err
        ends = []
        patience_out = []
        for index, metrics in trained.items():
            metrics.update(stack.evaluate(index))
            metrics["epoch"] = stack.members[index].epoch
            results[index].history.append(metrics)
            patience_out.append(stack.members[index].track(metrics))  # as fit: before the callbacks' checkpoints
            ends.append(EpochEnd(stack.members[index].epoch, metrics, stack.members[index]))
        if not ends:
            continue
        stops = [False] * len(ends)
        for cb in callbacks:
            stops = [a or b for a, b in zip(_stop_flags(cb(ends), len(ends)), stops, strict=True)]
        for end, stop, out in zip(ends, stops, patience_out, strict=True):
            member = end.trainer
            if stop or out:
                results[member.index].stopped_early = stop or member.epoch < member.config.epochs
                stack.stop(member.index)
            elif member.epoch >= member.config.epochs:
                stack.stop(member.index)
    for result, member in zip(results, stack.members, strict=True):
        result.kept_epoch = member.restore_best()
    return results

