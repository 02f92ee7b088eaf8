"""A study's report: robust accuracy by configuration × attack × ε (mean ± std over seeds, n), the latent
cluster metrics, every masking diagnostic's verdict, and plots — as Markdown and as self-contained HTML.

Built from the finished trial runs of an experiment (optionally one sweep), grouped by configuration with
``tracking.queries.compare_runs``; numbers are read from MLflow, so a report can be made again at any time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from gce.metrics import parse_robust
from tracking import plots
from tracking.logger import SWEEP_TAG
from tracking.paper import paper_numbers
from tracking.queries import SEED_PARAM, Group, compare_runs, varying_params
from tracking.render import Section, Table, to_html, to_markdown

__all__ = ["Report", "build_report", "make_report", "resolve_target", "to_html", "to_markdown", "write_report"]

CHECK = re.compile(r"^check/([a-z_]+)$")
LATENT = ("val/latent/silhouette", "val/latent/inter_intra_ratio")
RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class Report:
    title: str
    split: str
    groups: list[Group]
    labels: list[str]  # one short name per group (the parameters that vary)
    sections: list[Section] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG


def _label(group: Group, varying: list[str]) -> str:
    """The varying params of a group; a section that varies as a whole (``adversarial.*``) as one short item."""
    sections: dict[str, list[str]] = {}
    for key in varying:
        sections.setdefault(key.split(".")[0] if key.count(".") else key, []).append(key)
    parts = []
    for section, keys in sections.items():
        if len(keys) < 3:
            parts += [f"{k}={_short(group.params.get(k, '-'))}" for k in keys]
            continue
        values = {k.split(".", 1)[1]: group.params.get(k) for k in keys if group.params.get(k) is not None}
        summary = " ".join(_short(values[k]) if k == "name" else f"{k}={_short(values[k])}"
                           for k in ("name", "eps", "steps", "loss") if k in values)
        parts.append(f"{section}={summary or 'none'}")
    return ", ".join(parts) or "all runs"


def _short(value: str) -> str:
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def _fmt(stat, scale: float = 100.0) -> str:
    if stat.n == 0 or math.isnan(stat.mean):
        return "–"
    std = "" if math.isnan(stat.std) else f" ± {scale * stat.std:.2f}"
    return f"{scale * stat.mean:.2f}{std} ({stat.n})"


def _robust_keys(groups: list[Group], split: str) -> list[tuple[str, str, float]]:
    keys = set()
    for g in groups:
        for run in g.runs:
            for k in run.data.metrics:
                key = parse_robust(k)  # the metric schema's own parser
                if key and key.split == split and not key.chain:
                    keys.add((k, key.label, key.eps))
    # Attacks first, the worst case last; within an attack by ε.
    return sorted(keys, key=lambda t: (t[1].startswith("worst_case"), t[1], t[2]))


def build_report(client, experiment: str, *, sweep_id: str | None = None, split: str = "test") -> Report:
    """Group the finished trials of ``experiment`` (of one sweep if given) and tabulate them."""
    where = f"tags.`{SWEEP_TAG}` = '{sweep_id}'" if sweep_id else ""
    groups = compare_runs(client, experiment, metric="val/robust_acc/worst_case", filter_string=where)
    if not groups:
        raise ValueError(f"no finished trial runs in experiment {experiment!r}" + (f" for sweep {sweep_id}"
                                                                                  if sweep_id else ""))
    varying = [k for k in varying_params(g.params for g in groups) if k != "sweep.point"]  # a summary of the rest
    labels = [_label(g, varying) for g in groups]
    title = f"{experiment}" + (f" — sweep {sweep_id}" if sweep_id else "")
    report = Report(title, split, groups, labels)
    n_runs = sum(len(g.runs) for g in groups)
    report.sections.append(Section("Setup", [
        f"{n_runs} finished trial runs in {len(groups)} configurations; numbers are accuracy in % on the {split} "
        f"split, mean ± sample std over seeds (n). Configurations differ in: {', '.join(varying) or 'nothing'}. "
        "Selection happens on validation metrics only; this report shows both."]))
    clean = [[lab, _fmt(g.stat("val/clean_acc")), _fmt(g.stat(f"{split}/clean_acc")), _fmt(g.stat(LATENT[0]), 1.0),
              _fmt(g.stat(LATENT[1]), 1.0)] for g, lab in zip(groups, labels, strict=True)]
    report.sections.append(Section("Clean accuracy and latent clusters", table=Table(
        ["configuration", "val clean", f"{split} clean (attacked subset)", "silhouette", "inter/intra ratio"], clean)))
    keys = _robust_keys(groups, split)
    datasets = {g.params.get("data.dataset") for g in groups}
    dataset = datasets.pop() if len(datasets) == 1 else None
    rows = [[attack, f"{eps:g}", *(_fmt(g.stat(k)) for g in groups), _paper_cell(dataset, attack, eps)]
            for k, attack, eps in keys]
    note = ("The last column is the paper's Table 3/5 (LeNet-5 on full MNIST, ResNet-56 on CIFAR-10; attacks with "
            "the model's training loss, i.e. our `<attack>-train` rows), where the setting matches.")
    report.sections.append(Section(f"Robust accuracy ({split})", table=Table(
        ["attack", "ε", *labels, "paper (XE · COT · GCE)"], rows), notes=[note]))
    gains = _gains(groups, keys, dataset)
    if gains:
        report.sections.append(gains)
    report.sections.append(_diagnostics(groups, labels))
    report.figures.update(_figures(groups, labels, keys))
    return report


def _paper_gce(groups: list[Group]) -> tuple[Group | None, Group | None]:
    """The CE configuration and the GCE one at the paper's α = 1/3 (else the first GCE) that differ from it in
    the loss alone; (None, None) when the study has no such single pair (other factors vary too)."""
    def rest(g: Group) -> dict:
        return {k: v for k, v in g.params.items()
                if not k.startswith("loss.") and k != "sweep.point" and not SEED_PARAM.search(k)}

    ces = [g for g in groups if g.params.get("loss.name") == "ce"]
    if len(ces) != 1:
        return None, None
    gces = [g for g in groups if g.params.get("loss.name") == "gce" and rest(g) == rest(ces[0])]
    paper = [g for g in gces if math.isclose(float(g.params.get("loss.alpha") or 1 / 3), 1 / 3, rel_tol=1e-3)]
    return (ces[0], (paper or gces)[0]) if gces else (None, None)


def _delta(gce: Group, ce: Group, key: str | None) -> str:
    """GCE − CE in points: difference of the seed means ± its standard error."""
    if key is None:
        return "–"
    a, b = gce.stat(key), ce.stat(key)
    if a.n == 0 or b.n == 0:
        return "–"
    se = math.sqrt(sum(s.std ** 2 / s.n for s in (a, b) if s.n > 1)) if a.n > 1 and b.n > 1 else math.nan
    return f"{100 * (a.mean - b.mean):+.1f}" + ("" if math.isnan(se) else f" ± {100 * se:.1f}")


def _gains(groups: list[Group], keys, dataset: str | None) -> Section | None:
    """Table 3's claim row by row: the paper's GCE − XE gap beside ours, attacked with the training loss (the
    paper's setting), with CE, and by the margin / APGD attacks and the worst case at the same ε."""
    ce, gce = _paper_gce(groups)
    if ce is None or gce is None:
        return None
    by = {(label, eps): key for key, label, eps in keys}
    radii = sorted({eps for _, _, eps in keys})
    rows = []
    for attack in ("fgsm", "bim", "pgd", "mim"):
        for eps in radii:
            paper = paper_numbers(dataset, f"{attack}-train", eps) if dataset else None
            if not paper and (f"{attack}-train", eps) not in by and (attack, eps) not in by:
                continue
            paper_gap = f"{paper['gce'] - paper['ce']:+.1f}" if paper and "gce" in paper and "ce" in paper else ""
            rows.append([attack.upper(), f"{eps:g}", paper_gap, _delta(gce, ce, by.get((f"{attack}-train", eps))),
                         _delta(gce, ce, by.get((attack, eps)))])
    others = [label for label in ("pgd-cw", "apgd", "apgd-dlr", "worst_case")
              if any(lab == label for lab, _ in by)]
    for label in others:
        for eps in radii:
            if (label, eps) in by:
                rows.append([label, f"{eps:g}", "", "", _delta(gce, ce, by[(label, eps)])])
    if not rows:
        return None
    alpha = float(gce.params.get("loss.alpha") or 1 / 3)
    return Section("The paper's gains, measured (GCE − XE)", [
        f"Points of robust accuracy gained by GCE (α = {alpha:.3g}) over CE: difference of the seed means ± its "
        "standard error. *paper*: Table 3's GCE − XE (attacks with the model's training loss). *ours, training "
        "loss*: the same attack with each model's own loss, as in the paper. *ours, CE / other*: the attack "
        "with CE (or the margin and APGD attacks, and the per-example worst case over every attack) — a gain "
        "that holds only under the training loss is the loss's gradients, not robustness."],
        Table(["attack", "ε", "paper", "ours, training loss", "ours, CE / other"], rows))


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
            for name in names:
                if r.data.tags.get(f"check/{name}") == "raised":
                    details.append(f"{lab}, seed {r.data.params.get('train.seed', '?')}: `{name}` — "
                                   f"{r.data.tags.get(f'check/{name}/detail', '')}")
    return Section(heading, table=Table(["check", *labels], rows), items=details)


def _paper_cell(dataset: str | None, attack: str, eps: float) -> str:
    numbers = paper_numbers(dataset, attack, eps) if dataset else None
    if not numbers:
        return ""
    return " · ".join(f"{name} {numbers[key]:.2f}" for key, name in (("ce", "XE"), ("cot", "COT"), ("gce", "GCE"))
                      if key in numbers)


def _figures(groups: list[Group], labels: list[str], keys) -> dict[str, bytes]:
    """Worst-case robust accuracy against ε per configuration; validation clean against worst-case accuracy of
    every run with its Pareto front (two runs or more); worst case against GCE's α when α varies."""
    worst = [(k, eps) for k, attack, eps in keys if attack == "worst_case"]
    figures = {"worst_case_curves.png": plots.robustness_curves(
        {lab: {eps: g.stat(k).mean for k, eps in worst} for g, lab in zip(groups, labels, strict=True)})}
    points = [(r.data.metrics.get("val/clean_acc"), r.data.metrics.get("val/robust_acc/worst_case"), lab)
              for g, lab in zip(groups, labels, strict=True) for r in g.runs]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    if len(points) >= 2:
        figures["pareto_front.png"] = plots.pareto_front(points)
    gce = [g for g in groups if g.params.get("loss.name") == "gce" and "loss.alpha" in g.params]
    if len({g.params["loss.alpha"] for g in gce}) >= 2:
        figures["alpha_curve.png"] = plots.robustness_curves(
            {f"ε={eps:g}": {float(g.params["loss.alpha"]): g.stat(k).mean for g in gce} for k, eps in worst},
            xlabel="GCE α")
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


def make_report(client, target: str, out: str | Path | None = None, *, split: str = "test"
                ) -> tuple[list[Path], str | None]:
    """Build and write the report of ``target`` (``resolve_target``) to ``out`` (default reports/<sweep id or
    experiment>); a sweep's report is also logged to its parent run, under ``report/``. Returns (the paths
    written, the parent run id or None); a ValueError when the experiment has no finished trials."""
    experiment, sweep_id, parent = resolve_target(client, target)
    paths = write_report(build_report(client, experiment, sweep_id=sweep_id, split=split),
                         out or Path("reports") / (sweep_id or experiment))
    if parent is not None:
        for path in paths:
            client.log_artifact(parent, str(path), "report")
    return paths, parent
