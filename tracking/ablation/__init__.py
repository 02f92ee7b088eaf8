"""``gce-sweep ablate``: which factor moved the objective, by how much, and with what uncertainty.

Observations are one per finished trial run and ε (``load``); the loss is one factor, named as papers do, and ε
another. A level's interval spans its observations; an effect is a contrast matched on every other factor and the
seed, with seeds as the replicates (``effects``). An importance ranking comes beside them (``importance``), and
the whole is written up as report sections, plots and JSON (``sections``).

Modules: ``effects`` (the statistics, no MLflow), ``importance`` (Optuna's evaluators), ``analysis`` (an ablation
and its analysis), ``load`` (from MLflow), ``sections`` (the write-up); ``make_ablation`` ties them together.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from tracking.ablation.analysis import Ablation, Analysis, analyse
from tracking.ablation.effects import (
    CONFIDENCE,
    EPS,
    LOSS,
    Estimate,
    Factor,
    Interaction,
    MainEffect,
    Observation,
    contrast,
    interaction,
    main_effects,
    t_interval,
)
from tracking.ablation.importance import Importance, importance
from tracking.ablation.load import AblationError, factors_of, load_ablation
from tracking.ablation.sections import ablation_figures, ablation_json, ablation_sections
from tracking.queries import resolve_target as resolve
from tracking.render import Section, write

__all__ = ["CONFIDENCE", "EPS", "LOSS", "Ablation", "AblationError", "Analysis", "Estimate", "Factor", "Importance",
           "Interaction", "MainEffect", "Observation", "ablation_figures", "ablation_json", "ablation_sections",
           "analyse", "contrast", "factors_of", "importance", "interaction", "load_ablation", "main_effects",
           "make_ablation", "resolve", "t_interval"]


def make_ablation(client, target: str, *, metric: str | None = None, split: str = "test",
                  out: str | Path | None = None, reference: str | None = None
                  ) -> tuple[Ablation, Analysis, list[Section], list[Path]]:
    """Load, analyse and write ``ablation.md`` and the plots to ``out`` (default reports/<sweep id or
    experiment>/ablation); a sweep's are also logged to its parent run under ``ablation/``."""
    ablation = load_ablation(client, target, metric=metric, split=split, reference=reference)
    analysis = analyse(ablation)
    sections, figures = ablation_sections(ablation, analysis)
    folder = Path(out) if out else Path("reports") / (ablation.sweep_id or ablation.experiment) / "ablation"
    doc = SimpleNamespace(title=ablation.title, sections=sections, figures=figures)
    paths = write(doc, folder, "ablation", html_too=False)
    if ablation.parent_run_id is not None:
        for path in paths:
            client.log_artifact(ablation.parent_run_id, str(path), "ablation")
    return ablation, analysis, sections, paths
