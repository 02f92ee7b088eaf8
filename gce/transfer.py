"""Transfer attacks: adversarial examples crafted on a surrogate model, scored on the target model.

A black-box check of a white-box evaluation (Carlini et al. 2019, §5 of the design): a model whose white-box
robust accuracy is *above* what examples transferred from a similar model leave it is masking its gradients.
The accounting is ``gce.evaluate``'s: a point is robust at a threat model (norm, ε) only if the target
classifies it correctly and no transferred example at that (norm, ε) - or at a smaller ε of the same norm -
fools it; every attack runs on every point the target classifies correctly (standalone numbers). The points
are the same as ``evaluate_robustness`` picks for the same data, ``max_examples`` and ``seed``, and the attacks
draw their randomness in the same order, so transfer from a model to itself is the white-box evaluation (exactly
so for attacks whose result does not depend on stopping early, e.g. FGSM).

Attack labels get the prefix ``transfer-`` (``val/robust_acc/transfer-pgd/eps_0.3``); ``loss: train`` means the
surrogate's training loss (``surrogate_loss``), the loss its attacker would know.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gce.attacks import AttackConfig, LossFn, build_attack, eval_mode
from gce.evaluate import (
    RobustnessCurve,
    RobustnessResult,
    _check_threat_model,
    _group,
    _nested,
    _primary,
    attack_in_chunks,
    batches,
    model_device,
    norm_of,
    predict,
)
from gce.seeding import seeded

__all__ = ["TRANSFER_PREFIX", "TransferResult", "evaluate_transfer", "transfer_label"]

TRANSFER_PREFIX = "transfer-"


def transfer_label(config: AttackConfig) -> str:
    """The metric label of an attack transferred from a surrogate: ``transfer-<attack label>``."""
    return TRANSFER_PREFIX + config.label()


@dataclass
class TransferResult(RobustnessResult):
    """``RobustnessResult`` of transferred attacks: ``accuracy`` and ``robust`` are keyed by ``transfer_label``,
    accuracies are the *target's*; ``surrogate_clean_acc`` is the surrogate's clean accuracy on the same points."""

    surrogate_clean_acc: float = math.nan

    def curves(self) -> dict[str, RobustnessCurve]:
        out = {}
        for norm in dict.fromkeys(n for n, _ in self.worst_case):
            grid = sorted(e for n, e in self.worst_case if n == norm)
            series = {transfer_label(c): [self.accuracy[transfer_label(c)].get(e, math.nan) for e in grid]
                      for c in self.attacks if norm_of(c) == norm}
            series["worst_case"] = [self.worst_case[(norm, e)] for e in grid]
            out[norm] = RobustnessCurve(norm, grid, self.clean_acc, series, False)
        return out


def evaluate_transfer(model: nn.Module, surrogate: nn.Module, data, attacks: Sequence[AttackConfig], *,
                      batch_size: int = 500, max_examples: int | None = None, seed: int | None = 0,
                      surrogate_loss: LossFn | None = None, primary_eps: float | None = None,
                      primary_norm: str | None = None, fast: bool = True) -> TransferResult:
    """Robust accuracy of ``model`` against each attack of ``attacks`` run on ``surrogate`` (module docstring).

    ``data``, ``batch_size``, ``max_examples``, ``seed``, ``primary_eps`` and ``primary_norm`` mean what they mean
    for ``gce.evaluate.evaluate_robustness``; both models must take the same inputs and live on one device.
    ``fast``: the radii of one attack run in increasing order, each only on the points its transferred examples
    did not fool at a smaller ε (those examples lie in the larger ball too), as ``evaluate_robustness`` does. The
    attacks run to their final iterate on the surrogate: that the surrogate is fooled says nothing of the target.
    """
    attacks = list(attacks)
    groups = _group(attacks)
    primary = _primary(groups, primary_eps, primary_norm)
    device = model_device(model)
    if model_device(surrogate) != device:
        raise ValueError(f"surrogate: on {model_device(surrogate)}, the model on {device}; put both on one device")
    built = {(cfg.label(), cfg.eps): build_attack(cfg, train_loss=surrogate_loss) for cfg in attacks}
    correct_parts, surrogate_parts = [], []
    flag_parts: dict[tuple[str, float], list] = {key: [] for key in built}
    worst_parts: dict[tuple[str, float], list] = {tm: [] for tm in groups}
    norms = list(dict.fromkeys(n for n, _ in groups))
    order = sorted(groups, key=lambda tm: (norms.index(tm[0]), tm[1])) if fast else list(groups)
    with eval_mode(model), eval_mode(surrogate), seeded(seed, device):
        for x, y in batches(data, batch_size, device=device, max_examples=max_examples, seed=seed or 0):
            correct = predict(model, x) == y
            correct_parts.append(correct.cpu())
            surrogate_parts.append((predict(surrogate, x) == y).cpu())
            beaten: dict[tuple[str, str], torch.Tensor] = {}  # (label, norm) -> fooled at a smaller ε (fast)
            for tm in order:
                alive = correct.clone()
                for cfg in groups[tm]:
                    attack, key = built[(cfg.label(), cfg.eps)], (cfg.label(), tm[0])
                    todo = (correct & ~beaten[key] if key in beaten else correct).nonzero().squeeze(1)
                    ok = torch.zeros_like(correct)
                    record = getattr(attack, "record", None)  # a chain's per-member record: the surrogate's, unused
                    if record is not None:
                        record.clear()
                    if todo.numel():
                        x_adv = attack_in_chunks(attack, surrogate, x[todo], y[todo])
                        _check_threat_model(cfg, tm, x_adv, x[todo])
                        ok[todo] = predict(model, x_adv) == y[todo]
                    flag_parts[(cfg.label(), cfg.eps)].append(ok.cpu())
                    alive &= ok
                    if fast:
                        beaten[key] = correct & ~ok
                worst_parts[tm].append(alive.cpu())
    if not correct_parts:
        raise ValueError("data: no examples to evaluate")
    clean = torch.cat(correct_parts)
    labels = {cfg.label(): transfer_label(cfg) for cfg in attacks}
    robust = {(labels[label], eps): torch.cat(parts) for (label, eps), parts in flag_parts.items()}
    worst = _nested({tm: torch.cat(parts) for tm, parts in worst_parts.items()})
    accuracy: dict[str, dict[float, float]] = {}
    for (label, eps), flags in robust.items():
        accuracy.setdefault(label, {})[eps] = flags.float().mean().item()
    return TransferResult(len(clean), clean.float().mean().item(), attacks, accuracy,
                          {tm: w.float().mean().item() for tm, w in worst.items()}, clean, robust, worst,
                          standalone=True, primary=primary,
                          surrogate_clean_acc=torch.cat(surrogate_parts).float().mean().item())
