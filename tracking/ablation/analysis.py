"""An ablation: the observations of one sweep (or experiment), how they were chosen, and their analysis — the
main effects, the loss × ε interaction when both vary, and the importance ranking.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tracking.ablation.effects import EPS, LOSS, Factor, Interaction, MainEffect, Observation, interaction, main_effects
from tracking.ablation.importance import Importance, importance

__all__ = ["Ablation", "Analysis", "analyse"]


@dataclass
class Ablation:
    """The observations of one sweep (or experiment) and how they were chosen."""

    title: str
    metric: str  # what each observation is, in words ("test/robust_acc/worst_case at each ε")
    objective: str
    split: str | None
    factors: list[Factor]
    observations: list[Observation]
    notes: list[str] = field(default_factory=list)
    experiment: str = ""
    sweep_id: str | None = None
    parent_run_id: str | None = None
    scale: float = 100.0  # accuracies are shown in points (%)


@dataclass
class Analysis:
    effects: list[MainEffect]  # largest effect first
    interaction: Interaction | None
    importance: Importance | None


def analyse(ablation: Ablation, *, seed: int = 0) -> Analysis:
    """Main effects, the loss × ε interaction (when both vary) and the importance ranking."""
    obs, factors = ablation.observations, ablation.factors
    by_key = {f.key: f for f in factors}
    both = LOSS in by_key and EPS in by_key
    return Analysis(main_effects(obs, factors),
                    interaction(obs, factors, by_key[LOSS], by_key[EPS]) if both else None,
                    importance(obs, factors, seed=seed))
