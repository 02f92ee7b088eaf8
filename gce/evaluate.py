"""Clean and per-example worst-case robust accuracy over a list of attacks, per attack and per ε.

Worst-case accounting follows AutoAttack (Croce & Hein 2020, https://arxiv.org/abs/2003.01690): a point is
robust at a threat model (norm, ε) only if it is classified correctly and *no* attack at that (norm, ε) fools
it. ``standalone=True`` runs every attack on every clean-correct point (each attack's number is its own);
``standalone=False`` is AutoAttack's chain, where each attack only runs on points no earlier attack fooled -
cheaper, the same worst case, but each attack's number is then cumulative. Only one batch of adversarial
images exists at a time; what is kept per example is a boolean flag.

The latent-cluster metrics the GCE paper argues about are in ``gce.latent``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gce.attacks import ATTACKS, AttackConfig, LossFn, build_attack, eval_mode
from gce.attacks.base import inference_forward
from gce.data import Split
from gce.metrics import clean_key, format_eps, robust_key, worst_case_key
from gce.seeding import seeded
from gce.validation import check_int

__all__ = ["RobustnessCurve", "RobustnessResult", "batches", "evaluate_robustness", "expand_eps", "format_eps",
           "model_device", "norm_of", "predict"]

ThreatModel = tuple[str, float]  # (norm, eps)
#: attacks spending most of their time in forward-only queries (Square) or checks (FAB): worth a compiled twin
QUERYING = frozenset({"square", "fab", "fab_t", "autoattack"})


def expand_eps(config: AttackConfig, eps: Sequence[float]) -> list[AttackConfig]:
    """One copy of ``config`` per ε (an attack's robustness curve); ValueError on an empty list."""
    if isinstance(eps, (int, float)) or len(eps) == 0:
        raise ValueError(f"eps must be a non-empty list of radii; got {eps!r}")
    return [dataclasses.replace(config, eps=float(e)) for e in eps]


def norm_of(config: AttackConfig) -> str:
    """The norm an attack config runs in (its own, or the attack's default)."""
    return config.norm or ATTACKS[config.name].norms[0]


@dataclass
class RobustnessCurve:
    """Accuracy against ε for every attack of one norm (NaN where an attack did not run at that ε), for a plot."""

    norm: str
    eps: list[float]
    clean_acc: float
    accuracy: dict[str, list[float]]  # attack label (and "worst_case") -> accuracy at each eps
    cumulative: bool  # chain mode: attack i's accuracy includes the attacks before it


@dataclass
class RobustnessResult:
    """Output of ``evaluate_robustness``; accuracies are fractions in [0, 1] over ``n`` examples."""

    n: int
    clean_acc: float
    attacks: list[AttackConfig]
    accuracy: dict[str, dict[float, float]]  # label -> eps -> accuracy (cumulative when not standalone)
    worst_case: dict[ThreatModel, float]  # (norm, eps) -> per-example worst case over its attacks and smaller eps
    clean_correct: Tensor  # (n,) bool
    robust: dict[tuple[str, float], Tensor]  # (label, eps) -> (n,) bool, robust under that attack
    worst_robust: dict[ThreatModel, Tensor]  # (norm, eps) -> (n,) bool
    standalone: bool
    primary: ThreatModel | None  # the threat model of the headline ``robust_acc/worst_case``
    chain: dict[str, dict[float, float]] = dataclasses.field(default_factory=dict)  # chain member -> eps -> acc

    @property
    def cumulative(self) -> bool:
        """True in chain mode: per-attack numbers count the attacks before it, only the worst case is comparable."""
        return not self.standalone

    def to_metrics(self, prefix: str = "val") -> dict[str, float]:
        """Flat keys of the metric schema (``gce.metrics``): clean accuracy, each attack at each ε, the worst case
        per threat model and the headline worst case at the primary one. Chain-mode per-attack numbers are
        cumulative and go under their own group, never comparable to another run's standalone numbers."""
        out = {clean_key(prefix): self.clean_acc}
        for label, by_eps in self.accuracy.items():
            for eps, acc in by_eps.items():
                out[robust_key(prefix, label, eps, chain=self.cumulative)] = acc
        for label, by_eps in self.chain.items():  # AutoAttack's members: cumulative by definition
            for eps, acc in by_eps.items():
                out[robust_key(prefix, label, eps, chain=True)] = acc
        for (norm, eps), acc in self.worst_case.items():
            out[worst_case_key(prefix, norm, eps)] = acc
        if self.primary is not None:
            out[worst_case_key(prefix)] = self.worst_case[self.primary]
        return out

    def label_of(self, config: AttackConfig) -> str:
        """The label an attack's numbers are kept under (``accuracy``, ``robust``)."""
        return config.label()

    def curves(self) -> dict[str, RobustnessCurve]:
        """One accuracy-vs-ε curve per norm."""
        out = {}
        for norm in dict.fromkeys(n for n, _ in self.worst_case):
            grid = sorted(e for n, e in self.worst_case if n == norm)
            series = {self.label_of(cfg): [self.accuracy[self.label_of(cfg)].get(e, math.nan) for e in grid]
                      for cfg in self.attacks if norm_of(cfg) == norm}
            series["worst_case"] = [self.worst_case[(norm, e)] for e in grid]
            out[norm] = RobustnessCurve(norm, grid, self.clean_acc, series, self.cumulative)
        return out


def batches(data, batch_size: int = 500, *, device: torch.device | str | None = None,
            max_examples: int | None = None, seed: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """(x float in [0, 1], y int64) batches from a Split, an (images, labels) pair, a DeviceLoader or any
    iterable of batches. ``max_examples`` caps the count: a seeded random subset for a Split or a pair (splits
    may be sorted by class), the first batches of a loader."""
    check_int("batch_size", batch_size)
    if max_examples is not None:
        check_int("max_examples", max_examples)
    if isinstance(data, Split) or (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)):
        images, labels = (data.images, data.labels) if isinstance(data, Split) else data
        if max_examples is not None and max_examples < len(labels):
            index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:max_examples]
            images, labels = images[index.to(images.device)], labels[index.to(labels.device)]
        data = ((images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(labels), batch_size))
    elif not isinstance(data, Iterable):
        raise ValueError(f"data must be a Split, an (images, labels) pair or an iterable of batches; got {type(data)}")
    seen = 0
    for x, y in data:
        if max_examples is not None and seen >= max_examples:
            return
        if max_examples is not None:
            x, y = x[:max_examples - seen], y[:max_examples - seen]
        seen += len(y)
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
        yield (x, y) if device is None else (x.to(device), y.to(device))


def attack_in_chunks(attack, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The attack on the whole batch, or, when the accelerator runs out of memory, on halves (recursively):
    evaluation batches can be as large as the device allows (``batch_size`` = all examples on CUDA) without
    a trial failing on a bigger model. Deterministic attacks give the same result in any split; randomised
    ones (random starts) draw other noise once a split happened."""
    try:
        return attack(model, x, y)
    except torch.OutOfMemoryError:
        if len(y) <= 1:
            raise
    # Retried outside the handler: inside it, the traceback would keep the failed attempt's tensors alive.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(y) // 2
    return torch.cat([attack_in_chunks(attack, model, x[:half], y[:half]),
                      attack_in_chunks(attack, model, x[half:], y[half:])])


def evaluate_robustness(model: nn.Module, data, attacks: Sequence[AttackConfig], *, train_loss: LossFn | None = None,
                        standalone: bool = True, primary_eps: float | None = None, primary_norm: str | None = None,
                        batch_size: int = 500, max_examples: int | None = None,
                        seed: int | None = 0, fast: bool = True,
                        surrogate: nn.Module | None = None) -> RobustnessResult:
    """Clean accuracy and robust accuracy per attack, per ε and per-example worst case (module docstring).

    The primary threat model (the headline ``robust_acc/worst_case``) defaults to the *largest finite* ε of
    the L∞ attacks (else of the first attack's norm): the strongest bounded budget is where real robustness
    and gradient masking part ways, and the paper headlines it (MNIST ε = 0.3). An infinite budget measures
    attack success, not robustness, so it is never the default. ``seed`` seeds the attacks' randomness
    without touching the global RNG; deterministic attacks give the same worst case in both modes and for
    any ``batch_size``. An empty attack list gives clean accuracy only.

    ``fast`` spends no work that cannot change the answer: an attack's examples leave its working batch once an
    iterate fools them (the fooling iterate is the answer), and the radii of one attack run in increasing
    order, each only on the examples the attack did not fool at a smaller ε (the balls are nested, so that
    adversarial example is one at the larger ε too). Per example, a deterministic attack then follows the same
    trajectory until it is fooled, so robust accuracy is the same or lower (stronger); a randomised attack
    draws other random starts once batches differ, so for it this holds up to sampling noise. ``fast=False``
    reproduces the final-iterate, one-ε-at-a-time numbers exactly (the gradient-masking checks use it: nested
    numbers cannot rise with ε by construction).

    ``surrogate``: a transfer evaluation (``gce.transfer``) - the attacks run on the surrogate (to their final
    iterate: that the surrogate is fooled says nothing of the model, and ``train_loss`` is then the surrogate's)
    and their examples are scored on ``model``; every attack standalone, chains' member records left out.
    """
    attacks = list(attacks)
    groups = _group(attacks)
    primary = _primary(groups, primary_eps, primary_norm)
    device = model_device(model)
    attacker = model if surrogate is None else surrogate
    if model_device(attacker) != device:
        raise ValueError(f"surrogate: on {model_device(attacker)}, the model on {device}; put both on one device")
    standalone = standalone or surrogate is not None
    built = {(cfg.label(), cfg.eps): build_attack(cfg, train_loss=train_loss) for cfg in attacks}
    for attack in built.values():
        attack.early_stop = fast and surrogate is None
    correct_parts, flag_parts = [], {key: [] for key in built}
    chain_parts: dict[tuple[str, float], list[Tensor]] = {}
    worst_parts = {tm: [] for tm in groups}
    norms = list(dict.fromkeys(n for n, _ in groups))
    order = sorted(groups, key=lambda tm: (norms.index(tm[0]), tm[1])) if fast else list(groups)
    querying = fast and any(cfg.name in QUERYING for cfg in attacks)
    with eval_mode(model), eval_mode(attacker), seeded(seed, device), contextlib.ExitStack() as stack:
        for x, y in batches(data, batch_size, device=device, max_examples=max_examples, seed=seed or 0):
            if querying:  # once, on the first batch: forward-only attacks query through a compiled twin
                stack.enter_context(inference_forward(attacker, x))
                querying = False
            correct = predict(model, x) == y
            correct_parts.append(correct.cpu())
            beaten: dict[tuple[str, str], Tensor] = {}  # (label, norm) -> fooled by it at a smaller ε (fast)
            for tm in order:
                alive = correct.clone()
                for cfg in groups[tm]:
                    attack, key = built[(cfg.label(), cfg.eps)], (cfg.label(), tm[0])
                    todo = correct if standalone else alive
                    if key in beaten:
                        todo = todo & ~beaten[key]
                    todo = todo.nonzero().squeeze(1)
                    ok = torch.zeros_like(correct)
                    record = getattr(attack, "record", None) if surrogate is None else None
                    if record is not None:
                        record.clear()
                    if todo.numel():
                        x_adv = attack_in_chunks(attack, attacker, x[todo], y[todo])
                        _check_threat_model(cfg, tm, x_adv, x[todo])
                        ok[todo] = predict(model, x_adv) == y[todo]
                    if record is not None:
                        _chain_flags(chain_parts, cfg.eps, attack.labels(), record, todo, ok)
                    flag_parts[(cfg.label(), cfg.eps)].append(ok.cpu())
                    alive &= ok
                    if fast:
                        beaten[key] = correct & ~ok
                worst_parts[tm].append(alive.cpu())
    if not correct_parts:
        raise ValueError("data: no examples to evaluate")
    clean = torch.cat(correct_parts)
    robust = {key: torch.cat(parts) for key, parts in flag_parts.items()}
    worst = _nested({tm: torch.cat(parts) for tm, parts in worst_parts.items()})
    accuracy: dict[str, dict[float, float]] = {}
    for (label, eps), flags in robust.items():
        accuracy.setdefault(label, {})[eps] = flags.float().mean().item()
    chain: dict[str, dict[float, float]] = {}
    for (label, eps), parts in chain_parts.items():
        chain.setdefault(label, {})[eps] = torch.cat(parts).float().mean().item()
    return RobustnessResult(len(clean), clean.float().mean().item(), attacks, accuracy,
                            {tm: w.float().mean().item() for tm, w in worst.items()}, clean, robust, worst,
                            standalone, primary, chain)


def _chain_flags(parts: dict, eps: float, labels: list[str], record: list[dict[str, Tensor]], todo: Tensor,
                 ok: Tensor) -> None:
    """A chain attack's (AutoAttack's) cumulative robust flags per member, over the whole batch: its calls
    (one, or several when memory split the batch) in order, robust where no member up to this one fooled.
    With nothing left to attack (no call), every member's flags are the attack's: all False."""
    for label in labels:
        flags = torch.zeros_like(ok)
        if record:
            flags[todo] = ~torch.cat([r[label] for r in record])
        parts.setdefault((label, eps), []).append(flags.cpu())


def _nested(worst: dict[ThreatModel, Tensor]) -> dict[ThreatModel, Tensor]:
    """Balls of one norm are nested: an example fooled within ε is fooled within every larger ε, so the
    worst case at ε also counts the successes of every attack at smaller radii (never rises with ε)."""
    out = {}
    for norm in dict.fromkeys(n for n, _ in worst):
        alive = None
        for eps in sorted(e for n, e in worst if n == norm):
            flags = worst[(norm, eps)]
            alive = flags if alive is None else alive & flags
            out[(norm, eps)] = alive
    return {tm: out[tm] for tm in worst}


def _group(attacks: list[AttackConfig]) -> dict[ThreatModel, list[AttackConfig]]:
    groups: dict[ThreatModel, list[AttackConfig]] = {}
    seen_keys: dict[tuple[str, str], float] = {}
    for cfg in attacks:
        if not isinstance(cfg, AttackConfig):
            raise ValueError(f"attacks must be AttackConfig objects; got {type(cfg).__name__}")
        if cfg.targeted:
            raise ValueError(f"attacks: {cfg.label()} is targeted; robust accuracy needs untargeted attacks")
        norm, key = norm_of(cfg), format_eps(cfg.eps)
        if (norm, key) in seen_keys and seen_keys[(norm, key)] != cfg.eps:
            raise ValueError(f"attacks: eps {seen_keys[(norm, key)]!r} and {cfg.eps!r} give the same key eps_{key}")
        seen_keys[(norm, key)] = cfg.eps
        if any(c.label() == cfg.label() for c in groups.get((norm, cfg.eps), [])):
            raise ValueError(f"attacks: two configs share label {cfg.label()!r} at eps={key}; give one budget per "
                             "attack label")
        groups.setdefault((norm, cfg.eps), []).append(cfg)
    return groups


def _primary(groups: dict[ThreatModel, list], eps: float | None, norm: str | None) -> ThreatModel | None:
    norms = list(dict.fromkeys(n for n, _ in groups))
    if not norms:
        if eps is not None or norm is not None:
            raise ValueError("primary_eps/primary_norm: given but the attack list is empty")
        return None
    norm = norm or ("linf" if "linf" in norms else norms[0])
    radii = sorted(e for n, e in groups if n == norm)
    if not radii:
        raise ValueError(f"primary_norm: no attack uses norm {norm!r}; norms present: {norms}")
    if eps is None:
        finite = [e for e in radii if math.isfinite(e)]
        return norm, (finite or radii)[-1]
    match = [e for e in radii if format_eps(e) == format_eps(eps)]
    if not match:
        raise ValueError(f"primary_eps: {eps!r} is not among the {norm} attacks' eps {radii}")
    return norm, match[0]


def _check_threat_model(cfg: AttackConfig, tm: ThreatModel, x_adv: Tensor, x: Tensor) -> None:
    """An attack that leaves its ε-ball or [0, 1] would report false robustness gains: refuse its result."""
    norm, eps = tm
    if norm not in ("linf", "l2") or math.isinf(eps) or x_adv.numel() == 0:
        return
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    if bool((size > eps * (1 + 1e-4) + 1e-6).any()) or bool(((x_adv < 0) | (x_adv > 1)).any()):
        raise RuntimeError(f"attack {cfg.label()} at eps={eps}: adversarial examples leave the threat model "
                           f"(max {norm} size {size.max().item():.6g})")


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (or buffers) live; the CPU for a model with neither."""
    tensor = next(iter(model.parameters()), None)
    tensor = tensor if tensor is not None else next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.inference_mode()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Predicted classes (B,) of a batch, in inference mode (no graph, no version counters)."""
    return model(x).argmax(1)
