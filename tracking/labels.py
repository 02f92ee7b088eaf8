"""Configurations and factors named as people write them in papers: ``CE``, ``GCE α=1/3``, ``lr=0.001``.

MLflow stores every param as a string (``loss.alpha = 0.3333333333333333``); tables, plots, `ablate` and the
report all name configurations through this one module, so the same run reads the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fractions import Fraction

__all__ = ["config_label", "factor_label", "loss_label", "value_label"]

_FACTORS = {"loss.name": "loss", "loss.alpha": "α", "model.name": "model", "optim.lr": "lr", "optim.name": "optimiser",
            "data.dataset": "data", "seed": "seed", "epochs": "epochs", "batch_size": "batch"}
_UPPER = {"ce", "cot", "gce", "mlp", "sgd", "adamw"}
_LOSS_OPTIONS = {"smoothing": "ε", "weight": "λ"}  # a loss's own options (loss.kwargs.*), as papers write them
_NAMES = {"label_smoothing": "LS", "logit_squeezing": "logit squeezing",
          "adam": "Adam", "lenet5": "LeNet-5", "resnet20": "ResNet-20", "resnet32": "ResNet-32",
          "resnet56": "ResNet-56", "preact_resnet18": "PreAct-ResNet-18", "wide_resnet": "WRN",
          "mnist5k": "MNIST-5k", "mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10",
          "cifar100": "CIFAR-100", "digits": "digits"}


def factor_label(key: str) -> str:
    """``loss.alpha`` -> ``α``; an unknown dotted path keeps its last two parts (``adversarial.eps``)."""
    if key in _FACTORS:
        return _FACTORS[key]
    parts = key.split(".")
    return ".".join(parts[-2:]) if len(parts) > 2 else key


def value_label(value: object) -> str:
    """``0.3333333333333333`` -> ``1/3``, ``0.001`` -> ``0.001``, ``gce`` -> ``GCE``, ``None`` -> ``–``."""
    if value is None or value == "" or value == "None":
        return "–"
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        low = text.lower()
        return low.upper() if low in _UPPER else _NAMES.get(low, text)
    if number.is_integer():
        return str(int(number))
    fraction = Fraction(number).limit_denominator(12)
    if 0 < abs(number) < 1 and fraction.numerator in (1, -1) and abs(float(fraction) - number) < 1e-9 * abs(number) \
            and fraction.denominator not in (2, 4, 5, 8, 10):  # 1/3, 1/6: a decimal would need rounding
        return f"{fraction.numerator}/{fraction.denominator}"
    return f"{number:.4g}"


def loss_label(params: Mapping[str, object]) -> str:
    """The loss with its options: ``CE``, ``GCE α=1/3``, ``LS ε=0.1``, ``my_loss gamma=2``."""
    options = []
    if params.get("loss.alpha") not in (None, "", "None"):
        options.append(f"α={value_label(params['loss.alpha'])}")
    for key in sorted(k for k in params if k.startswith("loss.kwargs.")):
        name = key.removeprefix("loss.kwargs.")
        options.append(f"{_LOSS_OPTIONS.get(name, name)}={value_label(params[key])}")
    return " ".join([value_label(params.get("loss.name", "?")), *options])


def config_label(params: Mapping[str, object], varying: Iterable[str]) -> str:
    """One configuration by the params that vary across a study: the loss first, as a paper writes it
    (``GCE α=1/3``), then every other varying factor as ``name=value``."""
    varying = [k for k in varying if k not in ("seed", "sweep.point")]
    parts = []
    def of_loss(key: str) -> bool:  # "loss.kwargs" itself: logged as "{}" by runs whose loss takes no option
        return key in ("loss.name", "loss.alpha", "loss.kwargs") or key.startswith("loss.kwargs.")

    if any(of_loss(k) for k in varying):
        parts.append(loss_label(params))
    for key in varying:
        if of_loss(key):
            continue
        value = params.get(key)
        if key == "model.name" or key == "data.dataset":
            parts.append(value_label(value))
        else:
            parts.append(f"{factor_label(key)}={value_label(value)}")
    return ", ".join(parts) or "all runs"
