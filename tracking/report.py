"""A study's report, laid out like a paper's results section: the answer first (GCE − CE per attack and ε beside
the paper's gap, and each configuration's robust accuracy against ε), then clean accuracy and latent clusters,
the masking diagnostics, and the full per-attack table last — as Markdown and as self-contained HTML.

Built from the finished trial runs of an experiment (optionally one sweep), grouped by configuration with
``tracking.queries.compare_runs``; numbers are read from MLflow, so a report can be made again at any time.
Configurations are named by ``tracking.labels`` (``CE``, ``GCE α=1/3``), as in every other table and plot.
This module groups and orders the configurations, and builds, writes and logs the report; the sections after the
setup are ``tracking.report_sections``, their charts ``tracking.report_figures``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gce.metrics import parse_robust
from tracking.labels import config_label, factor_label, value_label
from tracking.queries import Group, compare_runs, resolve_target, sweep_filter, varying_params
from tracking.render import Section, Table, to_html, to_markdown, write
from tracking.report_figures import OWN
from tracking.report_sections import answer_section, clean_section, diagnostics_section, full_table_section

__all__ = ["Extra", "Report", "Section", "Table", "build_report", "make_report", "paper_dataset", "resolve_target",
           "to_html",
           "to_markdown", "write_report"]

LOSSES = ("ce", "cot", "gce")  # reading order: the baseline first, as the paper's columns
PAPER_ATTACKS = ("fgsm", "bim", "pgd", "mim")


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
    where = sweep_filter(sweep_id)
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
    dataset = paper_dataset(groups)
    setup = _setup(groups, labels, varying, split)
    if any(_adversarial(g) for g in groups):
        setup.prose.append("The paper's numbers are left out: its Tables 3 and 5 are for standard training, and "
                           "these runs train adversarially.")
    report.sections += [setup, answer_section(groups, labels, keys, dataset, split)]
    if extra is not None:
        report.sections += list(extra(report) if callable(extra) else extra)
    report.sections += [clean_section(groups, labels, split, n), diagnostics_section(groups, labels),
                        full_table_section(groups, labels, keys, dataset, split, n)]
    names = Counter(name for section in report.sections for name in section.figures)
    if clashes := sorted(name for name, count in names.items() if count > 1):
        raise ValueError(f"two sections have a figure named {', '.join(clashes)}")
    return report


def paper_dataset(groups: list[Group]) -> str | None:
    """The dataset whose paper numbers stand beside these runs: their one dataset, when every run trains as the
    paper's Tables 3/5 did (no adversarial training); None otherwise (no paper columns)."""
    datasets = {g.params.get("data.dataset") for g in groups}
    if len(datasets) != 1 or any(_adversarial(g) for g in groups):
        return None
    return datasets.pop()


def _adversarial(group: Group) -> bool:
    return group.params.get("adversarial.name") not in (None, "None")


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


def write_report(report: Report, out_dir: str | Path) -> list[Path]:
    """report.md, report.html and the PNGs in ``out_dir``; returns the paths written."""
    return write(report, out_dir, "report")


def make_report(client, target: str, out: str | Path | None = None, *, split: str = "test",
                extra: Extra | None = None) -> tuple[list[Path], str | None]:
    """Build and write the report of ``target`` (an experiment, a sweep id, or a sweep's or trial's run id:
    ``tracking.queries.resolve_target``) to ``out`` (default reports/<sweep id or experiment>); a sweep's report is
    also logged to its parent run, under ``report/``. Returns (the paths written, the parent run id or None); a
    ValueError when the experiment has no finished trials, a QueryError when the target names nothing."""
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
