"""The report's result sections after its setup: the answer (GCE − CE per attack and ε beside the paper's gap, with
one robustness chart per configuration), clean accuracy and latent clusters, the gradient-masking diagnostics, and
every attack at every ε. Each takes the report's groups and labels, in reading order, and carries its figures.
"""

from __future__ import annotations

import math
import re

from gce.metrics import clean_key, latent_key
from tracking.paper import paper_losses, paper_numbers
from tracking.queries import SEED_PARAM, Group
from tracking.render import Section, Table
from tracking.report_figures import OWN, alpha_of, attack_label, pareto_figure, robustness_charts, summary_figures

__all__ = ["answer_section", "clean_section", "diagnostics_section", "full_table_section"]

CHECK = re.compile(r"^check/([a-z_]+)$")
LATENT = (latent_key("val", "silhouette"), latent_key("val", "inter_intra_ratio"))


def answer_section(groups: list[Group], labels: list[str], keys, dataset: str | None, split: str) -> Section:
    """The gains table and one robustness chart per configuration: what a reader came for."""
    charts = robustness_charts(groups, labels, keys, split)
    legend = ("Each chart: one configuration's robust accuracy against ε (clean accuracy at ε = 0), a line per "
              "attack; dashed, the same attack with the model's own training loss (the paper's setting); black, "
              "the per-example worst case over every attack.")
    ce, gce = _paper_pair(groups)
    if ce is None or gce is None:
        return Section("Robust accuracy against ε", [
            "No CE and GCE configurations differ in the loss alone, so there is no GCE − CE comparison; the "
            "full table is at the end.", legend], figures=charts)
    gce_label = labels[[id(g) for g in groups].index(id(gce))]
    table, own, paper, worst = _gains(gce, ce, keys, dataset)
    claims = []
    if own:
        claims.append(f"attacked with each model's own training loss, as in the paper, {gce_label} − CE is "
                      f"{_span(own)} points (the paper: {_span(paper)})")
    if worst:
        claims.append(f"against the per-example worst case over every attack, {'; '.join(worst)}")
    return Section(f"GCE − CE: robust accuracy gained ({split})", [
        f"**{gce_label} against CE.** " + (_sentence("; ".join(claims)) if claims else "No attack was run on both.")],
        table, [f"Points of robust accuracy gained by {gce_label} over CE: the difference of the seed means ± its "
                "standard error. *standard*: the attack with its standard loss (CE; the margin for PGD-CW, DLR for "
                "APGD-DLR), and the worst case over every attack. *own loss*: the attack with each model's "
                "training loss, as in the paper. *paper*: the paper's Table 3/5 GCE − XE, where the setting "
                "matches. A gain that holds only with the model's own loss comes from that loss's gradients, not "
                "from robustness.", legend], figures=charts)


def _gains(gce: Group, ce: Group, keys, dataset: str | None) -> tuple[Table, list[float], list[float], list[str]]:
    """GCE − CE laid out as the paper's Table 3 (an attack a row, ε across), each ε with the standard attack,
    the own-loss attack and the paper's gap side by side; and what the summary sentence needs: the own-loss
    gains that the paper has a gap for, those gaps, and the worst case per ε."""
    by = {(label, eps): key for key, label, eps in keys}
    radii = sorted({eps for _, _, eps in keys})
    attacks = list(dict.fromkeys(label.removesuffix(OWN) for _, label, _ in keys))  # keys are in reading order

    def gap(attack: str, eps: float) -> float | None:
        paper = paper_numbers(dataset, f"{attack}{OWN}", eps) if dataset else None
        return paper["gce"] - paper["ce"] if paper and "gce" in paper and "ce" in paper else None

    columns = [(eps, kind) for eps in radii for kind in ("standard", "own loss", "paper")]
    rows, own, paper, worst = [], [], [], []
    for attack in attacks:
        cells = []
        for eps, kind in columns:
            if kind == "paper":
                g = gap(attack, eps)
                cells.append("" if g is None else _signed(g))
                continue
            d = _diff(gce, ce, by.get((f"{attack}{OWN}" if kind == "own loss" else attack, eps)))
            cells.append(_fmt_diff(d) if d else "")
            if d and kind == "own loss" and gap(attack, eps) is not None:
                own.append(d[0])
                paper.append(gap(attack, eps))
            if d and attack == "worst_case":
                worst.append(f"{_fmt_diff(d)} at ε = {eps:g}")
        if any(cells):
            rows.append([attack_label(attack), *cells])
    keep = [i for i in range(len(columns)) if any(row[i + 1] for row in rows)]  # none empty
    columns, rows = [columns[i] for i in keep], [[row[0], *(row[i + 1] for i in keep)] for row in rows]
    spans = [("", 1)] + [(f"ε = {eps:g}", n) for eps in radii if (n := sum(e == eps for e, _ in columns))]
    reference = [i + 1 for i, (_, kind) in enumerate(columns) if kind == "paper"]
    return Table(["attack", *(kind for _, kind in columns)], rows, reference=reference, spans=spans), own, paper, \
        worst


def _span(values: list[float]) -> str:
    low, high = _signed(min(values)), _signed(max(values))
    return low if low == high else f"{low} to {high}"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _paper_pair(groups: list[Group]) -> tuple[Group | None, Group | None]:
    """The CE configuration and the GCE one at the paper's α = 1/3 (else the first GCE) that differ from it in
    the loss alone; (None, None) when the study has no such single pair (other factors vary too)."""
    def rest(g: Group) -> dict:
        return {k: v for k, v in g.params.items()
                if not k.startswith("loss.") and k != "sweep.point" and not SEED_PARAM.search(k)}

    ces = [g for g in groups if g.params.get("loss.name") == "ce"]
    if len(ces) != 1:
        return None, None
    gces = [g for g in groups if g.params.get("loss.name") == "gce" and rest(g) == rest(ces[0])]
    # No α logged: the 1/3 default. Not ``alpha or 1/3``: α = 0 is a valid α of its own.
    paper = [g for g in gces if math.isclose(1 / 3 if (a := alpha_of(g)) is None else a, 1 / 3, rel_tol=1e-3)]
    return (ces[0], (paper or gces)[0]) if gces else (None, None)


def _diff(a: Group, b: Group, key: str | None) -> tuple[float, float] | None:
    """a − b in points: the difference of the seed means and its standard error (NaN with a single seed)."""
    if key is None:
        return None
    x, y = a.stat(key), b.stat(key)
    if x.n == 0 or y.n == 0:
        return None
    se = math.sqrt(x.std ** 2 / x.n + y.std ** 2 / y.n) if x.n > 1 and y.n > 1 else math.nan
    return 100 * (x.mean - y.mean), 100 * se


def _fmt_diff(d: tuple[float, float] | None) -> str:
    if d is None:
        return "–"
    return _signed(d[0]) + ("" if math.isnan(d[1]) else f" ± {d[1]:.1f}")


def _signed(x: float) -> str:
    """+1.5 / −1.5 with a true minus sign, as wide as the plus, so that signed columns line up."""
    return f"{x:+.1f}".replace("-", "−")


def clean_section(groups: list[Group], labels: list[str], split: str, n: int) -> Section:
    rows = [[lab, _fmt(g.stat("val/clean_acc"), n), _fmt(g.stat(clean_key(split)), n),
             _fmt(g.stat(LATENT[0]), n, 1.0, 2), _fmt(g.stat(LATENT[1]), n, 1.0, 2)]
            for g, lab in zip(groups, labels, strict=True)]
    return Section("Clean accuracy and latent clusters", table=Table(
        ["configuration", "val clean", f"{split} clean", "silhouette", "inter/intra"], rows), notes=[
        f"*{split} clean*: on the attacked subset. *silhouette*, *inter/intra*: of the penultimate features on "
        "validation (higher: tighter, better separated class clusters — the paper's argument for GCE). The plot: "
        "validation clean against worst-case accuracy of every run, with the Pareto front."],
        figures=pareto_figure(groups, labels))


def diagnostics_section(groups: list[Group], labels: list[str]) -> Section:
    names = sorted({m.group(1) for g in groups for r in g.runs for t in r.data.tags if (m := CHECK.match(t))}
                   - {"raised"})
    heading = "Gradient-masking diagnostics"
    if not names:
        return Section(heading, ["No diagnostics were recorded (evaluation.checks was off, or no attacks)."])
    rows = []
    for name in names:
        cells = []
        for g in groups:
            statuses = [r.data.tags.get(f"check/{name}") for r in g.runs]
            raised, ran = statuses.count("raised"), sum(s in ("raised", "ok") for s in statuses)
            cells.append(f"**raised {raised}/{ran}**" if raised else (f"ok {ran}/{ran}" if ran else "skipped"))
        rows.append([name, *cells])
    details = []
    for g, lab in zip(groups, labels, strict=True):
        for r in g.runs:
            seed = next((v for k, v in sorted(r.data.params.items()) if SEED_PARAM.search(k)), "?")
            for name in names:
                if r.data.tags.get(f"check/{name}") == "raised":
                    details.append(f"{lab}, seed {seed}: `{name}` — {r.data.tags.get(f'check/{name}/detail', '')}")
    return Section(heading, ["Runs in which a check raised, per configuration: a raised check means the "
                             "attack's numbers may overstate robustness."],
                   Table(["check", *labels], rows), items=details)


def full_table_section(groups: list[Group], labels: list[str], keys, dataset: str | None, split: str,
                       n: int) -> Section:
    """Every attack at every ε for every configuration, the paper's numbers in their own columns."""
    losses = paper_losses(dataset)
    rows = []
    for k, attack, eps in keys:
        paper = paper_numbers(dataset, attack, eps) if dataset else None
        rows.append([attack_label(attack), f"{eps:g}", *(_fmt(g.stat(k), n) for g in groups),
                     *(f"{paper[loss]:.2f}" if paper and loss in paper else "" for loss in losses)])
    notes = ["*(own loss)*: the attack with the model's training loss (`<attack>-train` in metric keys and the "
             "diagnostics); the others use their standard loss."]
    if losses:
        notes.append("*paper*: the paper's Table 3/5 (LeNet-5 on full MNIST, ResNet-56 on CIFAR-10; attacks with "
                     "the model's training loss, i.e. our *own loss* rows), as published, where the setting matches.")
    return Section(f"Robust accuracy, every attack ({split})", table=Table(
        ["attack", "ε", *labels, *(f"paper {loss.upper()}" for loss in losses)], rows,
        reference=range(2 + len(labels), 2 + len(labels) + len(losses))), notes=notes,
        figures=summary_figures(groups, labels, keys))



def _fmt(stat, n: int, scale: float = 100.0, digits: int = 1) -> str:
    """mean ± std; the seed count only where it differs from the study's usual ``n``."""
    if stat.n == 0 or math.isnan(stat.mean):
        return "–"
    std = "" if math.isnan(stat.std) else f" ± {scale * stat.std:.{digits}f}"
    return f"{scale * stat.mean:.{digits}f}{std}" + ("" if stat.n == n else f" ({stat.n})")
