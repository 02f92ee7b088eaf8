"""An ablation written up: report sections (each carrying its plots), the plots as PNG bytes, and plain JSON.

The sections slot into ``tracking.report`` right after its answer, or stand alone as ``ablation.md``.
"""

from __future__ import annotations

import math
from dataclasses import asdict

from tracking import plots
from tracking.ablation.analysis import Ablation, Analysis, analyse
from tracking.ablation.effects import Estimate, Interaction, _order
from tracking.render import Section, Table

__all__ = ["ablation_figures", "ablation_json", "ablation_sections"]


def _num(e: Estimate, scale: float, signed: bool = False) -> str:
    if e.n == 0 or not math.isfinite(e.mean):
        return "–"
    f = "+.1f" if signed else ".1f"
    if not math.isfinite(e.low):
        return f"{scale * e.mean:{f}}"
    return f"{scale * e.mean:{f}} [{scale * e.low:{f}}, {scale * e.high:{f}}]"


def _n(e: Estimate) -> str:
    return f"{e.n} {e.basis}" if e.n else "–"


def ablation_sections(ablation: Ablation, analysis: Analysis | None = None
                      ) -> tuple[list[Section], dict[str, bytes]]:
    """The ablation as report sections (setup, main effects, effect sizes, loss × ε, importance), each carrying
    its own plot, and all the figures by file name (the same PNGs: to log or write beside the Markdown)."""
    analysis = analysis or analyse(ablation)
    figures = ablation_figures(ablation, analysis)
    s, unit = ablation.scale, "points" if ablation.scale == 100 else "units"
    runs = len({o.run_id for o in ablation.observations if o.run_id})
    factors = "; ".join(f"{f.label} ({len(_order(f, ablation.observations))} levels" + (f", {f.note}" if f.note
                        else "") + ")" for f in ablation.factors) or "none"
    sections = [Section("Ablation: setup", [
        f"{len(ablation.observations)} observations" + (f" from {runs} finished trial runs" if runs else "")
        + f": {ablation.metric}"
        + (f" (split: {ablation.split})" if ablation.split else "") + f". The sweep's objective: {ablation.objective}."
        f" Factors: {factors}.",
        "The loss is one factor (name and α together, as papers name it: α exists only for GCE); α's own effect "
        "is measured within the runs that have it. Intervals are 95% t-intervals. A level's interval spans its "
        "observations (seeds × the other factors); an effect (Δ) is matched — observations that differ only in "
        "that factor, averaged per seed, interval over seeds (*cells*: one seed, over the other factors instead; "
        "*unmatched*: Welch on the two levels)."], notes=list(ablation.notes))]
    rows = []
    for e in analysis.effects:
        name = e.factor.label + (f" ({e.factor.note})" if e.factor.note else "")
        for lv, st in e.levels.items():
            delta = e.contrasts.get(lv)
            rows.append([name, lv, _num(st, s), str(st.n), "reference" if delta is None else _num(delta, s, True),
                         "" if delta is None else _n(delta)])
            name = ""
    sections.append(Section("Main effects", [f"Mean of {ablation.metric} per level ({unit}) and each level "
                                             "against the reference level (the first, or CE)."],
                             Table(["factor", "level", "mean [95% CI]", "n", "Δ vs reference [95% CI]", "n (Δ)"],
                                   rows, left=2), figures=_pick(figures, "main_effects.png")))
    sections.append(Section("Effect sizes", [f"Each factor's best level − its worst ({unit}), matched; largest "
                                             "first. An interval that excludes 0 is an effect the seeds resolve."],
                            Table(["factor", "best − worst", "Δ [95% CI]", "n (Δ)"],
                                  [[e.factor.label, f"{e.best} − {e.worst}", _num(e.effect, s, True), _n(e.effect)]
                                   for e in analysis.effects], left=2)))
    if analysis.interaction is not None:
        sections.append(_interaction_section(analysis.interaction, s, unit))
        sections[-1].figures.update(_pick(figures, "interaction.png"))
    if analysis.importance is not None:
        imp = analysis.importance
        table_rows = [[name, f"{v:.3f}"] for name, v in imp.scores]
        if math.isfinite(imp.rest):
            table_rows.append(["(interactions, unexplained)", f"{imp.rest:.3f}"])
        sections.append(Section(f"Factor importance ({imp.evaluator})", [imp.why, "Fixed seed 0: deterministic."],
                                Table(["factor", "importance"], table_rows)))
    sections[-1].figures.update(_pick(figures, "parallel_coordinates.png"))
    return sections, figures


def _pick(figures: dict[str, bytes], name: str) -> dict[str, bytes]:
    return {name: figures[name]} if name in figures else {}


def _interaction_section(it: Interaction, s: float, unit: str) -> Section:
    rows_, cols = _cell_levels(it)
    dep = f"Δ({it.columns.label}={cols[-1]}) − Δ({it.columns.label}={cols[0]})"
    rows = [[r, *(_num(it.cells[(r, c)], s) for c in cols), ""] for r in rows_]
    rows += [[f"{r} − {it.reference}", *(_num(it.contrasts[(r, c)], s, True) for c in cols),
              _num(it.dependence[r], s, True)] for r in rows_ if r != it.reference]
    return Section(f"{it.rows.label.capitalize()} × {it.columns.label} interaction", [
        f"Cell means [95% CI] ({unit}), then each {it.rows.label} against {it.reference} at every "
        f"{it.columns.label} (matched). The last column is the interaction contrast: whether the gain grows or "
        f"shrinks from {it.columns.label}={cols[0]} to {cols[-1]} (an interval excluding 0 says it does)."],
        Table([it.rows.label, *(f"{it.columns.label}={c}" for c in cols), dep], rows))


def _cell_levels(it: Interaction) -> tuple[list[str], list[str]]:
    """The row and column levels of the interaction's cells, in order: exactly the levels it has estimates for."""
    return list(dict.fromkeys(r for r, _ in it.cells)), list(dict.fromkeys(c for _, c in it.cells))


def ablation_figures(ablation: Ablation, analysis: Analysis) -> dict[str, bytes]:
    """main_effects.png, interaction.png (loss × ε) and parallel_coordinates.png as PNG bytes."""
    s = ablation.scale
    ylabel = f"{ablation.metric}" + (" (%)" if s == 100 else "")

    def drawn(e: Estimate) -> tuple[float, float, float]:
        # An accuracy's t-interval can cross 0 or 100 with few seeds; drawn, it stops at what is possible.
        low, high = s * e.low, s * e.high
        return (s * e.mean, max(low, 0.0), min(high, 100.0)) if s == 100 else (s * e.mean, low, high)

    figures = {}
    if analysis.effects:
        figures["main_effects.png"] = plots.main_effects(
            {e.factor.label + (f" ({e.factor.note})" if e.factor.note else ""):
             [(lv, *drawn(st)) for lv, st in e.levels.items()] for e in analysis.effects}, ylabel=ylabel)
    it = analysis.interaction
    if it is not None:
        rows, cols = _cell_levels(it)
        figures["interaction.png"] = plots.interaction_lines(
            {r: {float(c): drawn(it.cells[(r, c)]) for c in cols} for r in rows},
            xlabel=it.columns.label, ylabel=ylabel, title=f"{it.rows.label} × {it.columns.label}")
    shown = [f for f in ablation.factors if not f.confounded]
    if shown:
        figures["parallel_coordinates.png"] = plots.parallel_coordinates(
            {f.label: _order(f, ablation.observations) for f in shown},
            [[o.levels.get(f.key, "–") for f in shown] for o in ablation.observations],
            [s * o.value for o in ablation.observations], label=ylabel)
    return {name: plots.png(fig) for name, fig in figures.items()}


def ablation_json(ablation: Ablation, analysis: Analysis) -> dict:
    """Everything the tables show, as plain data (values as stored: accuracies in [0, 1]; NaN as null)."""
    def est(e: Estimate) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(e).items()}

    it, imp = analysis.interaction, analysis.importance
    return {
        "title": ablation.title, "experiment": ablation.experiment, "sweep_id": ablation.sweep_id,
        "parent_run_id": ablation.parent_run_id, "metric": ablation.metric, "objective": ablation.objective,
        "split": ablation.split, "notes": ablation.notes, "observations": len(ablation.observations),
        "factors": [asdict(f) for f in ablation.factors],
        "main_effects": [{"factor": e.factor.label, "note": e.factor.note, "reference": e.reference,
                          "levels": {lv: est(st) for lv, st in e.levels.items()},
                          "vs_reference": {lv: est(c) for lv, c in e.contrasts.items()},
                          "best": e.best, "worst": e.worst, "effect": est(e.effect)} for e in analysis.effects],
        "interaction": None if it is None else {
            "rows": it.rows.label, "columns": it.columns.label, "reference": it.reference,
            "cells": [{"row": r, "column": c, **est(v)} for (r, c), v in it.cells.items()],
            "vs_reference": [{"row": r, "column": c, **est(v)} for (r, c), v in it.contrasts.items()],
            "dependence": {r: est(v) for r, v in it.dependence.items()}},
        "importance": None if imp is None else {"evaluator": imp.evaluator, "why": imp.why, "scores": dict(imp.scores),
                                                "rest": imp.rest if math.isfinite(imp.rest) else None},
    }
