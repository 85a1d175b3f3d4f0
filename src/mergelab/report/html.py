"""A self-contained HTML report: sections of text, verdicts, tables and embedded PNG figures.

Images are embedded as base64 data URIs (the file opens anywhere, mailed or archived, with no folder
beside it); each figure still names its PNG file so readers can find the full-resolution file on disk.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab.report.tables import Table


@dataclass
class FigureRef:
    path: Path
    caption: str


@dataclass
class Verdict:
    """Whether one claim of the paper held on this run; ``held=None`` means mixed or not testable."""

    claim: str
    held: bool | None
    detail: str

    def sentence(self) -> str:
        """One sentence for a figure caption: the claim, whether it held, and the evidence."""
        word = {True: "held", False: "did not hold", None: "was mixed"}[self.held]
        return f"Paper's claim “{self.claim}” {word} on this run: {self.detail}"


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[FigureRef] = field(default_factory=list)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
.caption{font-weight:600;margin-bottom:.2em}.note{font-size:12px;color:#555}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:13px;color:#333}figcaption code{color:#555}
.verdict{padding:.35em .7em;margin:.3em 0;border-left:5px solid}
.held{background:#eef8ee;border-color:#2e7d32}.failed{background:#fdeeee;border-color:#c62828}
.mixed{background:#fff8e6;border-color:#e09b00}.meta td{font-size:12px}
"""


def _verdict_html(v: Verdict) -> str:
    cls, word = {True: ("held", "held"), False: ("failed", "did not hold"), None: ("mixed", "mixed")}[v.held]
    return (f'<div class="verdict {cls}"><b>{html.escape(v.claim)}</b> — {word}. '
            f"{html.escape(v.detail)}</div>")


def _figure_html(f: FigureRef) -> str:
    data = base64.b64encode(f.path.read_bytes()).decode()
    name = html.escape(f.path.name)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{name}">'
            f"<figcaption><code>{name}</code> — {html.escape(f.caption)}</figcaption></figure>")


class Report:
    """Collects sections and writes one HTML file (and can render the same content as Markdown)."""

    def __init__(self, title: str, *, intro: str = "", meta: Mapping[str, Any] | None = None) -> None:
        self.title = title
        self.intro = intro
        self.meta: dict[str, Any] = dict(meta or {})
        self.sections: list[Section] = []

    def add(self, *sections: Section) -> Report:
        self.sections.extend(sections)
        return self

    @property
    def figures(self) -> list[FigureRef]:
        return [f for s in self.sections for f in s.figures]

    def to_html(self) -> str:
        meta = {"generated": _dt.datetime.now().isoformat(timespec="seconds"),
                "python": platform.python_version(), **self.meta}
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in meta.items())
        toc = "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(self.sections))
        parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(self.title)}"
                 f"</title><style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>"]
        if self.intro:
            parts.append(f"<p>{html.escape(self.intro)}</p>")
        parts.append(f"<ol>{toc}</ol>")
        for i, s in enumerate(self.sections):
            parts.append(f'<h2 id="s{i}">{html.escape(s.title)}</h2>')
            parts += [f"<p>{html.escape(t)}</p>" for t in s.text]
            parts += [_verdict_html(v) for v in s.verdicts]
            parts += [t.to_html() for t in s.tables]
            parts += [_figure_html(f) for f in s.figures]
        parts.append(f'<h2>Run</h2><table class="meta">{rows}</table></body></html>')
        return "\n".join(parts)

    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        if self.intro:
            out += [self.intro, ""]
        for s in self.sections:
            out += [f"## {s.title}", ""]
            for t in s.text:
                out += [t, ""]
            for v in s.verdicts:
                word = {True: "held", False: "did not hold", None: "mixed"}[v.held]
                out += [f"- **{v.claim}** — {word}. {v.detail}"]
            out.append("")
            for tb in s.tables:
                out += [tb.to_markdown(), ""]
            for f in s.figures:
                out += [f"![{f.path.name}]({f.path.name}) — {f.caption}", ""]
        return "\n".join(out)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        return path


def combined(title: str, reports: Sequence[Report], *, intro: str = "", meta: Mapping[str, Any] | None = None
             ) -> Report:
    """One report holding the sections of several (the demo)."""
    out = Report(title, intro=intro, meta=meta)
    for r in reports:
        out.add(*r.sections)
    return out
