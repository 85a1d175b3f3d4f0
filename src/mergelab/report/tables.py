"""Tables as lists of row dicts, written as CSV, GitHub Markdown and HTML (no pandas needed)."""

from __future__ import annotations

import csv
import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab.report.markdown import md_inline

#: text cells up to this many characters keep to one line in HTML (labels such as "97.2 / 96.2", "vgg6bn")
SHORT_CELL = 16
#: text cells longer than this keep a readable width on a phone (the table scrolls sideways instead): at 390 px
#: the claims tables squeezed every column to a word or two, rows grew to screens of blank cells
LONG_CELL = 40

Row = Mapping[str, Any]


def _columns(rows: Sequence[Row], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            seen.setdefault(k, None)
    return list(seen)


def _fmt(value: Any, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return floatfmt.format(value) if value == value else "n/a"  # NaN != NaN
    return str(value)


def write_csv(rows: Sequence[Row], path: Path, columns: Sequence[str] | None = None) -> Path:
    """Full-precision CSV (floats as repr) with the union of keys as header, in first-seen order."""
    cols = _columns(rows, columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c, "") for c in cols})
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def markdown_table(rows: Sequence[Row], columns: Sequence[str] | None = None, *,
                   headers: Mapping[str, str] | None = None, floatfmt: str = "{:.2f}",
                   bold: Callable[[Row, str], bool] | None = None) -> str:
    """A GitHub-flavoured Markdown table; ``bold(row, column)`` marks cells to emphasise (e.g. row best)."""
    cols = _columns(rows, columns)
    names = [(headers or {}).get(c, c) for c in cols]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join(
        "---:" if rows and isinstance(rows[0].get(c), int | float) else "---" for c in cols) + "|"]
    for r in rows:
        cells = []
        for c in cols:
            text = _fmt(r.get(c), floatfmt)
            cells.append(f"**{text}**" if bold and bold(r, c) else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class Table:
    """A titled table with optional bold cells; renders to Markdown, HTML and CSV."""

    title: str
    rows: list[dict[str, Any]]
    columns: list[str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    floatfmt: str = "{:.2f}"
    note: str = ""
    bold: Callable[[Row, str], bool] | None = None
    #: columns whose cells are inline Markdown (links, `code`): rendered to HTML, not shown as literal text
    markdown: tuple[str, ...] = ()

    def to_markdown(self) -> str:
        body = markdown_table(self.rows, self.columns, headers=self.headers, floatfmt=self.floatfmt,
                              bold=self.bold)
        parts = [f"**{self.title}**", "", body]
        if self.note:
            parts += ["", self.note]
        return "\n".join(parts)

    def to_html(self) -> str:
        cols = _columns(self.rows, self.columns)
        head = "".join(f"<th>{html.escape(self.headers.get(c, c))}</th>" for c in cols)
        body = []
        for r in self.rows:
            cells = []
            for c in cols:
                v = r.get(c)
                plain = _fmt(v, self.floatfmt)
                text = md_inline(plain) if c in self.markdown else html.escape(plain)
                # numbers and short labels keep to one line, long text keeps a column's width on a phone (the
                # scroll box takes the width); the rest wraps as the browser likes
                cls = (' class="num"' if isinstance(v, int | float) and not isinstance(v, bool)
                       else ' class="short"' if len(plain) <= SHORT_CELL
                       else ' class="long"' if len(plain) > LONG_CELL else "")
                if self.bold and self.bold(r, c):
                    text = f"<b>{text}</b>"
                cells.append(f"<td{cls}>{text}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        note = f'<p class="note">{md_inline(self.note)}</p>' if self.note else ""
        # the scroll box keeps a wide table from widening the page on a phone: it scrolls on its own
        return (f'<div class="table"><p class="caption">{md_inline(self.title)}</p><div class="scroll"><table>'
                f'<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>{note}</div>')

    def write_csv(self, path: Path) -> Path:
        return write_csv(self.rows, path, self.columns)


def best_in_row(columns: Sequence[str]) -> Callable[[Row, str], bool]:
    """Bold the largest value among ``columns`` in each row (ties all bold)."""
    def bold(row: Row, col: str) -> bool:
        if col not in columns:
            return False
        vals = [row.get(c) for c in columns if isinstance(row.get(c), int | float)]
        return bool(vals) and row.get(col) == max(vals)  # type: ignore[type-var]

    return bold
