"""A study's report, laid out like a paper's results section: the answer first (GCE − CE per attack and ε beside
the paper's gap, and each configuration's robust accuracy against ε), then clean accuracy and latent clusters,
the masking diagnostics, and the full per-attack table last — as Markdown and as self-contained HTML.

Built from the finished trial runs of an experiment (optionally one sweep), grouped by configuration with
``tracking.queries.compare_runs``; numbers are read from MLflow, so a report can be made again at any time.
Configurations are named by ``tracking.labels`` (``CE``, ``GCE α=1/3``), as in every other table and plot.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gce.metrics import clean_key, latent_key, parse_robust
from tracking import plots
from tracking.labels import config_label, factor_label, value_label
from tracking.logger import SWEEP_TAG
from tracking.paper import paper_losses, paper_numbers
from tracking.queries import SEED_PARAM, Group, compare_runs, varying_params
from tracking.render import Section, Table, to_html, to_markdown

__all__ = ["Extra", "Report", "Section", "Table", "build_report", "make_report", "resolve_target", "to_html",
           "to_markdown", "write_report"]

CHECK = re.compile(r"^check/([a-z_]+)$")
LATENT = (latent_key("val", "silhouette"), latent_key("val", "inter_intra_ratio"))
RUN_ID = re.compile(r"[0-9a-f]{32}")
LOSSES = ("ce", "cot", "gce")  # reading order: the baseline first, as the paper's columns
PAPER_ATTACKS = ("fgsm", "bim", "pgd", "mim")
OWN = "-train"  # an attack label's suffix when the attack uses the model's own training loss (the paper's setting)


@dataclass
class Report:
    title: str
    split: str
    groups: list[Group]  # in reading order: CE, COT, GCE by α, then by the other varying factors
    labels: list[str]  # one short name per group (``GCE α=1/3``)
    sections: list[Section] = field(default_factory=list)

    @property
    def figures(self) -> dict[str, bytes]:
        """Every section's figures (file name -> PNG): what ``write_report`` writes beside the report."""
        return {name: png for section in self.sections for name, png in section.figures.items()}


#: Sections to insert right after the answer (an ablation, with its own figures), or a function of the report
#: that returns them — it sees the same groups and labels as the rest of the report.
Extra = Sequence[Section] | Callable[[Report], Sequence[Section]]


def _label(group: Group, varying: list[str]) -> str:
    """``config_label``'s name, except that a section whose parameters vary as a whole (three or more
    ``adversarial.*``: training with or without an attack) is one short item, not a dozen ``key=value``s."""
    sections: dict[str, list[str]] = {}
    for key in varying:  # a bare "adversarial" (None when off) belongs with its section's keys
        if not key.startswith("loss."):  # the loss is config_label's, written as a paper writes it
            sections.setdefault(key.split(".")[0], []).append(key)
    whole = {s: keys for s, keys in sections.items() if len(keys) >= 3}
    rest = [k for k in varying if k.split(".")[0] not in whole]
    parts = [config_label(group.params, rest)] if rest else []
    for section, keys in whole.items():
        values = {k.partition(".")[2]: group.params.get(k) for k in keys
                  if "." in k and group.params.get(k) not in (None, "", "None")}
        summary = " ".join(value_label(values[k]) if k == "name" else f"{'ε' if k == 'eps' else k}="
                           f"{value_label(values[k])}" for k in ("name", "eps", "steps", "loss") if k in values)
        parts.append(f"{section}={summary or 'none'}")
    return ", ".join(parts) or "all runs"


def _order(groups: list[Group], varying: list[str]) -> list[Group]:
    """CE, COT, then GCE by α, then by the other varying factors (numbers by value): a paper's column order.
    Ties keep compare_runs' order (best validation worst case first)."""
    keys = _factors(varying)

    def value(key: str, v: str | None) -> tuple:
        if key == "loss.name" and v in LOSSES:
            return (0, LOSSES.index(v), "")
        try:
            return (1, float(v), "")
        except (TypeError, ValueError):
            return (2, 0.0, str(v))

    return sorted(groups, key=lambda g: tuple(value(k, g.params.get(k)) for k in keys))


def _factors(varying: list[str]) -> list[str]:
    """The varying params, the loss first and then α, as a label reads them."""
    return sorted(varying, key=lambda k: (k != "loss.name", k != "loss.alpha"))


def _attack(label: str) -> str:
    """``fgsm-train`` -> ``FGSM (own loss)``, ``worst_case`` -> ``worst case``: attacks as a paper names them."""
    if label.startswith("worst_case"):
        norm = label.removeprefix("worst_case").lstrip("-")
        return "worst case" + (f" ({norm.upper()})" if norm else "")
    base = label.removesuffix(OWN)
    return base.upper() + (" (own loss)" if base != label else "")


def _fmt(stat, n: int, scale: float = 100.0, digits: int = 1) -> str:
    """mean ± std; the seed count only where it differs from the study's usual ``n``."""
    if stat.n == 0 or math.isnan(stat.mean):
        return "–"
    std = "" if math.isnan(stat.std) else f" ± {scale * stat.std:.{digits}f}"
    return f"{scale * stat.mean:.{digits}f}{std}" + ("" if stat.n == n else f" ({stat.n})")


def _robust_keys(groups: list[Group], split: str) -> list[tuple[str, str, float]]:
    """(metric key, attack label, ε): the paper's attacks first (each before its own-loss twin), then the
    others, the worst case last; within an attack by ε."""
    keys = set()
    for g in groups:
        for run in g.runs:
            for k in run.data.metrics:
                key = parse_robust(k)  # the metric schema's own parser
                if key and key.split == split and not key.chain:
                    keys.add((k, key.label, key.eps))

    def rank(t: tuple[str, str, float]) -> tuple:
        base = t[1].removesuffix(OWN)
        paper = PAPER_ATTACKS.index(base) if base in PAPER_ATTACKS else len(PAPER_ATTACKS)
        return (t[1].startswith("worst_case"), paper, base, t[1] != base, t[2])

    return sorted(keys, key=rank)


def build_report(client, experiment: str, *, sweep_id: str | None = None, split: str = "test",
                 extra: Extra | None = None) -> Report:
    """Group the finished trials of ``experiment`` (of one sweep if given) and write their results up.
    ``extra``: sections placed right after the answer (see ``Extra``); figure names must be unique."""
    where = f"tags.`{SWEEP_TAG}` = '{sweep_id}'" if sweep_id else ""
    groups = compare_runs(client, experiment, metric="val/robust_acc/worst_case", filter_string=where)
    if not groups:
        raise ValueError(f"no finished trial runs in experiment {experiment!r}" + (f" for sweep {sweep_id}"
                                                                                  if sweep_id else ""))
    varying = [k for k in varying_params(g.params for g in groups) if k != "sweep.point"]  # a summary of the rest
    groups = _order(groups, varying)
    labels = [_label(g, varying) for g in groups]
    report = Report(f"{experiment}" + (f" — sweep {sweep_id}" if sweep_id else ""), split, groups, labels)
    n = Counter(len(g.runs) for g in groups).most_common(1)[0][0]
    keys = _robust_keys(groups, split)
    datasets = {g.params.get("data.dataset") for g in groups}
    dataset = datasets.pop() if len(datasets) == 1 else None
    report.sections += [_setup(groups, labels, varying, split), _answer(groups, labels, keys, dataset, split)]
    if extra is not None:
        report.sections += list(extra(report) if callable(extra) else extra)
    report.sections += [_clean(groups, labels, split, n), _diagnostics(groups, labels),
                        _full_table(groups, labels, keys, dataset, split, n)]
    names = Counter(name for section in report.sections for name in section.figures)
    if clashes := sorted(name for name, count in names.items() if count > 1):
        raise ValueError(f"two sections have a figure named {', '.join(clashes)}")
    return report


def _setup(groups: list[Group], labels: list[str], varying: list[str], split: str) -> Section:
    seeds = sorted({len(g.runs) for g in groups})
    per = f"{seeds[0]} seeds" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]} seeds"
    fixed = [value_label(groups[0].params[k]) for k in ("data.dataset", "model.name")
             if k in groups[0].params and k not in varying]
    named = f" ({', '.join(labels)})" if len(labels) <= 10 else ""
    return Section("Setup", [
        f"{sum(len(g.runs) for g in groups)} finished runs: {len(groups)} configurations{named} × {per}"
        + (f" on {' with '.join(fixed)}" if fixed else "") + f". Accuracy in % on the {split} split, mean ± sample "
        "standard deviation over seeds; a count in parentheses is a number of seeds that differs from the rest. "
        f"The configurations differ in {', '.join(factor_label(k) for k in _factors(varying)) or 'nothing'}; selection "
        "uses validation metrics only."])


def _answer(groups: list[Group], labels: list[str], keys, dataset: str | None, split: str) -> Section:
    """The gains table and one robustness chart per configuration: what a reader came for."""
    charts = _charts(groups, labels, keys, split)
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
            rows.append([_attack(attack), *cells])
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


def _charts(groups: list[Group], labels: list[str], keys, split: str) -> dict[str, bytes]:
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
    legend.legend(handles, [_attack(a) for a in attacks], loc="center", ncol=2 if len(attacks) > 7 else 1,
                  frameon=False, title="attack", fontsize=9)
    charts["robustness_legend.png"] = plots.png(legend)
    return charts


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
    paper = [g for g in gces if math.isclose(_alpha(g) or 1 / 3, 1 / 3, rel_tol=1e-3)]  # None: the 1/3 default
    return (ces[0], (paper or gces)[0]) if gces else (None, None)


def _alpha(group: Group) -> float | None:
    try:
        return float(group.params.get("loss.alpha"))
    except (TypeError, ValueError):  # absent, or "None" (GCE's default α)
        return None


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


def _clean(groups: list[Group], labels: list[str], split: str, n: int) -> Section:
    rows = [[lab, _fmt(g.stat("val/clean_acc"), n), _fmt(g.stat(clean_key(split)), n),
             _fmt(g.stat(LATENT[0]), n, 1.0, 2), _fmt(g.stat(LATENT[1]), n, 1.0, 2)]
            for g, lab in zip(groups, labels, strict=True)]
    points = [(r.data.metrics.get("val/clean_acc"), r.data.metrics.get("val/robust_acc/worst_case"), lab)
              for g, lab in zip(groups, labels, strict=True) for r in g.runs]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    figures = {"pareto_front.png": plots.png(plots.pareto_front(points))} if len(points) >= 2 else {}
    return Section("Clean accuracy and latent clusters", table=Table(
        ["configuration", "val clean", f"{split} clean", "silhouette", "inter/intra"], rows), notes=[
        f"*{split} clean*: on the attacked subset. *silhouette*, *inter/intra*: of the penultimate features on "
        "validation (higher: tighter, better separated class clusters — the paper's argument for GCE). The plot: "
        "validation clean against worst-case accuracy of every run, with the Pareto front."], figures=figures)


def _diagnostics(groups: list[Group], labels: list[str]) -> Section:
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


def _full_table(groups: list[Group], labels: list[str], keys, dataset: str | None, split: str, n: int) -> Section:
    """Every attack at every ε for every configuration, the paper's numbers in their own columns."""
    losses = paper_losses(dataset)
    rows = []
    for k, attack, eps in keys:
        paper = paper_numbers(dataset, attack, eps) if dataset else None
        rows.append([_attack(attack), f"{eps:g}", *(_fmt(g.stat(k), n) for g in groups),
                     *(f"{paper[loss]:.2f}" if paper and loss in paper else "" for loss in losses)])
    notes = ["*(own loss)*: the attack with the model's training loss (`<attack>-train` in metric keys and the "
             "diagnostics); the others use their standard loss."]
    if losses:
        notes.append("*paper*: the paper's Table 3/5 (LeNet-5 on full MNIST, ResNet-56 on CIFAR-10; attacks with "
                     "the model's training loss, i.e. our *own loss* rows), as published, where the setting matches.")
    return Section(f"Robust accuracy, every attack ({split})", table=Table(
        ["attack", "ε", *labels, *(f"paper {loss.upper()}" for loss in losses)], rows,
        reference=range(2 + len(labels), 2 + len(labels) + len(losses))), notes=notes,
        figures=_summary_figures(groups, labels, keys))


def _summary_figures(groups: list[Group], labels: list[str], keys) -> dict[str, bytes]:
    """Worst-case robust accuracy against ε, every configuration on one chart; against GCE's α when α varies."""
    worst = [(k, eps) for k, attack, eps in keys if attack == "worst_case"]
    if not worst:
        return {}
    figures = {"worst_case_curves.png": plots.robustness_curves(
        {lab: {eps: g.stat(k).mean for k, eps in worst} for g, lab in zip(groups, labels, strict=True)},
        title="Worst case over every attack")}
    gce = [(a, g) for g in groups if g.params.get("loss.name") == "gce" and (a := _alpha(g)) is not None]
    if len({a for a, _ in gce}) >= 2:
        figures["alpha_curve.png"] = plots.robustness_curves(
            {f"ε={eps:g}": {a: g.stat(k).mean for a, g in gce} for k, eps in worst}, xlabel="GCE α",
            title="Worst case against GCE's α")
    return {name: plots.png(figure) for name, figure in figures.items()}


def write_report(report: Report, out_dir: str | Path) -> list[Path]:
    """report.md, report.html and the PNGs in ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.md", out / "report.html"]
    paths[0].write_text(to_markdown(report))
    paths[1].write_text(to_html(report))
    for name, png in report.figures.items():
        (out / name).write_bytes(png)
        paths.append(out / name)
    return paths


def resolve_target(client, target: str) -> tuple[str, str | None, str | None]:
    """(experiment, sweep id, parent run id) of ``target``: an experiment name, or a sweep's parent run id."""
    if not RUN_ID.fullmatch(target):
        return target, None, None
    parent = client.get_run(target)
    experiment = client.get_experiment(parent.info.experiment_id).name
    return experiment, parent.data.tags.get(SWEEP_TAG), parent.info.run_id


def make_report(client, target: str, out: str | Path | None = None, *, split: str = "test",
                extra: Extra | None = None) -> tuple[list[Path], str | None]:
    """Build and write the report of ``target`` (``resolve_target``) to ``out`` (default reports/<sweep id or
    experiment>); a sweep's report is also logged to its parent run, under ``report/``. Returns (the paths
    written, the parent run id or None); a ValueError when the experiment has no finished trials."""
    experiment, sweep_id, parent = resolve_target(client, target)
    if extra is None:  # the ablation's answer (tracking.ablation) right after the report's own
        extra = _ablation(client, target, split)
    paths = write_report(build_report(client, experiment, sweep_id=sweep_id, split=split, extra=extra),
                         out or Path("reports") / (sweep_id or experiment))
    if parent is not None:
        for path in paths:
            client.log_artifact(parent, str(path), "report")
    return paths, parent


def _ablation(client, target: str, split: str) -> list[Section]:
    """The ablation's sections, or a one-line note saying why there are none (one configuration, no metric)."""
    from tracking.ablation import AblationError, ablation_sections, load_ablation

    try:
        sections, _ = ablation_sections(load_ablation(client, target, split=split))
    except AblationError as err:
        return [Section("Ablation", [f"No ablation: {err}"])]
    return sections
