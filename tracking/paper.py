"""The GCE paper's white-box results (Chen et al., ICCV 2019, arXiv 1903.09799, Tables 3 and 5), for reports.

Robust accuracy in %, L∞, the attack loss being the model's own training loss (the paper's setting); MNIST
with LeNet-5, CIFAR-10 with ResNet-56. PGD: 40 steps of 0.01 with random start; BIM and MIM steps are not
stated. "xe" is the paper's name for the cross-entropy baseline (our "ce").
"""

from __future__ import annotations

__all__ = ["LOSSES", "PAPER", "paper_losses", "paper_numbers"]

# (dataset family, attack, eps) -> {loss: robust accuracy in %}
PAPER: dict[tuple[str, str, float], dict[str, float]] = {
    ("mnist", "fgsm", 0.1): {"ce": 78.32, "gce": 87.66},
    ("mnist", "fgsm", 0.2): {"ce": 38.88, "cot": 51.8, "gce": 62.74},
    ("mnist", "fgsm", 0.3): {"ce": 14.99, "gce": 47.21},
    ("mnist", "bim", 0.1): {"ce": 53.14, "gce": 61.92},
    ("mnist", "bim", 0.2): {"ce": 2.15, "cot": 4.35, "gce": 34.49},
    ("mnist", "bim", 0.3): {"ce": 0.01, "gce": 33.45},
    ("mnist", "pgd", 0.1): {"ce": 46.85, "gce": 51.85},
    ("mnist", "pgd", 0.2): {"ce": 1.58, "gce": 9.55},
    ("mnist", "pgd", 0.3): {"ce": 0.0, "gce": 2.22},
    ("mnist", "mim", 0.1): {"ce": 48.28, "gce": 61.18},
    ("mnist", "mim", 0.2): {"ce": 2.29, "cot": 4.26, "gce": 39.81},
    ("mnist", "mim", 0.3): {"ce": 0.01, "gce": 38.78},
    ("cifar10", "fgsm", 0.04): {"ce": 14.76, "cot": 33.62, "gce": 41.22},
    ("cifar10", "fgsm", 0.12): {"ce": 9.58, "gce": 14.82},
    ("cifar10", "fgsm", 0.2): {"ce": 8.78, "gce": 11.81},
    ("cifar10", "bim", 0.04): {"ce": 0.25, "cot": 7.49, "gce": 19.59},
    ("cifar10", "bim", 0.12): {"ce": 0.0, "gce": 3.03},
    ("cifar10", "bim", 0.2): {"ce": 0.0, "gce": 1.97},
    ("cifar10", "pgd", 0.04): {"ce": 0.0, "gce": 5.91},
    ("cifar10", "pgd", 0.12): {"ce": 0.0, "gce": 1.89},
    ("cifar10", "pgd", 0.2): {"ce": 0.0, "gce": 1.66},
    ("cifar10", "mim", 0.04): {"ce": 0.0, "cot": 0.0, "gce": 15.44},
    ("cifar10", "mim", 0.12): {"ce": 0.0, "gce": 13.1},
    ("cifar10", "mim", 0.2): {"ce": 0.0, "gce": 12.69},
}

_FAMILY = {"mnist": "mnist", "mnist5k": "mnist", "cifar10": "cifar10"}
LOSSES = ("ce", "cot", "gce")  # the paper's column order (XE, COT, GCE)


def paper_numbers(dataset: str, attack_label: str, eps: float) -> dict[str, float] | None:
    """The paper's numbers for a row of our table, when the setting matches: same dataset family, an L∞
    FGSM/BIM/PGD/MIM run with the training loss (label "<attack>-train"), the same ε. None otherwise."""
    family = _FAMILY.get(dataset)
    name, _, loss = attack_label.partition("-")
    if family is None or loss != "train":
        return None
    return PAPER.get((family, name, round(eps, 6)))


def paper_losses(dataset: str | None) -> list[str]:
    """The losses the paper reports on ``dataset``'s family, in its column order: the "paper …" columns a
    report gives that dataset (none for a dataset the paper did not use)."""
    family = _FAMILY.get(dataset or "")
    reported = {loss for (fam, _, _), numbers in PAPER.items() if fam == family for loss in numbers}
    return [loss for loss in LOSSES if loss in reported]
