"""Gradient-masking diagnostics: named flags, with the numbers behind them, logged as tags on every run.

A robustness gain is only credible if the attacks behind it worked. Carlini et al. 2019, "On Evaluating
Adversarial Robustness" (https://arxiv.org/abs/1902.06705) and Athalye et al. 2018, "Obfuscated Gradients Give
a False Sense of Security" (https://arxiv.org/abs/1802.00420) list the symptoms of an attack defeated by the
model's gradients rather than by its robustness; each is a flag here:

- ``iterative_weaker_than_single_step``: an iterative attack (BIM/PGD/MIM/APGD) leaves more accuracy than FGSM.
- ``accuracy_rises_with_eps`` / ``accuracy_rises_with_steps``: a larger budget should never help the model.
- ``attack_loss_weaker_than_ce``: the same attack with another loss (e.g. the training loss, as the paper
  attacks GCE models) leaves more accuracy than with CE: that loss's gradients, not robustness, set the number.
- ``unbounded_attack_fails``: with ε covering the whole input box (L∞ ε = 1) or C&W's unbounded ε, any
  non-constant classifier can be driven to ~0 %.
- ``zero_gradients``: input gradients that are exactly zero (or non-finite) under CE or the training loss,
  e.g. a saturated softmax or a non-differentiable quantiser; the attacks then have nothing to follow.
- ``black_box_stronger`` / ``transfer_stronger``: a gradient-free random search, or PGD transferred from a
  CE-trained surrogate, beats the white-box attacks on the same examples.

``diagnose`` reads an evaluation only; ``run_checks`` also runs its own small attacks on a capped, seeded
subsample, sized to take a few seconds for LeNet-5 on 500 MNIST images on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gce.attacks import ATTACKS, AttackConfig, LossFn, build_attack, eval_mode
from gce.evaluate import RobustnessResult, batches, evaluate_robustness, format_eps, model_device, norm_of, predict
from gce.losses import cross_entropy
from gce.metrics import check_key, measurement_key
from gce.seeding import seeded
from gce.validation import check_int, is_number

__all__ = ["CHECKS", "CheckConfig", "Diagnosis", "Flag", "Measurement", "diagnose", "measurements", "run_checks"]

ITERATIVE = frozenset({"bim", "pgd", "mim", "apgd"})
#: The flags ``run_checks`` returns, in order (``diagnose`` returns the first five).
CHECKS = ("iterative_weaker_than_single_step", "accuracy_rises_with_eps", "accuracy_rises_with_steps",
          "unbounded_attack_fails", "attack_loss_weaker_than_ce", "zero_gradients", "black_box_stronger",
          "transfer_stronger")


@dataclass
class Flag:
    """One diagnostic: ``raised`` means the symptom was seen; ``skipped`` that nothing could test it."""

    name: str
    raised: bool
    detail: str
    values: dict[str, float] = field(default_factory=dict)
    skipped: bool = False

    @property
    def status(self) -> str:
        return "raised" if self.raised else "skipped" if self.skipped else "ok"


@dataclass
class Diagnosis:
    flags: list[Flag]

    @property
    def raised(self) -> bool:
        return any(f.raised for f in self.flags)

    @property
    def raised_names(self) -> list[str]:
        return [f.name for f in self.flags if f.raised]

    def __getitem__(self, name: str) -> Flag:
        for f in self.flags:
            if f.name == name:
                return f
        raise KeyError(f"no check named {name!r}; checks: {[f.name for f in self.flags]}")

    def to_tags(self, prefix: str = "check") -> dict[str, str]:
        """``check/<name>`` = raised|ok|skipped, ``check/<name>/detail`` = why; ``check/raised`` lists the
        raised ones (or "none"), so runs with a masking symptom are one tag filter away."""
        tags = {f"{prefix}/raised": ",".join(self.raised_names) or "none"}
        for f in self.flags:
            tags[f"{prefix}/{f.name}"] = f.status
            tags[f"{prefix}/{f.name}/detail"] = f.detail[:500]
        return tags

    def to_metrics(self) -> dict[str, float]:
        """The numbers behind the flags, as ``check/<name>/<value>`` metrics."""
        return {check_key(f.name, k): float(v) for f in self.flags for k, v in f.values.items()}


@dataclass
class CheckConfig:
    """Budget and thresholds of ``run_checks``. Accuracies are fractions; ``tolerance`` is the margin by which
    a stronger attack may lose to a weaker one before it counts (noise of a few hundred examples)."""

    eps: float | None = None  # None: the evaluation's primary eps (a result must then be given)
    norm: str = "linf"
    max_examples: int = 500
    steps: int = 10
    random_samples: int = 32
    tolerance: float = 0.03
    unbounded_max_acc: float = 0.02
    zero_grad_tol: float = 1e-30  # |∇x|∞ at or below this counts as zero (float32 underflow territory)
    max_zero_grad_fraction: float = 0.1
    batch_size: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_examples", "steps", "random_samples", "batch_size"):
            check_int(f"checks.{name}", getattr(self, name))
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"checks.norm must be 'linf' or 'l2'; got {self.norm!r}")
        if self.eps is not None and not (is_number(self.eps) and self.eps > 0):
            raise ValueError(f"checks.eps must be a finite number > 0 or None; got {self.eps!r}")
        for name in ("tolerance", "unbounded_max_acc", "max_zero_grad_fraction"):
            if not (is_number(getattr(self, name), 0) and getattr(self, name) <= 1):
                raise ValueError(f"checks.{name} must lie in [0, 1]; got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Measurement:
    """One robust accuracy, and what produced it; only measurements of the same ``source`` share examples."""

    source: str
    label: str
    attack: str
    loss: str
    norm: str
    eps: float
    steps: int
    acc: float

    def key(self) -> str:
        return measurement_key(self.source, self.label, self.steps, self.eps)


def measurements(result: RobustnessResult, source: str = "eval") -> list[Measurement]:
    """A standalone evaluation as measurements (chain-mode numbers are cumulative, so none come out)."""
    if not result.standalone:
        return []
    out = []
    for cfg in result.attacks:
        loss = cfg.loss or ATTACKS[cfg.name].default_loss or "none"
        steps = 1 if cfg.name == "fgsm" else cfg.steps
        out.append(Measurement(source, cfg.label(), cfg.name, loss, norm_of(cfg), cfg.eps, steps,
                               result.accuracy[cfg.label()][cfg.eps]))
    for (norm, eps), acc in result.worst_case.items():
        out.append(Measurement(source, "worst_case", "worst_case", "-", norm, eps, 0, acc))
    return out


def _rising(name: str, ms: list[Measurement], group, order, tol: float, what: str) -> Flag:
    """Raise when, within a group, accuracy rises by more than ``tol`` along ``order`` (eps or steps)."""
    groups: dict[tuple, list[Measurement]] = {}
    for m in ms:
        groups.setdefault(group(m), []).append(m)
    compared, bad, values = 0, [], {}
    for members in groups.values():
        members = sorted(members, key=order)
        if len({order(m) for m in members}) < 2:
            continue
        compared += 1
        values.update({m.key(): m.acc for m in members})
        bad += [f"{b.label} {a.acc:.3f} -> {b.acc:.3f} ({what} {order(a):g} -> {order(b):g}, {b.source})"
                for a, b in zip(members, members[1:], strict=False) if b.acc > a.acc + tol]
    if not compared:
        return Flag(name, False, f"skipped: no attack measured at two {what} values", skipped=True)
    detail = "; ".join(bad) if bad else f"accuracy never rises with {what} ({compared} series, tol {tol})"
    return Flag(name, bool(bad), detail, values)


def _iterative_vs_single(ms: list[Measurement], tol: float) -> Flag:
    name, bad, values, compared = "iterative_weaker_than_single_step", [], {}, 0
    # Like with like: an iterative attack is compared with FGSM of the same loss (a weak GCE-loss PGD against a
    # CE FGSM says the loss is weak, not that the iteration failed).
    for key in {(m.source, m.norm, m.eps, m.loss) for m in ms}:
        group = [m for m in ms if (m.source, m.norm, m.eps, m.loss) == key]
        single = [m for m in group if m.attack == "fgsm"]
        iterative = [m for m in group if m.attack in ITERATIVE]
        if not single or not iterative:
            continue
        compared += 1
        best = min(single, key=lambda m: m.acc)
        values.update({m.key(): m.acc for m in single + iterative})
        bad += [f"{m.label} {m.acc:.3f} > {best.label} {best.acc:.3f} at eps={format_eps(m.eps)} ({m.source})"
                for m in iterative if m.acc > best.acc + tol]
    if not compared:
        return Flag(name, False, "skipped: no FGSM and iterative attack at the same eps", skipped=True)
    return Flag(name, bool(bad), "; ".join(bad) or f"iterative attacks beat FGSM (tol {tol})", values)


def _loss_weaker_than_ce(ms: list[Measurement], tol: float) -> Flag:
    """The same attack and budget with another loss (the training loss, GCE, ...) leaves more accuracy than with
    CE: numbers under that loss measure the loss's gradients, not the model's robustness (the paper attacks GCE
    models with the GCE loss only)."""
    name, bad, values, compared = "attack_loss_weaker_than_ce", [], {}, 0
    ce = {(m.source, m.attack, m.norm, m.eps, m.steps): m for m in ms if m.loss == "ce"}
    for m in ms:
        ref = ce.get((m.source, m.attack, m.norm, m.eps, m.steps))
        if ref is None or m.loss in ("ce", "-"):
            continue
        compared += 1
        values.update({m.key(): m.acc, ref.key(): ref.acc})
        if m.acc > ref.acc + tol:
            bad.append(f"{m.label} {m.acc:.3f} > {ref.label} {ref.acc:.3f} at eps={format_eps(m.eps)} ({m.source})")
    if not compared:
        return Flag(name, False, "skipped: no attack run with both CE and another loss", skipped=True)
    return Flag(name, bool(bad), "; ".join(bad) or f"no attack loss is weaker than CE (tol {tol})", values)


def _unbounded(ms: list[Measurement], max_acc: float) -> Flag:
    name = "unbounded_attack_fails"
    unbounded = [m for m in ms if m.attack != "worst_case" and (math.isinf(m.eps) or (m.norm == "linf" and m.eps >= 1))]
    if not unbounded:
        return Flag(name, False, "skipped: no unbounded attack", skipped=True)
    bad = [f"{m.label} at eps={format_eps(m.eps)} leaves {m.acc:.3f} ({m.source})"
           for m in unbounded if m.acc > max_acc]
    return Flag(name, bool(bad), "; ".join(bad) or f"unbounded attacks reach <= {max_acc}",
                {m.key(): m.acc for m in unbounded})


def diagnose(result: RobustnessResult, config: CheckConfig | None = None) -> Diagnosis:
    """The flags an evaluation alone can raise (no new attacks): iterative vs single step, ε, steps, unbounded,
    attack loss.
    Needs a standalone evaluation: chain-mode accuracies are cumulative, so every flag comes back skipped."""
    return _diagnose(measurements(result), config or CheckConfig())


def _diagnose(ms: list[Measurement], cfg: CheckConfig) -> Diagnosis:
    tol = cfg.tolerance
    return Diagnosis([
        _iterative_vs_single(ms, tol),
        _rising("accuracy_rises_with_eps", ms, lambda m: (m.source, m.label, m.norm, m.steps), lambda m: m.eps, tol,
                "eps"),
        _rising("accuracy_rises_with_steps", ms, lambda m: (m.source, m.label, m.norm, m.eps), lambda m: m.steps,
                tol, "steps"),
        _unbounded(ms, cfg.unbounded_max_acc),
        _loss_weaker_than_ce(ms, tol),
    ])


def _grad_inf_norm(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    """Per-example max |∂loss/∂x| (the max norm never underflows in a square, unlike the L2 norm)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(x), y, reduction="none")
        if not loss.requires_grad:  # the output does not depend on the input at all
            return torch.zeros(len(y), device=x.device)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad.flatten(1).abs().amax(1)


def _zero_gradients(model, x, y, losses: dict[str, LossFn], cfg: CheckConfig) -> Flag:
    if len(y) == 0:
        return Flag("zero_gradients", False, "skipped: no clean-correct example", skipped=True)
    values, bad = {}, []
    for name, loss_fn in losses.items():
        norms = torch.cat([_grad_inf_norm(model, x[i:i + cfg.batch_size], y[i:i + cfg.batch_size], loss_fn)
                           for i in range(0, len(y), cfg.batch_size)])
        zero = (~torch.isfinite(norms) | (norms <= cfg.zero_grad_tol)).float().mean().item()
        values[f"zero_fraction/{name}"] = zero
        values[f"median_grad/{name}"] = norms.median().item()
        if zero > cfg.max_zero_grad_fraction:
            bad.append(f"{zero:.1%} of examples have a zero or non-finite input gradient under {name}")
    return Flag("zero_gradients", bool(bad), "; ".join(bad) or
                f"input gradients are non-zero (<= {cfg.max_zero_grad_fraction:.0%} zero)", values)


@torch.no_grad()
def _random_search(model: nn.Module, x: Tensor, y: Tensor, cfg: CheckConfig, eps: float) -> Tensor:
    """Gradient-free attack: best of N random corners of the L∞ ball (or random directions at L2 radius ε).
    Returns the per-example robust flags."""
    robust = predict(model, x) == y
    for _ in range(cfg.random_samples):
        todo = robust.nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        if cfg.norm == "linf":
            noise = eps * (torch.randint(0, 2, x[todo].shape, device=x.device) * 2 - 1)
        else:
            noise = torch.randn_like(x[todo])
            noise = noise * eps / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        robust[todo] = predict(model, (x[todo] + noise).clamp(0, 1)) == y[todo]
    return robust


def _stronger(name: str, what: str, attack_acc: float | None, white_box: float, tol: float) -> Flag:
    if attack_acc is None:
        return Flag(name, False, f"skipped: no {what} (pass a surrogate model)", skipped=True)
    raised = attack_acc < white_box - tol
    relation = "beats" if raised else "does not beat"
    return Flag(name, raised, f"{what} leaves {attack_acc:.3f}, {relation} white-box worst case {white_box:.3f} "
                f"(tol {tol})", {"attack_acc": attack_acc, "white_box_acc": white_box})


def run_checks(model: nn.Module, data, config: CheckConfig | None = None, *, result: RobustnessResult | None = None,
               train_loss: LossFn | None = None, surrogate: nn.Module | None = None) -> Diagnosis:
    """All flags: those of ``diagnose(result)`` (when given) merged with small attacks of this module's own on
    ``config.max_examples`` examples: FGSM, PGD-CE (steps/4 and steps), PGD-train, PGD at ε/2 and unbounded
    (L∞ ε = 1, L2 ε = √d), input gradients, random search and, with a surrogate, a transfer attack."""
    cfg = config or CheckConfig()
    eps = cfg.eps if cfg.eps is not None else (result.primary[1] if result and result.primary else None)
    if eps is None or not math.isfinite(eps):
        raise ValueError("checks.eps: give an eps, or an evaluation result with a finite primary eps")
    device = model_device(model)
    parts = list(batches(data, cfg.batch_size, device=device, max_examples=cfg.max_examples, seed=cfg.seed))
    if not parts:
        raise ValueError("data: no examples")
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    big = 1.0 if cfg.norm == "linf" else math.sqrt(x[0].numel())
    pgd = dict(name="pgd", norm=cfg.norm, steps=cfg.steps)
    attacks = [AttackConfig(name="fgsm", eps=eps, norm=cfg.norm), AttackConfig(eps=eps, **pgd),
               AttackConfig(eps=eps / 2, **pgd), AttackConfig(eps=big, **pgd)]
    if train_loss is cross_entropy:  # a CE-trained model: the "train" attack would repeat PGD-CE
        train_loss = None
    if train_loss is not None:
        attacks.append(AttackConfig(eps=eps, loss="train", **pgd))
    # Final-iterate, independent radii (fast=False): rising accuracy with ε or steps is what is looked for here,
    # and nested radii could not show it.
    run = dict(train_loss=train_loss, batch_size=cfg.batch_size, seed=cfg.seed, primary_eps=eps, fast=False)
    own = evaluate_robustness(model, (x, y), attacks, **run)
    short = evaluate_robustness(model, (x, y), [AttackConfig(eps=eps, **{**pgd, "steps": max(1, cfg.steps // 4)})],
                                **run)
    ms = measurements(own, "check") + [m for m in measurements(short, "check") if m.attack != "worst_case"]
    if result is not None:
        ms += measurements(result, "eval")
    flags = _diagnose(ms, cfg).flags
    white_box = own.worst_case[(cfg.norm, eps)]
    losses = {"ce": cross_entropy} | ({"train": train_loss} if train_loss is not None else {})
    keep = own.clean_correct.to(device)
    with eval_mode(model), seeded(cfg.seed, device):
        flags.append(_zero_gradients(model, x[keep], y[keep], losses, cfg))
        random_acc = _random_search(model, x, y, cfg, eps).float().mean().item()
        flags.append(_stronger("black_box_stronger", "random search", random_acc, white_box, cfg.tolerance))
        transfer_acc = None
        if surrogate is not None:
            transfer_acc = _transfer(model, surrogate, x, y, keep, AttackConfig(eps=eps, **pgd), cfg.batch_size)
        flags.append(_stronger("transfer_stronger", "transfer from the surrogate", transfer_acc, white_box,
                               cfg.tolerance))
    return Diagnosis(flags)


def _transfer(model, surrogate, x, y, keep, attack: AttackConfig, batch_size: int) -> float:
    """PGD-CE crafted on the surrogate, scored on the model: accuracy over all examples (clean errors count)."""
    craft, robust = build_attack(attack), keep.clone()
    idx = keep.nonzero().squeeze(1)
    for i in range(0, len(idx), batch_size):
        j = idx[i:i + batch_size]
        robust[j] = predict(model, craft(surrogate, x[j], y[j])) == y[j]
    return robust.float().mean().item()
