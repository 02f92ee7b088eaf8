"""A study's report: robust accuracy by configuration × attack × ε (mean ± std over seeds, n), the latent
cluster metrics, every masking diagnostic's verdict, and plots — as Markdown and as self-contained HTML.

Built from the finished trial runs of an experiment (optionally one sweep), grouped by configuration with
``tracking.queries.compare_runs``; numbers are read from MLflow, so a report can be made again at any time.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from tracking import plots
from tracking.paper import paper_numbers
from tracking.queries import SEED_PARAM, Group, compare_runs, varying_params

__all__ = ["Report", "build_report", "write_report"]

ROBUST = re.compile(r"^(val|test)/robust_acc/([^/]+)/eps_(.+)$")
CHECK = re.compile(r"^check/([a-z_]+)$")
LATENT = ("val/latent/silhouette", "val/latent/inter_intra_ratio")


@dataclass
class Report:
    title: str
    split: str
    groups: list[Group]
    labels: list[str]  # one short name per group (the parameters that vary)
    sections: list[tuple[str, str]] = field(default_factory=list)  # (heading, markdown body)
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


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _robust_keys(groups: list[Group], split: str) -> list[tuple[str, str, float]]:
    keys = set()
    for g in groups:
        for run in g.runs:
            for k in run.data.metrics:
                m = ROBUST.match(k)
                if m and m.group(1) == split:
                    keys.add((k, m.group(2), float(m.group(3))))
    # Attacks first, the worst case last; within an attack by ε.
    return sorted(keys, key=lambda t: (t[1].startswith("worst_case"), t[1], t[2]))


def build_report(client, experiment: str, *, sweep_id: str | None = None, split: str = "test") -> Report:
    """Group the finished trials of ``experiment`` (of one sweep if given) and tabulate them."""
    where = f"tags.`gce.sweep_id` = '{sweep_id}'" if sweep_id else ""
    groups = compare_runs(client, experiment, metric="val/robust_acc/worst_case", filter_string=where)
    if not groups:
        raise ValueError(f"no finished trial runs in experiment {experiment!r}" + (f" for sweep {sweep_id}"
                                                                                  if sweep_id else ""))
    varying = [k for k in varying_params(g.params for g in groups) if k != "sweep.point"]  # a summary of the rest
    labels = [_label(g, varying) for g in groups]
    title = f"{experiment}" + (f" — sweep {sweep_id}" if sweep_id else "")
    report = Report(title, split, groups, labels)
    n_runs = sum(len(g.runs) for g in groups)
    report.sections.append(("Setup", f"{n_runs} finished trial runs in {len(groups)} configurations; numbers are "
                            f"accuracy in % on the {split} split, mean ± sample std over seeds (n). Configurations "
                            f"differ in: {', '.join(varying) or 'nothing'}. Selection happens on validation metrics "
                            "only; this report shows both."))
    clean = [[lab, _fmt(g.stat("val/clean_acc")), _fmt(g.stat(f"{split}/clean_acc")), _fmt(g.stat(LATENT[0]), 1.0),
              _fmt(g.stat(LATENT[1]), 1.0)] for g, lab in zip(groups, labels, strict=True)]
    report.sections.append(("Clean accuracy and latent clusters", _table(
        ["configuration", "val clean", f"{split} clean (attacked subset)", "silhouette", "inter/intra ratio"], clean)))
    keys = _robust_keys(groups, split)
    datasets = {g.params.get("data.dataset") for g in groups}
    dataset = datasets.pop() if len(datasets) == 1 else None
    rows = [[attack, f"{eps:g}", *(_fmt(g.stat(k)) for g in groups), _paper_cell(dataset, attack, eps)]
            for k, attack, eps in keys]
    note = ("\n\nThe last column is the paper's Table 3/5 (LeNet-5 on full MNIST, ResNet-56 on CIFAR-10; attacks "
            "with the model's training loss, i.e. our `<attack>-train` rows), where the setting matches.")
    report.sections.append((f"Robust accuracy ({split})",
                            _table(["attack", "ε", *labels, "paper (XE · COT · GCE)"], rows) + note))
    gains = _gains(groups, keys, dataset)
    if gains:
        report.sections.append(("The paper's gains, measured (GCE − XE)", gains))
    report.sections.append(("Gradient-masking diagnostics", _diagnostics(groups, labels)))
    report.figures["worst_case_curves.png"] = _png(_worst_case_figure(groups, labels, keys))
    pareto = _pareto_figure(groups, labels)
    if pareto is not None:
        report.figures["pareto_front.png"] = _png(pareto)
    alpha = _alpha_figure(groups, keys)
    if alpha is not None:
        report.figures["alpha_curve.png"] = _png(alpha)
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


def _gains(groups: list[Group], keys, dataset: str | None) -> str:
    """Table 3's claim row by row: the paper's GCE − XE gap beside ours, attacked with the training loss (the
    paper's setting), with CE, and by the margin / APGD attacks and the worst case at the same ε."""
    ce, gce = _paper_gce(groups)
    if ce is None or gce is None:
        return ""
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
        return ""
    alpha = float(gce.params.get("loss.alpha") or 1 / 3)
    return (f"Points of robust accuracy gained by GCE (α = {alpha:.3g}) over CE: difference of the seed means ± its "
            "standard error. *paper*: Table 3's GCE − XE (attacks with the model's training loss). *ours, training "
            "loss*: the same attack with each model's own loss, as in the paper. *ours, CE / other*: the attack "
            "with CE (or the margin and APGD attacks, and the per-example worst case over every attack) — a gain "
            "that holds only under the training loss is the loss's gradients, not robustness.\n\n"
            + _table(["attack", "ε", "paper", "ours, training loss", "ours, CE / other"], rows))


def _diagnostics(groups: list[Group], labels: list[str]) -> str:
    names = sorted({m.group(1) for g in groups for r in g.runs for t in r.data.tags if (m := CHECK.match(t))}
                   - {"raised"})
    if not names:
        return "No diagnostics were recorded (evaluation.checks was off, or no attacks)."
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
                    details.append(f"- {lab}, seed {r.data.params.get('train.seed', '?')}: `{name}` — "
                                   f"{r.data.tags.get(f'check/{name}/detail', '')}")
    return _table(["check", *labels], rows) + ("\n\n" + "\n".join(details) if details else "")


def _paper_cell(dataset: str | None, attack: str, eps: float) -> str:
    numbers = paper_numbers(dataset, attack, eps) if dataset else None
    if not numbers:
        return ""
    return " · ".join(f"{name} {numbers[key]:.2f}" for key, name in (("ce", "XE"), ("cot", "COT"), ("gce", "GCE"))
                      if key in numbers)


def _pareto_figure(groups: list[Group], labels: list[str]):
    """Validation clean vs worst-case robust accuracy of every run; the non-dominated runs joined as the front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r.data.metrics.get("val/clean_acc"), r.data.metrics.get("val/robust_acc/worst_case"), lab)
              for g, lab in zip(groups, labels, strict=True) for r in g.runs]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    if len(points) < 2:
        return None
    figure, ax = plt.subplots(figsize=(6, 4.5))
    for lab in dict.fromkeys(p[2] for p in points):
        xs, ys = zip(*[(p[0], p[1]) for p in points if p[2] == lab], strict=True)
        ax.scatter(xs, ys, label=lab, alpha=0.8)
    front = sorted((p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q[:2] != p[:2] for q in points)),
                   key=lambda p: p[0])
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", linewidth=1, label="Pareto front")
    ax.set_xlabel("val clean accuracy")
    ax.set_ylabel("val worst-case robust accuracy")
    ax.set_title("Clean vs robust accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return figure


def _worst_case_figure(groups: list[Group], labels: list[str], keys):
    curves = {}
    for g, lab in zip(groups, labels, strict=True):
        curves[lab] = {eps: g.stat(k).mean for k, attack, eps in keys if attack == "worst_case"}
    return plots.robustness_curves(curves, None)


def _alpha_figure(groups: list[Group], keys):
    """Worst-case robust accuracy against GCE's α, one line per ε, when α varies (the α ablation)."""
    gce = [g for g in groups if g.params.get("loss.name") == "gce" and "loss.alpha" in g.params]
    if len({g.params["loss.alpha"] for g in gce}) < 2:
        return None
    curves: dict[str, dict[float, float]] = {}
    for k, attack, eps in keys:
        if attack == "worst_case":
            curves[f"ε={eps:g}"] = {float(g.params["loss.alpha"]): g.stat(k).mean for g in gce}
    figure = plots.robustness_curves(curves, None)
    figure.axes[0].set_xlabel("GCE α")
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return buffer.getvalue()


def to_markdown(report: Report) -> str:
    parts = [f"# Report: {report.title}"]
    for heading, body in report.sections:
        parts.append(f"## {heading}\n\n{body}")
    parts.append("## Plots\n\n" + "\n".join(f"![{name}]({name})" for name in report.figures))
    return "\n\n".join(parts) + "\n"


def to_html(report: Report) -> str:
    """Self-contained HTML: the Markdown tables as HTML tables, the PNGs embedded as data URIs."""
    body = [f"<h1>Report: {html.escape(report.title)}</h1>"]
    for heading, text in report.sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        body.append(_markdown_block_to_html(text))
    body.append("<h2>Plots</h2>")
    for name, png in report.figures.items():
        data = base64.b64encode(png).decode()
        body.append(f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}'
                    "</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>" \
           + "\n".join(body) + "</body></html>\n"


def _markdown_block_to_html(text: str) -> str:
    out, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                rows.append([html.escape(c.strip()).replace("**", "") for c in line.strip("|").split("|")])
            continue
        if rows:
            head, *rest = rows
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rest) + "</table>")
            rows = []
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    return "\n".join(out)


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
