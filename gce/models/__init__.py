"""Image classifiers by name: ``build_model("resnet56", input_shape=(3, 32, 32), num_classes=10)``.

Every model is a :class:`Classifier`: it takes images in [0, 1] pixel space (normalisation is inside the
model, so attacks and their ε live in pixel space), returns logits, and exposes ``features(x)``, the
penultimate representation whose class clusters the GCE paper argues about.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from torch import nn

from gce.models.base import Classifier, Normalize
from gce.models.lenet import LeNet5
from gce.models.mlp import MLP
from gce.models.preact_resnet import PreActResNet18
from gce.models.resnet import CifarResNet, resnet20, resnet32, resnet56
from gce.models.wide_resnet import WideResNet

__all__ = [
    "MLP",
    "MODELS",
    "CifarResNet",
    "Classifier",
    "LeNet5",
    "Normalize",
    "PreActResNet18",
    "WideResNet",
    "build_model",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": LeNet5,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "preact_resnet18": PreActResNet18,
    "wide_resnet": WideResNet,
    "mlp": MLP,
}

_COMMON = ("input_shape", "num_classes", "mean", "std")


def build_model(
    name: str,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs,
) -> Classifier:
    """Build the registered model ``name`` for images of ``input_shape`` (C, H, W) and ``num_classes``.

    ``mean``/``std`` (one per channel) set the normalisation inside the model; ``kwargs`` are the model's own
    options (``depth``, ``widen_factor``, ``dropout`` for wide_resnet; ``hidden`` for mlp). Unknown names,
    unknown options and invalid values raise ValueError naming the field, so a bad sweep spec fails at once.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}; got {name!r}")
    factory = MODELS[name]
    params = inspect.signature(factory).parameters.values()  # the common fields travel in **common
    options = [p.name for p in params if p.name not in _COMMON and p.kind is not p.VAR_KEYWORD]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        allowed = f"options {options}" if options else "no options"
        raise ValueError(f"model {name!r} takes {allowed}; got unknown {unknown}")
    return factory(input_shape=input_shape, num_classes=num_classes, mean=mean, std=std, **kwargs)
