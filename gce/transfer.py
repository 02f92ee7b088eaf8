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

from gce.attacks import AttackConfig, LossFn, eval_mode
from gce.evaluate import RobustnessResult, batches, evaluate_robustness, model_device, predict

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

    def label_of(self, config: AttackConfig) -> str:
        return transfer_label(config)


def evaluate_transfer(model: nn.Module, surrogate: nn.Module, data, attacks: Sequence[AttackConfig], *,
                      batch_size: int = 500, max_examples: int | None = None, seed: int | None = 0,
                      surrogate_loss: LossFn | None = None, primary_eps: float | None = None,
                      primary_norm: str | None = None, fast: bool = True) -> TransferResult:
    """Robust accuracy of ``model`` against each attack of ``attacks`` run on ``surrogate`` (module docstring):
    ``gce.evaluate.evaluate_robustness`` with a surrogate, its labels prefixed ``transfer-``, and the surrogate's
    own clean accuracy on the same points. ``fast``: the radii of one attack in increasing order, each only on
    the points its transferred examples did not fool at a smaller ε (those examples lie in the larger ball too).
    """
    attacks = list(attacks)
    result = evaluate_robustness(model, data, attacks, train_loss=surrogate_loss, standalone=True,
                                 primary_eps=primary_eps, primary_norm=primary_norm, batch_size=batch_size,
                                 max_examples=max_examples, seed=seed, fast=fast, surrogate=surrogate)
    device = model_device(model)
    with eval_mode(surrogate):
        hits = [(predict(surrogate, x) == y).cpu()
                for x, y in batches(data, batch_size, device=device, max_examples=max_examples, seed=seed or 0)]
    labels = {cfg.label(): transfer_label(cfg) for cfg in attacks}
    return TransferResult(result.n, result.clean_acc, attacks,
                          {labels[label]: by_eps for label, by_eps in result.accuracy.items()},
                          result.worst_case, result.clean_correct,
                          {(labels[label], eps): flags for (label, eps), flags in result.robust.items()},
                          result.worst_robust, standalone=True, primary=result.primary,
                          surrogate_clean_acc=torch.cat(hits).float().mean().item())
