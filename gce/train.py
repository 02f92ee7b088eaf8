"""``fit(config, callbacks)``: one training run, shared by scripts, the CLI and Ray trials.

Standard training with CE or GCE (used alone, as in the paper); COT alternates a CE step and a complement
step on every batch (Chen et al., ICLR 2019, https://arxiv.org/abs/1903.01182); PGD adversarial training
(Madry et al. 2018, https://arxiv.org/abs/1706.06083) when ``config.adversarial`` is set: the chosen loss is
then minimised on the adversarial examples (mixed with the clean ones, ε and steps warmed up, the run stopped
on validation robust accuracy, as ``config.adv_training`` says).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gce.config import TrainConfig
from gce.data import DataBundle, DeviceLoader, Split, load_dataset
from gce.losses import complement_entropy, cross_entropy, get_loss
from gce.metrics import ADV_ACC
from gce.models import build_model

__all__ = ["EpochEnd", "FitResult", "Trainer", "attack_at", "fit", "load_checkpoint", "objective", "resolve_device",
           "warmup_progress"]

CHECKPOINT_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: the run cannot recover (lower the learning rate)."""


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU: code never assumes CUDA."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device: {spec!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
    return device


def objective(config: TrainConfig) -> Callable[..., torch.Tensor]:
    """The loss the model is trained to minimise, as one function (for validation and 'train'-loss attacks).

    For COT that is CE + complement entropy: the two terms its alternating steps minimise.
    """
    loss = config.loss
    if loss.name == "cot":
        def cot(logits, target, reduction="mean"):
            return cross_entropy(logits, target, reduction=reduction) + complement_entropy(
                logits, target, normalization=loss.normalization, reduction=reduction)
        return cot
    return get_loss(loss.name, alpha=loss.alpha, normalization=loss.normalization, kwargs=loss.kwargs)


def warmup_progress(epochs_done: float, warmup_epochs: float) -> float:
    """How far a warm-up of ``warmup_epochs`` is after ``epochs_done`` (fractional) epochs, in [0, 1]."""
    return 1.0 if warmup_epochs <= 0 else min(1.0, epochs_done / warmup_epochs)


def attack_at(config: TrainConfig, epoch: int, batch: int, batches: int):
    """The training attack (an ``AttackConfig``) for batch ``batch`` (0-based) of ``batches`` in epoch ``epoch``
    (0-based, epochs completed): ``config.adversarial`` with ``config.adv_training``'s warm-ups applied, the very
    same object once they are over; None without adversarial training.

    A batch counts as done when it is trained on, so the first batch has ε = eps/(batches·warm-up) (linear), and
    the last batch of the warm-up's last epoch the full ε. A configured step size keeps its ratio to ε/steps.
    """
    cfg = config.adversarial
    if cfg is None:
        return None
    at = config.adv_training
    done = epoch + (batch + 1) / batches
    p_eps, p_steps = warmup_progress(done, at.eps_warmup_epochs), warmup_progress(done, at.steps_warmup_epochs)
    if p_eps >= 1 and p_steps >= 1:
        return cfg
    shape = p_eps if at.eps_schedule == "linear" else 0.5 * (1 - math.cos(math.pi * p_eps))
    steps = cfg.steps if p_steps >= 1 else 1 + math.floor((cfg.steps - 1) * p_steps + 0.5)
    step_size = None if cfg.step_size is None else max(cfg.step_size * shape * cfg.steps / steps, 1e-12)
    return dataclasses.replace(cfg, eps=cfg.eps * shape, steps=steps, step_size=step_size)


@dataclass
class EpochEnd:
    """What a callback sees after each epoch. Returning True from a callback stops training early."""

    epoch: int  # epochs completed, 1-based
    metrics: dict[str, float]
    trainer: Trainer


@dataclass
class FitResult:
    model: nn.Module
    config: TrainConfig
    data: DataBundle
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    trainer: Trainer | None = None
    #: The epoch whose weights ``model`` holds: the best by val/adv_acc under early stopping, else the last.
    kept_epoch: int | None = None


class Trainer:
    """Holds the model, optimiser, schedule and loaders of one run so it can be checkpointed and resumed."""

    def __init__(self, config: TrainConfig, data: DataBundle | None = None):
        self.config = config
        self.device = resolve_device(config.device)
        self.data = data if data is not None else load_dataset(
            config.data.dataset, config.data.root, download=config.data.download,
            val_size=config.data.val_size, seed=config.seed, limit=config.data.limit)
        info = self.data.info
        torch.manual_seed(config.seed)  # model initialisation is part of the seed
        self.model = build_model(config.model.name, input_shape=info.input_shape, num_classes=info.num_classes,
                                 mean=info.mean, std=info.std, **config.model.kwargs).to(self.device)
        cuda = self.device.type == "cuda"
        self.channels_last = _channels_last(self.model, config)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp_dtype = torch.bfloat16 if config.precision == "bf16" or (config.precision == "auto" and cuda) \
            else None
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.optimizer = _optimizer(config, self.model.parameters())
        self.scheduler = _scheduler(config, self.optimizer)
        # COT's complement step has an optimiser of its own, as in the authors' code: Adam's moment estimates
        # of the two objectives must not mix.
        self.complement_optimizer = self.complement_scheduler = None
        if config.loss.name == "cot":
            self.complement_optimizer = _optimizer(config, self.model.parameters())
            self.complement_scheduler = _scheduler(config, self.complement_optimizer)
        augment = config.data.augment or info.augment
        self.train_loader = DeviceLoader(self.data.train, config.batch_size, shuffle=True, augment=augment,
                                         seed=config.seed, device=self.device, drop_last=False,
                                         max_batches=config.max_batches)
        self.val_loader = DeviceLoader(self.data.val, config.data.eval_batch_size, device=self.device)
        self.loss_fn = objective(config)
        self.complement_fn = partial(complement_entropy, normalization=config.loss.normalization)
        self.attack = self.val_attack = self.val_adv_loader = None
        if config.adversarial is not None:
            from gce.attacks import AttackConfig, build_attack

            self.attack = build_attack(config.adversarial, train_loss=self.loss_fn)
            # val/adv_acc: one fixed yardstick for every training loss and schedule (CE-loss PGD at the full ε).
            at = config.adv_training
            self.val_attack = build_attack(AttackConfig(name="pgd", eps=config.adversarial.eps,
                                                        norm=config.adversarial.norm, steps=at.val_steps))
            val = self.data.val
            n = min(at.val_examples, len(val))
            self.val_adv_loader = DeviceLoader(Split(val.images[:n], val.labels[:n]), config.data.eval_batch_size,
                                               device=self.device)
        # Early stopping's best epoch so far: {"epoch", "value" (val/adv_acc), "model" (its state dict)}.
        self.best: dict[str, Any] | None = None
        self.epoch = 0

    # --- one epoch -----------------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _step(self, loss_fn: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor,
              optimizer: torch.optim.Optimizer, clean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on ``loss_fn`` at x; with ``clean``, on (1-w)·L(x) + w·L(clean) (the mix)."""
        with self._autocast():
            logits = self.forward(x)
            clean_logits = None if clean is None else self.forward(clean)
        loss = loss_fn(logits.float(), y)
        if clean_logits is not None:
            w = self.config.adv_training.clean_weight
            loss = (1 - w) * loss + w * loss_fn(clean_logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return logits.detach(), loss.detach()

    def adversarial_inputs(self, x: torch.Tensor, y: torch.Tensor, batch: int,
                           batches: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(what the loss is taken on, the clean batch when the loss mixes it in, else None) for batch ``batch``
        of ``batches`` this epoch: x itself without adversarial training."""
        w = self.config.adv_training.clean_weight
        if self.attack is None or w == 1:
            return x, None
        cfg = attack_at(self.config, self.epoch, batch, batches)
        if cfg is self.config.adversarial:
            attack = self.attack
        else:  # warming up: this batch's ε and steps
            from gce.attacks import build_attack

            attack = build_attack(cfg, train_loss=self.loss_fn)
        x_adv = attack(self.model, x, y)
        self.model.train()
        return x_adv, (x if w > 0 else None)

    def train_epoch(self) -> dict[str, float]:
        cfg = self.config
        self.model.train()
        self.train_loader.set_epoch(self.epoch)
        # Accumulate on the device: one host sync per epoch, not one per step.
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        batches = len(self.train_loader)
        for i, (x, y) in enumerate(self.train_loader):
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x, clean = self.adversarial_inputs(x, y, i, batches)
            if cfg.loss.name == "cot":
                logits, ce = self._step(cross_entropy, x, y, self.optimizer, clean)
                _, comp = self._step(self.complement_fn, x, y, self.complement_optimizer, clean)
                loss = ce + comp
            else:
                logits, loss = self._step(self.loss_fn, x, y, self.optimizer, clean)
            loss_sum += loss * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
            seen += y.shape[0]
        sync()
        elapsed = time.perf_counter() - start
        train_loss = loss_sum.item() / max(seen, 1)
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"train/loss is {train_loss} at epoch {self.epoch + 1} "
                                   f"(optim.lr={cfg.optim.lr}): training diverged")
        lr = self.optimizer.param_groups[0]["lr"]
        for scheduler in (self.scheduler, self.complement_scheduler):
            if scheduler is not None:
                scheduler.step()
        self.epoch += 1
        return {"train/loss": train_loss, "train/acc": correct.item() / max(seen, 1),
                "train/images_per_s": seen / elapsed, "train/epoch_time_s": elapsed, "train/lr": lr}

    @torch.no_grad()
    def evaluate(self, loader: DeviceLoader | None = None, prefix: str = "val") -> dict[str, float]:
        """Clean loss and accuracy on a split (validation by default) in eval mode; on validation with adversarial
        training also ``val/adv_acc``."""
        robust = loader is None and self.val_attack is not None
        loader = loader or self.val_loader
        was_training = self.model.training
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        for x, y in loader:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                logits = self.forward(x)
            loss_sum += self.loss_fn(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            seen += y.shape[0]
        self.model.train(was_training)
        out = {f"{prefix}/loss": loss_sum.item() / max(seen, 1), f"{prefix}/clean_acc": correct.item() / max(seen, 1)}
        if robust:
            out[ADV_ACC] = self.robust_val_acc()
        return out

    def robust_val_acc(self) -> float:
        """Accuracy under the validation PGD (full ε) on the fixed validation subset. Its random starts come from
        a generator of their own, seeded alike every epoch: training draws exactly what it would without it."""
        cuda = self.device.type == "cuda"
        was_training = self.model.training
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            torch.random.default_generator.manual_seed(self.config.seed)
            if cuda:
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(self.config.seed)
            for x, y in self.val_adv_loader:
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                x_adv = self.val_attack(self.model, x, y)
                self.model.eval()
                with torch.no_grad(), self._autocast():
                    correct += (self.forward(x_adv).argmax(1) == y).sum()
                seen += y.shape[0]
        self.model.train(was_training)
        return correct.item() / max(seen, 1)

    # --- early stopping on val/adv_acc ----------------------------------------------------------------------
    def track(self, metrics: dict[str, float]) -> bool:
        """Under early stopping, remember this epoch (its weights too) if its val/adv_acc is the best so far;
        whether training should stop now. Epochs still warming up are not candidates: val/adv_acc is measured at
        the full ε, where a model trained at a fraction of it scores ~0, and a tie of zeros would otherwise stop
        the run before the full ε was ever trained and keep a warm-up epoch."""
        at = self.config.adv_training
        if at.early_stop_patience is None or ADV_ACC not in metrics:
            return False
        if self.epoch < math.ceil(max(at.eps_warmup_epochs, at.steps_warmup_epochs)):
            return False
        if self.best is None or metrics[ADV_ACC] > self.best["value"]:
            self.best = {"epoch": self.epoch, "value": metrics[ADV_ACC],
                         "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}
        return self.should_stop()

    def should_stop(self) -> bool:
        """Whether val/adv_acc has not improved for ``early_stop_patience`` epochs (also after a resume)."""
        patience = self.config.adv_training.early_stop_patience
        return patience is not None and self.best is not None and self.epoch - self.best["epoch"] >= patience

    def restore_best(self) -> int:
        """Load the best epoch's weights when early stopping tracked one; the epoch whose weights the model holds."""
        if self.best is None:
            return self.epoch
        # Always: the epoch number alone does not prove the weights (a failed epoch moves them without counting).
        self.model.load_state_dict(self.best["model"])
        return int(self.best["epoch"])

    # --- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": _state(self.scheduler),
            "complement_optimizer": _state(self.complement_optimizer),
            "complement_scheduler": _state(self.complement_scheduler),
            "torch_rng": torch.get_rng_state(),
            # Random starts of adversarial training draw from the CUDA generator there: resume it too.
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            # Early stopping's best epoch (None when off); checkpoints without the key (older ones) load as None.
            "best": self.best,
        }

    def save_checkpoint(self, path: str | Path) -> Path:
        """State dicts and the config only, never a pickled module: loadable with weights_only=True."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)  # atomic: a killed process never leaves a half-written checkpoint
        return path

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        for name in ("optimizer", "scheduler", "complement_optimizer", "complement_scheduler"):
            target = getattr(self, name)
            if target is not None and state.get(name) is not None:
                target.load_state_dict(state[name])
        torch.set_rng_state(state["torch_rng"].cpu())
        if self.device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.epoch = int(state["epoch"])
        self.best = state.get("best")


def fit(config: TrainConfig, callbacks: Sequence[Callable[[EpochEnd], bool | None]] = (), *,
        data: DataBundle | None = None, resume_from: str | Path | None = None) -> FitResult:
    """Train ``config.epochs`` epochs (continuing from a checkpoint if given), calling each callback per epoch.

    Metrics per epoch: train/loss, train/acc, train/images_per_s, val/loss, val/clean_acc (+ epoch), and
    val/adv_acc with adversarial training. Diverging training raises ``TrainingDiverged`` rather than logging
    NaNs for the rest of the run. With ``adv_training.early_stop_patience``, training also stops once val/adv_acc
    has not improved for that many epochs, and the model ends with the best epoch's weights (``kept_epoch``);
    the callbacks see each epoch's checkpoint-ready trainer before that restore.
    """
    trainer = Trainer(config, data)
    if resume_from is not None:
        trainer.load_state_dict(_load(resume_from, trainer.device))
    result = FitResult(trainer.model, config, trainer.data, trainer=trainer)
    while trainer.epoch < config.epochs and not trainer.should_stop():
        metrics = trainer.train_epoch()
        metrics.update(trainer.evaluate())
        metrics["epoch"] = trainer.epoch
        result.history.append(metrics)
        patience_out = trainer.track(metrics)  # before the callbacks: their checkpoints carry the best epoch
        stop = False
        for cb in callbacks:
            stop = bool(cb(EpochEnd(trainer.epoch, metrics, trainer))) or stop
        if stop or patience_out:
            result.stopped_early = stop or trainer.epoch < config.epochs
            break
    # A run resumed from a checkpoint already past its patience trains nothing more: it, too, stopped early.
    result.stopped_early = result.stopped_early or (trainer.should_stop() and trainer.epoch < config.epochs)
    result.kept_epoch = trainer.restore_best()
    return result


def _load(path: str | Path, device: torch.device | None = None) -> dict[str, Any]:
    state = torch.load(path, map_location=device or "cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a gce-sweeps checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """Rebuild the model from a checkpoint's config and state dict (for evaluation and reports)."""
    state = _load(path, torch.device(device))
    config = TrainConfig.from_dict(state["config"])
    from gce.data import DATASETS

    info = DATASETS[config.data.dataset].info
    model = build_model(config.model.name, input_shape=info.input_shape, num_classes=info.num_classes,
                        mean=info.mean, std=info.std, **config.model.kwargs)
    model.load_state_dict(state["model"])
    model = model.to(device)
    if _channels_last(model, config):  # the training layout, so that predictions match it bit for bit
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), config


def _channels_last(model: nn.Module, config: TrainConfig) -> bool:
    # NHWC is faster for convolutions on oneDNN (CPU) and cuDNN alike (LeNet-5 +10%, ResNet-20 +17% on the
    # CPU); a model without convolutions would only pay a copy at its flatten.
    if config.channels_last is not None:
        return config.channels_last
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _state(obj) -> dict[str, Any] | None:
    return None if obj is None else obj.state_dict()


def _optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    o = config.optim
    params = list(params)
    # One fused kernel per step instead of ~6 ops per parameter tensor: +9% LeNet-5 images/s on the CPU,
    # where the optimiser step was 15% of a small model's step. Fused kernels exist for CPU and CUDA only.
    fused = {"fused": True} if params and params[0].device.type in ("cpu", "cuda") else {}
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay, **fused)
    klass = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return klass(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, **fused)


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """Per-epoch LR schedule with optional linear warm-up; None for a constant rate."""
    s = config.schedule
    if s.name == "none" and s.warmup_epochs == 0:
        return None
    epochs = config.epochs

    def factor(epoch: int) -> float:
        if epoch < s.warmup_epochs:
            return (epoch + 1) / (s.warmup_epochs + 1)
        if s.name == "step":
            return s.gamma ** ((epoch - s.warmup_epochs) // s.step_size)
        if s.name == "cosine":
            span = max(epochs - s.warmup_epochs, 1)
            return 0.5 * (1 + math.cos(math.pi * (epoch - s.warmup_epochs) / span))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
