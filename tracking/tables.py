"""``best`` and ``compare`` results as flat records: a rich table for people, JSON or CSV for programs.

Records carry every parameter (``params.<name>``) so that machine output is complete; the table shows only
the parameters that differ between its rows, which is what a reader compares.
"""

from __future__ import annotations

import csv
import io
import json
import math

from rich.table import Table

from tracking.logger import metric_key
from tracking.queries import Group, held_out_metric, varying_params

FORMATS = ("table", "json", "csv")


def best_records(runs: list, metric: str) -> list[dict]:
    metric = metric_key(metric)
    test = held_out_metric(metric)
    records = []
    for rank, run in enumerate(runs, 1):
        m = run.data.metrics
        record = {"rank": rank, "run_id": run.info.run_id, "run_name": run.info.run_name, metric: m.get(metric)}
        if test:
            record[test] = m.get(test)
        record.update({f"params.{k}": v for k, v in sorted(run.data.params.items())})
        records.append(record)
    return records


def compare_records(groups: list[Group], metric: str) -> list[dict]:
    metrics = [k for k in (metric_key(metric), held_out_metric(metric_key(metric))) if k]
    records = []
    for rank, group in enumerate(groups, 1):
        record: dict = {"rank": rank, "n": len(group.runs)}
        for key in metrics:
            stat = group.stat(key)
            record.update({f"{key} mean": _num(stat.mean), f"{key} std": _num(stat.std), f"{key} n": stat.n})
        record.update({f"params.{k}": v for k, v in sorted(group.params.items())})
        record["run_ids"] = [r.info.run_id for r in group.runs]
        records.append(record)
    return records


def render(records: list[dict], fmt: str, title: str = "") -> str | Table:
    """The records as ``fmt``: text for json and csv, a rich Table (print it with a Console) for table."""
    if fmt == "json":
        return json.dumps(records, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        keys = list(dict.fromkeys(k for r in records for k in r))
        writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        for r in records:
            writer.writerow({k: ";".join(v) if isinstance(v, list) else v for k, v in r.items()})
        return out.getvalue()
    if fmt != "table":
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return _table(records, title)


def _table(records: list[dict], title: str) -> Table:
    params = [f"params.{k}" for k in varying_params(
        {k[7:]: v for k, v in r.items() if k.startswith("params.")} for r in records)]
    table = Table(title=title, title_justify="left")
    shown = [k for k in (records[0] if records else {}) if not k.startswith("params.") and k != "run_ids"]
    columns = []
    for key in shown:
        if key.endswith((" std", " n")):
            continue
        base = key[:-5] if key.endswith(" mean") else key
        columns.append((key, base))
        table.add_column(base + (" (mean ± std)" if key.endswith(" mean") else ""),
                         justify="right" if key != "run_name" and key != "run_id" else "left")
    for key in params:
        table.add_column(key[7:])
    for r in records:
        cells = []
        for key, base in columns:
            if key.endswith(" mean"):
                std = r.get(f"{base} std")
                cells.append(_fmt(r[key]) + ("" if std is None else f" ± {_fmt(std)}"))
            elif key == "run_id":
                cells.append(r[key][:12])  # enough to find it in the UI; json and csv carry the full id
            else:
                cells.append(_fmt(r[key]))
        cells += [str(r.get(k, "")) for k in params]
        table.add_row(*cells)
    return table


def _num(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
