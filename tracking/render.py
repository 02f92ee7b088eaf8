"""A report as data — titled sections of prose, a table, a list and PNG figures — rendered two ways from the
same data: Markdown, and self-contained HTML (escaped, the PNGs embedded as data URIs).

Text is Markdown inline (``*emphasis*``, ``**bold**``, `` `code` ``): written as is in Markdown, turned into the
matching tags in HTML. Figures belong to the section that discusses them, so a section added by someone else
(an ablation) brings its own plots and is placed where it is read.
"""

from __future__ import annotations

import base64
import html
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    left: int = 1  # leading columns of names (left-aligned); the rest are numbers, right-aligned
    reference: Sequence[int] = ()  # columns of someone else's numbers (the paper's), set apart
    spans: list[tuple[str, int]] = field(default_factory=list)  # (label, width) over the header, left to right


@dataclass
class Section:
    """Rendered in this order: ``prose`` paragraphs, the ``table``, ``notes`` paragraphs, the ``items`` list,
    the ``figures`` ({file name: PNG}, side by side in HTML)."""

    heading: str
    prose: list[str] = field(default_factory=list)
    table: Table | None = None
    notes: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)


# Compact tables that never wrap a number (a wide table scrolls instead), prose at a readable measure, figures
# in a grid so that one chart per configuration reads as one figure.
STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#222;max-width:1280px;
 margin:1.5em auto;padding:0 1.5em}
h1{font-size:1.45em;margin-bottom:.3em}
h2{font-size:1.15em;margin:1.8em 0 .5em;padding-bottom:.2em;border-bottom:1px solid #ddd}
p,li,details{max-width:95ch}
code{font-size:88%;background:#f2f2f2;padding:0 .25em;border-radius:3px}
.tw{overflow-x:auto;margin:.6em 0 .9em}
table{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums}
th,td{padding:3px 10px;white-space:nowrap;text-align:right}
th{font-weight:600;border-bottom:1.5px solid #555;vertical-align:bottom}
td{border-bottom:1px solid #e6e6e6}
th.l,td.l{text-align:left}
th.ref,td.ref{background:#f5f5f7;color:#444}
th.sep,td.sep{border-left:1.5px solid #ccc}
tr.spans th{text-align:center;border-bottom:1px solid #bbb}
tbody tr:hover td{background:#eef4fb}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:10px 16px;margin:.8em 0}
.figs figure{margin:0}
.figs figure.wide{grid-column:1/-1}
.figs img{max-width:100%;height:auto}
details summary{cursor:pointer;color:#345}
ul{padding-left:1.3em}
"""


def to_markdown(doc) -> str:
    """``doc``: anything with a ``title`` and ``sections``, e.g. a Report."""
    parts = [f"# Report: {doc.title}"]
    for section in doc.sections:
        blocks = [*section.prose, *([_markdown_table(section.table)] if section.table else []), *section.notes]
        if section.items:
            blocks.append("\n".join(f"- {item}" for item in section.items))
        if section.figures:
            blocks.append("\n".join(f"![{name}]({name})" for name in section.figures))
        parts.append(f"## {section.heading}\n\n" + "\n\n".join(blocks))
    return "\n\n".join(parts) + "\n"


def to_html(doc) -> str:
    """Self-contained HTML: the tables as HTML tables, the PNGs embedded as data URIs."""
    body = [f"<h1>Report: {html.escape(doc.title)}</h1>"]
    for section in doc.sections:
        body.append(f"<h2>{_inline(section.heading)}</h2>")
        body += [f"<p>{_inline(text)}</p>" for text in section.prose]
        if section.table:
            body.append(_html_table(section.table))
        body += [f"<p>{_inline(text)}</p>" for text in section.notes]
        if section.items:
            items = "<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in section.items) + "</ul>"
            # A long list of details would bury what follows: folded, one click away.
            body.append(items if len(section.items) <= 6 else
                        f"<details><summary>{len(section.items)} details</summary>{items}</details>")
        if section.figures:
            body.append('<div class="figs">' + "".join(
                f'<figure{_wide(png)}><img alt="{html.escape(name)}" '
                f'src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'
                for name, png in section.figures.items()) + "</div>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(doc.title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


_BOLD, _EM, _CODE = re.compile(r"\*\*(.+?)\*\*"), re.compile(r"\*(\S(?:.*?\S)?)\*"), re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    """Escaped text with Markdown's inline bold, emphasis and code as tags (code first: its content is literal)."""
    out, last = [], 0
    for m in _CODE.finditer(text):
        out.append(_emphasis(text[last:m.start()]))
        out.append(f"<code>{html.escape(m.group(1))}</code>")
        last = m.end()
    out.append(_emphasis(text[last:]))
    return "".join(out)


def _emphasis(text: str) -> str:
    return _EM.sub(r"<em>\1</em>", _BOLD.sub(r"<strong>\1</strong>", html.escape(text, quote=False)))


def _markdown_table(table: Table) -> str:
    header = [f"{span} {name}" if span else name for span, name in zip(_span_labels(table), table.header,
                                                                      strict=True)]
    align = [":---" if i < table.left else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return "\n".join(lines)


def _span_labels(table: Table) -> list[str]:
    """Each column's span label ("" outside any span); Markdown has no colspan, so it goes into the header."""
    labels = [label for label, width in table.spans for _ in range(width)]
    return (labels + [""] * len(table.header))[:len(table.header)]


def _html_table(table: Table) -> str:
    reference = set(table.reference)
    starts, i = set(), 0
    for _, width in table.spans:
        starts.add(i)
        i += width

    def cls(i: int) -> str:
        names = (["l"] if i < table.left else []) + (["ref"] if i in reference else [])
        names += ["sep"] if i and (i in starts or (i in reference and i - 1 not in reference)) else []
        return f' class="{" ".join(names)}"' if names else ""

    def cells(tag: str, row: list[str]) -> str:
        return "".join(f"<{tag}{cls(i)}>{_inline(c.strip())}</{tag}>" for i, c in enumerate(row))

    head = f"<tr>{cells('th', table.header)}</tr>"
    if table.spans:
        spans, i = [], 0
        for label, width in table.spans:
            spans.append(f'<th colspan="{width}"{cls(i)}>{_inline(label)}</th>')
            i += width
        head = f'<tr class="spans">{"".join(spans)}</tr>' + head
    return (f'<div class="tw"><table><thead>{head}</thead><tbody>'
            + "".join(f"<tr>{cells('td', row)}</tr>" for row in table.rows) + "</tbody></table></div>")


def _wide(png: bytes) -> str:
    """A figure of several panels side by side (wider than twice its height) gets the grid's whole row: in one
    cell its panels would be thumbnails."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or len(png) < 24:
        return ""
    width, height = struct.unpack(">II", png[16:24])
    return ' class="wide"' if width > 2 * height else ""


def write(doc, out_dir: str | Path, stem: str, *, html_too: bool = True) -> list[Path]:
    """``<stem>.md`` (and ``<stem>.html``) and the document's PNGs in ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.md"]
    paths[0].write_text(to_markdown(doc))
    if html_too:
        paths.append(out / f"{stem}.html")
        paths[1].write_text(to_html(doc))
    for name, png in doc.figures.items():
        (out / name).write_bytes(png)
        paths.append(out / name)
    return paths
