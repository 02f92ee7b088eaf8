"""A report as data — titled sections of prose, a table and a list, and PNG figures — rendered two ways from the
same data: Markdown, and self-contained HTML (escaped, the PNGs embedded as data URIs).

Text is Markdown inline (``*emphasis*``, `` `code` ``), shown as written in both; ``**bold**`` table cells are
bold in Markdown and plain in HTML.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    """Rendered in this order: ``prose`` paragraphs, the ``table``, ``notes`` paragraphs, the ``items`` list."""

    heading: str
    prose: list[str] = field(default_factory=list)
    table: Table | None = None
    notes: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}")


def to_markdown(doc) -> str:
    """``doc``: anything with a ``title``, ``sections`` and ``figures`` ({file name: PNG}), e.g. a Report."""
    parts = [f"# Report: {doc.title}"]
    for section in doc.sections:
        blocks = [*section.prose, *([_markdown_table(section.table)] if section.table else []), *section.notes]
        if section.items:
            blocks.append("\n".join(f"- {item}" for item in section.items))
        parts.append(f"## {section.heading}\n\n" + "\n\n".join(blocks))
    parts.append("## Plots\n\n" + "\n".join(f"![{name}]({name})" for name in doc.figures))
    return "\n\n".join(parts) + "\n"


def to_html(doc) -> str:
    """Self-contained HTML: the tables as HTML tables, the PNGs embedded as data URIs."""
    body = [f"<h1>Report: {html.escape(doc.title)}</h1>"]
    for section in doc.sections:
        body.append(f"<h2>{html.escape(section.heading)}</h2>")
        body += [f"<p>{html.escape(text)}</p>" for text in section.prose]
        if section.table:
            body.append(_html_table(section.table))
        body += [f"<p>{html.escape(text)}</p>" for text in section.notes]
        body += [f"<p>- {html.escape(item)}</p>" for item in section.items]
    body.append("<h2>Plots</h2>")
    for name, png in doc.figures.items():
        data = base64.b64encode(png).decode()
        body.append(f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}'
                    "</figcaption></figure>")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{STYLE}</style></head><body>" \
           + "\n".join(body) + "</body></html>\n"


def _markdown_table(table: Table) -> str:
    lines = ["| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return "\n".join(lines)


def _html_table(table: Table) -> str:
    def cells(tag: str, row: list[str]) -> str:
        return "".join(f"<{tag}>{html.escape(c.strip()).replace('**', '')}</{tag}>" for c in row)

    return ("<table><tr>" + cells("th", table.header) + "</tr>"
            + "".join(f"<tr>{cells('td', row)}</tr>" for row in table.rows) + "</table>")
