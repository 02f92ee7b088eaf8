"""What every attack shares: the ``Attack`` base class, argument checks, and the geometry of the threat models.

Conventions, for every attack in this package:

- ``attack(model, x, y) -> x_adv``: ``x`` of shape (B, ...) in [0, 1] pixel space (normalisation lives in the
  model), ``y`` of shape (B,) holding the true labels, or the *target* labels when ``targeted=True``.
- The attack loss is called as ``loss_fn(logits, y, reduction="none")`` and must return per-sample losses of
  shape (B,): restarts and APGD keep a per-example best, which a batch mean cannot give. Untargeted attacks
  *maximise* it at the true label; targeted attacks *minimise* it at the target label. Every loss in
  ``gce.losses`` and ``gce.attacks.losses`` follows this signature.
- The model runs in eval mode and every module's train/eval flag is restored afterwards; gradients are taken
  with ``torch.autograd.grad`` w.r.t. the input only, so the parameters' ``.grad`` is never touched.
- The perturbation is computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import ClassVar

import torch
from torch import Tensor, nn

from gce.losses import cross_entropy
from gce.validation import check_int, check_number

__all__ = ["Attack", "LossFn", "ascent_direction", "eval_mode", "inference_forward", "input_grad", "logits_of",
           "project", "random_start_point"]

LossFn = Callable[..., Tensor]


def check_norm(attack: str, norm: str, allowed: tuple[str, ...]) -> None:
    if norm not in allowed:
        raise ValueError(f"norm {norm!r} is not supported by attack {attack!r}; allowed values: {list(allowed)}")


def check_loss_fn(loss_fn: object) -> None:
    """Reject a loss that cannot be asked for per-sample values, before the first batch rather than in it."""
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as loss_fn(logits, y, reduction='none'); got {loss_fn!r}")
    try:
        params = inspect.signature(loss_fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: checked on the first call instead
        return
    if not any(p.name == "reduction" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise ValueError(
            "loss_fn must accept a `reduction` keyword: attacks call loss_fn(logits, y, reduction='none') and "
            f"need per-sample losses of shape (batch,); got {loss_fn!r}"
        )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the model in eval mode, then restore *each* module's flag (a frozen BatchNorm stays frozen)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters out of autograd while an attack runs: backward then computes the input's gradient only
    (no weight-gradient kernels, no graph kept for them); each flag is restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


_INFERENCE: ContextVar[tuple[nn.Module, Callable[[Tensor], Tensor]] | None] = ContextVar("gce_inference", default=None)


def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    """The model's logits where no gradient is needed (queries, success checks), through its inference-compiled
    twin when the evaluation set one up (``inference_forward``), else the model itself."""
    compiled = _INFERENCE.get()
    with torch.no_grad():
        if compiled is not None and compiled[0] is model and x.dtype == torch.float32:
            return compiled[1](x)
        return model(x)


def twin_active(model: nn.Module) -> bool:
    """Whether ``logits_of(model, ·)`` runs a compiled twin now (whose decisions the model must confirm)."""
    compiled = _INFERENCE.get()
    return compiled is not None and compiled[0] is model


@contextmanager
def inference_forward(model: nn.Module, example: Tensor) -> Iterator[bool]:
    """While it lasts, ``logits_of(model, ·)`` runs a frozen, operator-fused TorchScript copy of the model
    (weights pre-packed for oneDNN: ~4x a LeNet-5's eager forward on the CPU, where eager re-lays the weights
    out on every call). Set up only on the CPU and only when the copy gives the eager model's predictions on
    two batch sizes; otherwise (a model TorchScript cannot trace, a data-dependent forward) nothing changes.
    Yields whether the copy is in use. The model must stay in eval mode with fixed weights meanwhile."""
    compiled = _compile_inference(model, example) if example.device.type == "cpu" else None
    token = _INFERENCE.set((model, compiled) if compiled is not None else None)
    try:
        yield compiled is not None
    finally:
        _INFERENCE.reset(token)


def _compile_inference(model: nn.Module, example: Tensor) -> Callable[[Tensor], Tensor] | None:
    import warnings

    x = example.detach().float()[:16]
    if len(x) < 2:
        return None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model.eval(), x)))
            for batch in (x, x[: len(x) // 2 + 1]):  # another batch size: a traced-in shape would show here
                eager, fast = model(batch), frozen(batch)
                if fast.shape != eager.shape or not torch.equal(fast.argmax(1), eager.argmax(1)) \
                        or not torch.allclose(fast, eager, rtol=1e-3, atol=1e-4):
                    return None
    except Exception:  # noqa: BLE001 - anything TorchScript refuses leaves the eager model in charge
        return None
    return frozen


def input_grad(output: Tensor, x: Tensor, retain_graph: bool = False) -> Tensor:
    """∂output/∂x by ``torch.autograd.grad`` (parameters' ``.grad`` untouched); zeros where the output does
    not depend on x at all - a fully masked model gets a zero step, not an error (``gce.checks`` flags it)."""
    if not output.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(output, x, retain_graph=retain_graph, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad.detach()


def _per_example_norm(t: Tensor) -> Tensor:
    """L2 norm over all but the batch dimension, shaped (B, 1, ..., 1) to broadcast against ``t``."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def ascent_direction(grad: Tensor, norm: str) -> Tensor:
    """Steepest-ascent direction of unit size in ``norm``: sign(g) for L∞, g/‖g‖₂ for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / (_per_example_norm(grad) + 1e-10)


def project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Project onto the ε-ball around ``x`` intersected with [0, 1].

    L∞ clamps to [x−ε, x+ε] directly rather than re-adding a clamped delta, so no rounding moves a point that is
    already inside. Clamping to [0, 1] after the L2 rescale only shortens each coordinate, so it stays inside.
    """
    if norm == "linf":
        return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    delta = x_adv - x
    factor = torch.clamp(eps / _per_example_norm(delta).clamp_min(1e-12), max=1.0)  # no 0/0 when ε = ‖δ‖ = 0
    return (x + delta * factor).clamp(0.0, 1.0)


def cast_into_ball(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """``x_adv`` (float32) in the dtype of ``x``, still inside the threat model *after* the rounding.

    Attacks run in float32; rounding the result to bf16/fp16 can land a coordinate up to half a unit in the last
    place outside [x − ε, x + ε] (FGSM ε = 0.3 on bf16: |δ| = 0.3018). Measured in float64 (exact for every float
    dtype), such a coordinate is moved one representable step back towards x; an L2 perturbation is shrunk until
    its rounded norm fits."""
    out = x_adv.to(x.dtype)
    if out.dtype == x_adv.dtype or not math.isfinite(eps):
        return out
    x64 = x.double()
    if norm == "linf":
        outside = (out.double() - x64).abs() > eps
        return torch.where(outside, torch.nextafter(out, x), out)
    delta = x_adv.double() - x64
    for _ in range(16):
        norms = _per_example_norm(out.double() - x64)
        over = norms > eps
        if not over.any():
            break
        delta = torch.where(over, delta * (eps / norms) * (1 - 2.0 ** -8), delta)
        out = (x64 + delta).clamp(0.0, 1.0).to(x.dtype)
    return out


def random_start_point(x: Tensor, eps: float, norm: str) -> Tensor:
    """Madry et al.'s random start: uniform in the L∞ box, or a Gaussian direction at radius U(0, ε) for L2."""
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        delta = torch.randn_like(x)
        radius = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
        delta = delta / (_per_example_norm(delta) + 1e-12) * radius * eps
    return (x + delta).clamp(0.0, 1.0)


class Attack:
    """Base class: ``__call__`` checks inputs, switches to eval mode, runs ``perturb`` with restarts, restores.

    Subclasses set ``name``, ``norms`` (the first is the default) and implement ``perturb``. Restarts are run
    one after another on the examples no earlier run has fooled (AutoAttack's bookkeeping); per example, the
    first candidate that fools is kept, else the one with the highest attack objective.

    ``build_attack`` passes each ``AttackConfig`` field named like a constructor parameter (or mapped to one by
    ``aliases``), and builds ``loss_fn`` from the config's loss when the constructor takes one.
    """

    name: ClassVar[str] = ""
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    default_loss: ClassVar[str | None] = "ce"
    randomized: ClassVar[bool] = True  # False: every run gives the same answer, so restarts > 1 is refused
    unbounded: ClassVar[bool] = False  # True: eps = inf is allowed (a minimal-perturbation attack)
    default_random_start: ClassVar[bool] = False  # for attacks with a ``random_start`` option
    aliases: ClassVar[dict[str, str]] = {}  # constructor parameter -> the AttackConfig field that feeds it
    #: Set by the evaluation engine: an example leaves the working batch once an iterate fools it (AutoAttack's
    #: any-iterate semantics: the same or a stronger result, fewer steps). Off = the final-iterate behaviour.
    early_stop: bool = False

    def __init__(
        self,
        eps: float,
        *,
        norm: str | None = None,
        loss_fn: LossFn | None = None,
        targeted: bool = False,
        restarts: int = 1,
    ) -> None:
        self.norm = self.norms[0] if norm is None else norm
        check_norm(self.name, self.norm, self.norms)
        check_number("eps", eps, allow_inf=self.unbounded)
        check_int("restarts", restarts)
        if restarts > 1 and not self.randomized:
            raise ValueError(f"restarts > 1 needs a randomised attack; {self.name} is deterministic here")
        self.loss_fn = cross_entropy if loss_fn is None else loss_fn
        check_loss_fn(self.loss_fn)
        if not isinstance(targeted, bool):
            raise ValueError(f"targeted must be a bool; got {targeted!r}")
        self.eps, self.targeted, self.restarts = float(eps), targeted, restarts

    def _random_start(self, random_start: bool | None) -> bool:
        """The ``random_start`` option resolved against the class default; restarts > 1 need it on."""
        start = self.default_random_start if random_start is None else random_start
        if not isinstance(start, bool):
            raise ValueError(f"random_start must be a bool or None; got {random_start!r}")
        if self.restarts > 1 and not start:
            raise ValueError(f"restarts > 1 needs random_start=True ({self.name} is deterministic without it)")
        return start

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """One run of the attack on a float32 batch; called by ``__call__`` once per restart, in eval mode
        with gradients enabled. Returns x_adv of the same shape, inside the threat model."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "loss_fn")
        return f"{type(self).__name__}({fields})"

    # -- helpers the attacks share --------------------------------------------------------------------------
    def objective(self, logits: Tensor, y: Tensor) -> Tensor:
        """Per-sample value the attack maximises: the loss (untargeted) or minus the loss (targeted)."""
        loss = self.loss_fn(logits, y, reduction="none")
        if not isinstance(loss, Tensor) or loss.shape != (logits.shape[0],):
            got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn(logits, y, reduction='none') must return per-sample losses of shape "
                f"({logits.shape[0]},); got {got}"
            )
        loss = loss.float()
        return -loss if self.targeted else loss

    def fooled(self, logits: Tensor, y: Tensor) -> Tensor:
        """Whether each example reached the attack's goal: misclassified, or classified as its target."""
        pred = logits.argmax(dim=1)
        return pred == y if self.targeted else pred != y

    def gradient(self, model: nn.Module, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(∇ₓ objective, objective, logits) at ``x_adv``; the gradient w.r.t. the input only."""
        x_adv = x_adv.detach().requires_grad_(True)
        logits = model(x_adv)
        objective = self.objective(logits, y)
        return input_grad(objective.sum(), x_adv), objective.detach(), logits.detach()

    # -- the entry point ------------------------------------------------------------------------------------
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """x_adv for the batch (x, y): same shape and dtype as x, inside the threat model, in [0, 1].

        Works under ``torch.no_grad()`` (it re-enables gradients), not under ``torch.inference_mode()``.
        """
        _check_batch(x, y)
        if torch.is_inference_mode_enabled():
            raise RuntimeError("attacks need autograd: call them outside torch.inference_mode()")
        with eval_mode(model), frozen_parameters(model), torch.enable_grad():
            x32, y = x.detach().float(), y.detach()
            x_adv = self.perturb(model, x32, y)
            if self.restarts > 1:
                x_adv = self._restart(model, x32, y, x_adv)
        return cast_into_ball(x_adv.detach(), x, self.eps, self.norm)

    def _restart(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> Tensor:
        with torch.no_grad():
            logits = model(x_adv)
            best, fooled = self.objective(logits, y), self.fooled(logits, y)
        for _ in range(self.restarts - 1):
            todo = (~fooled).nonzero().squeeze(1)  # a sync per restart, not per step
            if todo.numel() == 0:
                break
            candidate = self.perturb(model, x[todo], y[todo])
            with torch.no_grad():
                logits = model(candidate)
                c_best, c_fooled = self.objective(logits, y[todo]), self.fooled(logits, y[todo])
            better = c_fooled | (c_best > best[todo])
            idx = todo[better]
            x_adv[idx], best[idx], fooled[idx] = candidate[better], c_best[better], c_fooled[better]
        return x_adv


def _check_batch(x: object, y: object) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating-point tensor of shape (batch, ...); got {_describe(x)}")
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
        raise ValueError(f"y must be an int64 tensor of shape ({x.shape[0]},); got {_describe(y)}")
    if x.numel() and bool(((x < 0) | (x > 1)).any()):  # one sync per batch
        lo, hi = torch.aminmax(x)
        raise ValueError(f"x must lie in [0, 1] (normalisation belongs in the model); got [{lo:.4g}, {hi:.4g}]")


def _describe(t: object) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
