"""Training objectives over logits: cross-entropy, complement entropy (COT), guided complement entropy (GCE),
and the controls a GCE claim must be held against: label smoothing and logit squeezing.

GCE: Chen et al., "Improving Adversarial Robustness via Guided Complement Entropy", ICCV 2019,
https://arxiv.org/abs/1903.09799 (Eq. 2). COT: Chen et al., "Complement Objective Training", ICLR 2019,
https://arxiv.org/abs/1903.01182. GCE flattens the non-target probabilities, which is close to what label
smoothing does (Szegedy et al. 2016); label smoothing and logit squeezing (Kannan et al. 2018, arXiv
1803.06373) are known to look robust under PGD while failing under other attacks (Engstrom et al. 2018, arXiv
1807.10272; Fu et al. 2020, arXiv 2009.08233), so a GCE gain that they match is no evidence of robustness.

Every loss is a pure function ``loss(logits, target) -> scalar`` (or per-sample with ``reduction="none"``),
computed in log space in float32 so that saturated logits (|z| up to 1e4) give finite values and gradients,
also under bf16 autocast. The class count K comes from the tensor.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from gce.validation import check_number

__all__ = [
    "LOSSES",
    "NORMALIZATIONS",
    "complement_entropy",
    "cross_entropy",
    "get_loss",
    "guided_complement_entropy",
    "label_smoothing",
    "logit_squeezing",
    "loss_options",
    "reduce_per_sample",
]

NORMALIZATIONS = ("paper", "code", "classes")
REDUCTIONS = ("mean", "sum", "none")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check(logits: torch.Tensor, target: torch.Tensor, min_classes: int, reduction: str) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (batch, classes); got {tuple(logits.shape)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target must have shape (batch,) = ({logits.shape[0]},) to match logits {tuple(logits.shape)}; "
            f"got {tuple(target.shape)}"
        )
    if logits.shape[1] < min_classes:
        raise ValueError(
            f"this loss needs at least {min_classes} classes (logits.shape[1]); got {logits.shape[1]}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")


def reduce_per_sample(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply a loss reduction (mean, sum or none) to per-sample values; shared by every loss here and in attacks."""
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Standard cross-entropy (the "XE" baseline of the paper), in float32 for the same numerics as GCE."""
    _check(logits, target, 2, reduction)
    return F.cross_entropy(logits.float(), target, reduction=reduction)


def _complement_terms(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (log ŷ_g, Σ_{j≠g} q_j log q_j) per sample, with q_j = ŷ_j / (1 − ŷ_g).

    q is the softmax over the non-target logits, so log q comes from log_softmax with the target masked out:
    no division by 1 − ŷ_g and no log(0) in the graph. The masked entry is replaced by 0 *before* it is
    multiplied, because a NaN in the unused branch of ``where`` would still poison the gradient.
    """
    z = logits.float()
    is_target = F.one_hot(target, z.shape[1]).bool()
    log_y_g = F.log_softmax(z, dim=1).gather(1, target[:, None]).squeeze(1)
    log_q = F.log_softmax(z.masked_fill(is_target, float("-inf")), dim=1)
    log_q = log_q.masked_fill(is_target, 0.0)
    neg_entropy = (log_q.exp() * log_q).sum(dim=1)
    return log_y_g, neg_entropy


def _normalizer(num_classes: int, normalization: str) -> float:
    if normalization == "paper":
        return math.log(num_classes - 1)
    if normalization == "code":
        return math.log(num_classes)
    if normalization == "classes":  # COT's released code divides its complement entropy by K
        return float(num_classes)
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {normalization!r}")


def complement_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    normalization: str = "paper",
    reduction: str = "mean",
) -> torch.Tensor:
    """Negated, normalised complement entropy (COT's complement objective), to be minimised.

    With ``normalization="paper"`` the value lies in [-1, 0]: -1 when the incorrect classes are exactly flat;
    ``"classes"`` divides by K as COT's released code does (a ≈4.5× smaller step for K = 10 than "paper").
    In COT it alternates with a cross-entropy step (see ``gce.train``); on its own it does not raise ŷ_g.
    """
    _check(logits, target, 3, reduction)
    _, neg_entropy = _complement_terms(logits, target)
    return reduce_per_sample(neg_entropy / _normalizer(logits.shape[1], normalization), reduction)


def guided_complement_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1 / 3,
    normalization: str = "paper",
    reduction: str = "mean",
) -> torch.Tensor:
    """GCE (Eq. 2): ŷ_g^α · (1/log(K−1)) · Σ_{j≠g} q_j log q_j, averaged over the batch; minimised.

    ``normalization="code"`` divides by log K as the authors' released code does. The guiding factor
    ŷ_g^α = exp(α log ŷ_g) is differentiated through, as in the authors' code: that is what raises ŷ_g.
    """
    check_number("alpha", alpha)
    _check(logits, target, 3, reduction)
    log_y_g, neg_entropy = _complement_terms(logits, target)
    guide = torch.exp(alpha * log_y_g)
    return reduce_per_sample(guide * neg_entropy / _normalizer(logits.shape[1], normalization), reduction)


def label_smoothing(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against targets smoothed towards uniform: 1 − ε on the true class, ε/K spread over all K
    (Szegedy et al. 2016; PyTorch's ``label_smoothing``). Like GCE it flattens the incorrect classes."""
    check_number("smoothing", smoothing)
    if smoothing >= 1:
        raise ValueError(f"smoothing must be in [0, 1); got {smoothing!r}")
    _check(logits, target, 2, reduction)
    return F.cross_entropy(logits.float(), target, reduction=reduction, label_smoothing=float(smoothing))


def logit_squeezing(logits: torch.Tensor, target: torch.Tensor, weight: float = 0.05,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy plus ``weight`` · ‖z‖² of each example's logits (Kannan et al. 2018's logit squeezing):
    small logits make the softmax flat and the CE gradient small, which can mask gradients without robustness."""
    check_number("weight", weight)
    _check(logits, target, 2, reduction)
    z = logits.float()
    per_sample = F.cross_entropy(z, target, reduction="none") + weight * z.pow(2).sum(dim=1)
    return reduce_per_sample(per_sample, reduction)


#: Loss name -> function(logits, target, *, <its options>, reduction). COT's "loss" is the complement step of
#: its alternation. Options beyond α and the normalisation come from ``loss.kwargs`` (``loss_options``).
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "ce": cross_entropy,
    "cot": complement_entropy,
    "gce": guided_complement_entropy,
    "label_smoothing": label_smoothing,
    "logit_squeezing": logit_squeezing,
}

_BOUND = ("logits", "target", "reduction", "alpha", "normalization")  # passed by the caller or its own fields


def loss_options(name: str) -> dict[str, object]:
    """The options ``loss.kwargs`` may set for loss ``name``, with their defaults (its keyword parameters other
    than the logits, the target, the reduction, α and the normalisation, which have their own fields)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}")
    params = inspect.signature(LOSSES[name]).parameters.values()
    return {p.name: p.default for p in params
            if p.name not in _BOUND and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def get_loss(name: str, alpha: float | None = None, normalization: str = "paper",
             kwargs: dict[str, object] | None = None) -> LossFn:
    """Look a loss up by name and bind its options; an unknown name lists the known ones.

    ``alpha`` is only meaningful for GCE: passing it for another loss is an error rather than silently ignored,
    so that an ablation never records an α that had no effect. ``kwargs`` are the loss's own options
    (``loss_options``), e.g. label smoothing's ``smoothing``; an unknown one is an error naming the known ones.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {normalization!r}")
    options = dict(kwargs or {})
    known = loss_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"loss {name!r} has no option(s) {unknown}; its options: {sorted(known) or 'none'}")
    if name == "gce":
        return partial(
            guided_complement_entropy, alpha=1 / 3 if alpha is None else alpha, normalization=normalization
        )
    if alpha is not None:
        raise ValueError(f"alpha applies only to loss 'gce'; got alpha={alpha!r} for loss {name!r}")
    if name == "cot":
        return partial(complement_entropy, normalization=normalization)
    return partial(LOSSES[name], **options) if options else LOSSES[name]
