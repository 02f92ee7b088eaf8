"""The report's charts: one robustness-against-ε chart per configuration (with one shared legend), the worst case
of every configuration on one chart, against GCE's α when α varies, and clean against robust accuracy per run.

Also the names the charts share with the report's tables: attacks as a paper names them, GCE's α of a group.
"""

from __future__ import annotations

import math
import re

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gce.metrics import clean_key
from tracking import plots
from tracking.queries import Group, _finite

__all__ = ["OWN", "alpha_of", "attack_label", "pareto_figure", "robustness_charts", "summary_figures"]

OWN = "-train"  # an attack label's suffix when the attack uses the model's own training loss (the paper's setting)


def attack_label(label: str) -> str:
    """``fgsm-train`` -> ``FGSM (own loss)``, ``worst_case`` -> ``worst case``: attacks as a paper names them."""
    if label.startswith("worst_case"):
        norm = label.removeprefix("worst_case").lstrip("-")
        return "worst case" + (f" ({norm.upper()})" if norm else "")
    base = label.removesuffix(OWN)
    return base.upper() + (" (own loss)" if base != label else "")


def alpha_of(group: Group) -> float | None:
    try:
        return float(group.params.get("loss.alpha"))
    except (TypeError, ValueError):  # absent, or "None" (GCE's default α)
        return None


def robustness_charts(groups: list[Group], labels: list[str], keys, split: str) -> dict[str, bytes]:
    """One robustness-against-ε chart per configuration on the same axes and colours, so that they compare side
    by side, and one legend for all of them; an own-loss attack is dashed in its standard twin's colour, so the
    gap between the two — the signature of gradient masking — is read at a glance."""
    if not keys:
        return {}
    ordered = sorted(keys, key=lambda t: (t[1].startswith("worst_case"), t[1].endswith(OWN)))
    bases = list(dict.fromkeys(a.removesuffix(OWN) for _, a, _ in ordered if not a.startswith("worst_case")))
    colour = {base: f"C{i % 10}" for i, base in enumerate(bases)}
    charts = {}
    for g, label in zip(groups, labels, strict=True):
        curves: dict[str, dict[float, float]] = {}
        for key, attack, eps in ordered:
            curves.setdefault(attack, {})[eps] = g.stat(key).mean
        clean = g.stat(clean_key(split)).mean
        fig = plots.robustness_curves(curves, clean_acc=None if math.isnan(clean) else clean, title=label)
        fig.set_size_inches(4.8, 3.5)
        ax = fig.axes[0]
        for line in ax.get_lines():
            attack = line.get_label()
            if not attack.startswith("worst_case"):  # drawn black and bold already
                line.set_color(colour[attack.removesuffix(OWN)])
                line.set_linestyle("--" if attack.endswith(OWN) else "-")
        ax.get_legend().remove()
        ax.set_ylabel("robust accuracy")
        fig.tight_layout()
        slug = re.sub(r"[^a-z0-9]+", "_", label.lower().replace("α", "alpha")).strip("_") or "all"
        name = f"robustness_{slug}.png"
        charts[name if name not in charts else f"robustness_{len(charts)}_{slug}.png"] = plots.png(fig)
    legend = Figure(figsize=(4.8, 3.5))
    attacks = list(dict.fromkeys(a for _, a, _ in ordered))
    handles = [Line2D([], [], marker="o", color="black", linewidth=2.5) if a.startswith("worst_case") else
               Line2D([], [], marker="o", color=colour[a.removesuffix(OWN)], linewidth=1.2,
                      linestyle="--" if a.endswith(OWN) else "-") for a in attacks]
    legend.legend(handles, [attack_label(a) for a in attacks], loc="center", ncol=2 if len(attacks) > 7 else 1,
                  frameon=False, title="attack", fontsize=9)
    charts["robustness_legend.png"] = plots.png(legend)
    return charts


def summary_figures(groups: list[Group], labels: list[str], keys) -> dict[str, bytes]:
    """Worst-case robust accuracy against ε, every configuration on one chart; against GCE's α when α is what tells
    the GCE configurations apart (one per α: with another factor varying too, a point per α would be any one)."""
    worst = [(k, eps) for k, attack, eps in keys if attack == "worst_case"]
    if not worst:
        return {}
    figures = {"worst_case_curves.png": plots.robustness_curves(
        {lab: {eps: g.stat(k).mean for k, eps in worst} for g, lab in zip(groups, labels, strict=True)},
        title="Worst case over every attack")}
    gce = [(a, g) for g in groups if g.params.get("loss.name") == "gce" and (a := alpha_of(g)) is not None]
    alphas = {a for a, _ in gce}
    if len(alphas) >= 2 and len(alphas) == len(gce):
        figures["alpha_curve.png"] = plots.robustness_curves(
            {f"ε={eps:g}": {a: g.stat(k).mean for a, g in gce} for k, eps in worst}, xlabel="GCE α",
            title="Worst case against GCE's α")
    return {name: plots.png(figure) for name, figure in figures.items()}


def pareto_figure(groups: list[Group], labels: list[str]) -> dict[str, bytes]:
    """Validation clean against worst-case accuracy of every run, with the Pareto front (two runs at least)."""
    points = [(r.data.metrics.get("val/clean_acc"), r.data.metrics.get("val/robust_acc/worst_case"), lab)
              for g, lab in zip(groups, labels, strict=True) for r in g.runs]
    points = [p for p in points if _finite(p[0]) and _finite(p[1])]  # a NaN point would hide the front
    return {"pareto_front.png": plots.png(plots.pareto_front(points))} if len(points) >= 2 else {}

