"""The metric schema: the one place that builds and parses every metric key a trial reports.

Producers (``gce.evaluate``, ``gce.latent``, ``gce.checks``, the trainable's profile), the spec validator (which
refuses an objective no trial reports, before Ray starts) and the reports all go through here, so a key is
spelled once. The spelling is one that MLflow and Ray Tune both accept as it is: MLflow refuses ``=`` in
names, so an ε is written ``eps_0.3`` (``val/robust_acc/pgd/eps_0.3``) in gce, in Tune and in MLflow alike.

Keys, by family (``<split>`` is ``val`` or ``test``; L∞ is the default norm and carries no suffix):

- per epoch: ``train/loss``, ``train/acc``, ``train/images_per_s``, ``train/epoch_time_s``, ``train/lr``,
  ``val/loss``, ``val/clean_acc``, ``epoch``; with adversarial training also ``val/adv_acc`` (PGD accuracy at the
  training ε on a fixed validation subset, ``gce.config.AdvTrainingConfig``: early stopping's metric);
- robustness: ``<split>/clean_acc``, ``<split>/robust_acc/<attack label>/eps_<ε>`` (``robust_acc_chain/`` for
  the cumulative numbers of a chain: a non-standalone evaluation, and AutoAttack's members
  ``autoattack.<member>``), ``<split>/robust_acc/worst_case[-<norm>]/eps_<ε>``, and the
  headline ``<split>/robust_acc/worst_case`` at the primary threat model; ``<split>/eval_n``, and
  ``val/eval_clean_acc`` (the attacked subsample's clean accuracy: ``val/clean_acc`` is the whole split's);
- latent clusters: ``val/latent/<silhouette | inter_class | intra_class | inter_intra_ratio>``;
- diagnostics: ``check/<flag>/<value>`` — which values exist depends on which comparisons the attack list
  allows, so they are a family, never an objective;
- profile: ``time/<phase>_s``, ``time/<tracking | report>_share``, ``mem/peak_rss_mb`` (``mem/cuda_peak_mb``
  on CUDA); the sweep's parent run: ``sweep/trials``, ``sweep/errors``, ``sweep/best``.

Stdlib only: ``tracking`` and ``sweeps`` import it without importing torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ADV_ACC", "EPOCH", "LATENT", "MetricSet", "RobustKey", "check_key", "clean_key", "expected", "format_eps",
           "latent_key", "parse_robust", "robust_key", "time_key", "worst_case_key"]

SPLITS = ("val", "test")
#: What every epoch reports (``gce.train.fit``); ASHA can compare any of them but ``epoch``.
EPOCH = ("train/loss", "train/acc", "train/images_per_s", "train/epoch_time_s", "train/lr", "val/loss",
         "val/clean_acc", "epoch")
#: Per epoch, only when the trial trains adversarially (``gce.train``).
ADV_ACC = "val/adv_acc"
LATENT = ("silhouette", "inter_class", "intra_class", "inter_intra_ratio")
#: A trial's profile: seconds per phase (``time/<phase>_s``) and shares of the trial's wall time.
TIME_PHASES = ("run_start", "data", "train", "fit_compute", "log", "report", "eval", "artifacts", "trial")
TIME_SHARES = ("tracking", "report")
PEAK_RSS, CUDA_PEAK = "mem/peak_rss_mb", "mem/cuda_peak_mb"
EVAL_CLEAN = "val/eval_clean_acc"
SWEEP_TRIALS, SWEEP_ERRORS, SWEEP_BEST = "sweep/trials", "sweep/errors", "sweep/best"
CHECK_PREFIX = "check/"
SYSTEM_PREFIX = "system/"  # MLflow's system metrics: sampled on the run by the tracking side, never sent to Tune
_ROBUST = re.compile(r"^(val|test)/(robust_acc|robust_acc_chain)/([^/]+)/eps_([^/]+)$")


def format_eps(eps: float) -> str:
    """A stable key form of ε: at most 6 decimals, no float noise ("0.3", "0.031373", "2", "inf")."""
    if math.isinf(eps):
        return "inf"
    text = f"{eps:.6f}".rstrip("0").rstrip(".")
    return text if text != "0" or eps == 0 else f"{eps:.3g}"


def clean_key(split: str) -> str:
    return f"{split}/clean_acc"


def eval_n_key(split: str) -> str:
    return f"{split}/eval_n"


def robust_key(split: str, label: str, eps: float, *, chain: bool = False) -> str:
    """One attack's robust accuracy at ε; ``chain``: the cumulative number of an AutoAttack-style chain, kept
    under its own group so that it is never compared with another run's standalone number."""
    return f"{split}/{'robust_acc_chain' if chain else 'robust_acc'}/{label}/eps_{format_eps(eps)}"


def worst_case_key(split: str, norm: str | None = None, eps: float | None = None) -> str:
    """The per-example worst case over every attack of a threat model (norm, ε); with no ε, the headline
    ``<split>/robust_acc/worst_case`` at the primary threat model."""
    if eps is None:
        return f"{split}/robust_acc/worst_case"
    name = "worst_case" if norm in (None, "linf") else f"worst_case-{norm}"
    return f"{split}/robust_acc/{name}/eps_{format_eps(eps)}"


def latent_key(split: str, name: str) -> str:
    return f"{split}/latent/{name}"


def check_key(flag: str, value: str) -> str:
    return f"{CHECK_PREFIX}{flag}/{value}"


def measurement_key(source: str, label: str, steps: int, eps: float) -> str:
    """The key of one of the diagnostics' robust accuracies (under ``check/<flag>/``)."""
    return f"{source}/{label}/steps_{steps}/eps_{format_eps(eps)}"


def time_key(phase: str) -> str:
    return f"time/{phase}_s"


def share_key(part: str) -> str:
    return f"time/{part}_share"


@dataclass(frozen=True)
class RobustKey:
    """A parsed robust-accuracy key; ``label`` is an attack label or ``worst_case[-<norm>]``."""

    split: str
    chain: bool
    label: str
    eps: float

    @property
    def worst_case(self) -> bool:
        return self.label.startswith("worst_case")


def parse_robust(key: str) -> RobustKey | None:
    """The parts of a per-ε robust key, or None for any other key (the headline worst case included)."""
    m = _ROBUST.match(key)
    if m is None:
        return None
    return RobustKey(m.group(1), m.group(2) == "robust_acc_chain", m.group(3), float(m.group(4)))


@dataclass(frozen=True)
class MetricSet:
    """The keys a trial of a spec reports: ``exact`` ones always, ``families`` (prefixes) whose members depend
    on outcomes. An objective must name an exact key; ``per_epoch``: the exact keys reported every epoch (what
    ASHA can compare)."""

    exact: frozenset[str]
    families: tuple[str, ...] = ()
    per_epoch: frozenset[str] = frozenset(EPOCH)

    def __contains__(self, key: str) -> bool:
        return key in self.exact or key.startswith(self.families)

    def unexpected(self, keys: Iterable[str]) -> set[str]:
        return {k for k in keys if k not in self}


def expected(attacks: Iterable, *, test: bool = True, standalone: bool = True, checks: bool = True,
             cuda: bool = False, system: bool = False, adversarial: str = "none") -> MetricSet:
    """What a finished trial reports, per epoch and at the end, for an evaluation with ``attacks``
    (``gce.attacks.AttackConfig`` objects, one per ε) on val (and test). The norm of each attack comes from
    ``norm_of`` in ``gce.evaluate``, imported here lazily so that this module needs no torch when given none.
    ``adversarial``: how many trials train adversarially, "all" | "some" | "none": ``val/adv_acc`` is an exact
    per-epoch key for "all", a key some trials report (a family, never an objective) for "some"."""
    if adversarial not in ("all", "some", "none"):
        raise ValueError(f"adversarial must be 'all', 'some' or 'none'; got {adversarial!r}")
    attacks = list(attacks)
    per_epoch = set(EPOCH) | ({ADV_ACC} if adversarial == "all" else set())
    keys = set(per_epoch) | {EVAL_CLEAN, PEAK_RSS, *(time_key(p) for p in TIME_PHASES), *map(share_key, TIME_SHARES)}
    keys |= {latent_key("val", name) for name in LATENT}
    if cuda:
        keys.add(CUDA_PEAK)
    norms = {}
    if attacks:
        from gce.evaluate import norm_of

        norms = {id(cfg): norm_of(cfg) for cfg in attacks}
    for split in SPLITS if test else SPLITS[:1]:
        keys |= {clean_key(split), eval_n_key(split)}
        if not attacks:
            continue
        keys.add(worst_case_key(split))
        for cfg in attacks:
            keys.add(robust_key(split, cfg.label(), cfg.eps, chain=not standalone))
            keys.add(worst_case_key(split, norms[id(cfg)], cfg.eps))
            if cfg.name == "autoattack":  # its members' cumulative numbers
                from gce.attacks.autoattack import member_labels

                keys |= {robust_key(split, label, cfg.eps, chain=True) for label in member_labels(cfg.version)}
    # Diagnostics run when the headline threat model is L∞ (the primary norm is L∞ whenever an attack uses it).
    families = (CHECK_PREFIX,) if checks and "linf" in norms.values() else ()
    families += (ADV_ACC,) if adversarial == "some" else ()
    return MetricSet(frozenset(keys), families + ((SYSTEM_PREFIX,) if system else ()), frozenset(per_epoch))
