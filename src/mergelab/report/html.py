"""A self-contained HTML report: sections of text, verdicts, tables and embedded PNG figures.

Images are embedded as base64 data URIs (the file opens anywhere, mailed or archived, with no folder
beside it); each figure still names its PNG file so readers can find the full-resolution file on disk.

Made to read on a phone as well as a desktop (checked in headless Chromium at 390 px by
``tests/test_report_browser.py``): a viewport tag, text in Markdown rendered to HTML, every table in a
horizontally scrolling box, figures at their print size (so one point of text is the same on screen in every
figure) or the page width if that is less, opening full size on a click, and one line under every figure that
says how to read it.
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

from mergelab.report.markdown import md_inline
from mergelab.report.tables import Table

#: what a quick run's report says at the top (issue 15: small test sets make a few points noise)
QUICK_BANNER = ("Quick run: reduced grid, few models and small test sets. Differences of a few points are "
                "within the noise here; verdicts say \"no difference at this size\" unless a difference exceeds "
                "its bootstrap confidence interval. The full grid: `mergelab study NAME` without --quick.")

@dataclass
class FigureRef:
    path: Path
    caption: str
    #: one line under the figure: what the axes, marks and colours mean and what to look for
    how_to_read: str = ""


@dataclass
class Verdict:
    """Whether one claim of a paper held on this run.

    ``held``: True (held), False (did not hold) or None (``undecided`` says which: the default "mixed", or
    "no difference at this size" when the differences are within their uncertainty). ``paper`` is the claim
    as the paper states it with the paper's number; ``kind="check"`` marks an identity or a theorem that the
    run verifies (a test of the code, never counted as evidence for a claim).
    """

    claim: str
    held: bool | None
    detail: str
    paper: str = ""
    kind: str = "claim"
    undecided: str = "mixed"

    @property
    def word(self) -> str:
        if self.kind == "check":
            return {True: "check passed", False: "check FAILED", None: "check not run"}[self.held]
        return {True: "held", False: "did not hold", None: self.undecided}[self.held]

    def sentence(self) -> str:
        """One sentence for a figure caption: the claim, whether it held, and the evidence."""
        if self.kind == "check":
            return f"Check “{self.claim}”: {self.word}: {self.detail}"
        return f"Paper's claim “{self.claim}” {self.word} on this run: {self.detail}"


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[FigureRef] = field(default_factory=list)


# one type scale (16 px body; 14 px tables and captions; 13 px notes), so text reads alike across sections
_CSS = """
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%;text-size-adjust:100%}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;font-size:16px;max-width:1100px;
margin:0 auto;padding:1em;color:#222;line-height:1.5;overflow-wrap:break-word}
h1{font-size:1.6em;border-bottom:2px solid #444;line-height:1.25}
h2{font-size:1.3em;margin-top:2em;border-bottom:1px solid #bbb}
code{font-size:.9em;background:#f4f4f4;padding:0 .2em;border-radius:3px;overflow-wrap:anywhere}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%;margin:.5em 0}
table{border-collapse:collapse;font-size:14px}th,td{border:1px solid #ccc;padding:3px 7px;vertical-align:top}
th{background:#f2f2f2;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td.short{white-space:nowrap}
.caption{font-weight:600;margin:.8em 0 .2em}.note{font-size:13px;color:#555}
figure{margin:1.5em 0}figure img{display:block;max-width:100%;height:auto;border:1px solid #ddd;cursor:zoom-in}
figcaption{font-size:14px;color:#333;margin-top:.3em}.howto{font-size:14px;margin:.3em 0 0;color:#222}
figure.full{position:fixed;inset:0;margin:0;padding:1em;background:#fff;overflow:auto;z-index:10}
figure.full img{max-width:none;width:auto;cursor:zoom-out}
.verdict{padding:.4em .7em;margin:.4em 0;border-left:5px solid}.verdict .paper{font-size:14px;color:#444}
.held{background:#eef8ee;border-color:#2e7d32}.failed{background:#fdeeee;border-color:#c62828}
.mixed{background:#fff8e6;border-color:#e09b00}.check{background:#f1f4f8;border-color:#6b7b8c}
.banner{background:#fff3cd;border:1px solid #e0b400;padding:.6em .8em;margin:1em 0}
.meta td{font-size:13px}.meta td:first-child{white-space:nowrap}
@media (max-width:700px){td.long{min-width:13em}}
"""

# a click on a figure shows it at full resolution (scrollable); another click or Escape closes it
_JS = """
document.addEventListener('click',function(e){var f=e.target.closest('figure');if(f&&e.target.tagName==='IMG'){
f.classList.toggle('full');}});
document.addEventListener('keydown',function(e){if(e.key==='Escape'){document.querySelectorAll('figure.full')
.forEach(function(f){f.classList.remove('full');});}});
"""


def _verdict_html(v: Verdict) -> str:
    cls = "check" if v.kind == "check" else {True: "held", False: "failed", None: "mixed"}[v.held]
    paper = f'<div class="paper">Paper: {md_inline(v.paper)}</div>' if v.paper else ""
    label = "Check" if v.kind == "check" else "Claim"
    return (f'<div class="verdict {cls}">{label}: <b>{md_inline(v.claim)}</b> — <b>{html.escape(v.word)}</b>: '
            f"{md_inline(v.detail)}{paper}</div>")


def png_css_width(png: bytes) -> int | None:
    """The width in CSS px (96 per inch) of a PNG at the resolution its pHYs chunk records (matplotlib writes
    the figure's dpi there); None without one. Shown at that width, a 10-point label reads at the same size in
    every figure: at the page width a narrow figure was blown up (fig2's title at 23 px) and a wide one shrunk."""
    pos = 8  # after the signature: chunks of length, type, data, crc
    while pos + 8 <= len(png):
        length, kind = int.from_bytes(png[pos:pos + 4], "big"), png[pos + 4:pos + 8]
        if kind == b"pHYs" and png[pos + 16] == 1:  # unit: metre
            per_metre = int.from_bytes(png[pos + 8:pos + 12], "big")
            width = int.from_bytes(png[16:20], "big")  # IHDR, always the first chunk
            return round(width * 96 / (per_metre * 0.0254)) if per_metre else None
        if kind in (b"IDAT", b"IEND"):  # pHYs comes before the image data
            return None
        pos += 12 + length
    return None


def _figure_html(f: FigureRef, base: Path | None) -> str:
    raw = f.path.read_bytes()
    data = base64.b64encode(raw).decode()
    css = png_css_width(raw)
    name = html.escape(_relative(f.path, base))
    howto = f'<p class="howto"><b>How to read this figure:</b> {md_inline(f.how_to_read)}</p>' if f.how_to_read \
        else ""
    width = f' width="{css}"' if css else ""
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{name}"{width}>'
            f"<figcaption><code>{name}</code> — {md_inline(f.caption)}</figcaption>{howto}</figure>")


def _relative(path: Path, base: Path | None) -> str:
    if base is None:
        return path.name
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.name


def format_value(value: Any) -> str:
    """A run-table value as text: mappings as ``key = value`` items, sequences comma-separated."""
    if isinstance(value, Mapping):
        return "; ".join(f"{k} = {format_value(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(format_value(v) for v in value) if value else "—"
    if value is None:
        return "—"
    return str(value)


class Report:
    """Collects sections and writes one HTML file (and can render the same content as Markdown)."""

    def __init__(self, title: str, *, intro: str = "", meta: Mapping[str, Any] | None = None,
                 quick: bool = False) -> None:
        self.title = title
        self.intro = intro
        self.meta: dict[str, Any] = dict(meta or {})
        self.sections: list[Section] = []
        self.quick = quick

    def add(self, *sections: Section) -> Report:
        self.sections.extend(sections)
        return self

    @property
    def figures(self) -> list[FigureRef]:
        return [f for s in self.sections for f in s.figures]

    def to_html(self, base: Path | None = None) -> str:
        """The page; figure names are shown relative to ``base`` (the report's folder) when given."""
        meta = {"generated": _dt.datetime.now().isoformat(timespec="seconds"),
                "python": platform.python_version(), **self.meta}
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(format_value(v))}</td></tr>"
                       for k, v in meta.items())
        toc = "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(self.sections))
        parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>"
                 "<meta name='viewport' content='width=device-width, initial-scale=1'>"
                 f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>"
                 f"<h1>{html.escape(self.title)}</h1>"]
        if self.quick:
            parts.append(f'<div class="banner">{md_inline(QUICK_BANNER)}</div>')
        if self.intro:
            parts.append(f"<p>{md_inline(self.intro)}</p>")
        parts.append(f"<ol>{toc}</ol>")
        for i, s in enumerate(self.sections):
            parts.append(f'<h2 id="s{i}">{html.escape(s.title)}</h2>')
            parts += [f"<p>{md_inline(t)}</p>" for t in s.text]
            parts += [_verdict_html(v) for v in s.verdicts]
            parts += [t.to_html() for t in s.tables]
            parts += [_figure_html(f, base) for f in s.figures]
        parts.append(f'<h2>Run</h2><div class="scroll"><table class="meta">{rows}</table></div>'
                     f"<script>{_JS}</script></body></html>")
        return "\n".join(parts)

    def to_markdown(self, base: Path | None = None) -> str:
        out = [f"# {self.title}", ""]
        if self.quick:
            out += [f"> **{QUICK_BANNER}**", ""]
        if self.intro:
            out += [self.intro, ""]
        for s in self.sections:
            out += [f"## {s.title}", ""]
            for t in s.text:
                out += [t, ""]
            for v in s.verdicts:
                label = "Check" if v.kind == "check" else "Claim"
                out += [f"- {label}: **{v.claim}** — {v.word}: {v.detail}" + (f" Paper: {v.paper}" if v.paper else "")]
            out.append("")
            for tb in s.tables:
                out += [tb.to_markdown(), ""]
            for f in s.figures:
                name = _relative(f.path, base)
                out += [f"![{f.path.name}]({name}) — {f.caption}", ""]
                if f.how_to_read:
                    out += [f"*How to read this figure:* {f.how_to_read}", ""]
        return "\n".join(out)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(path.parent), encoding="utf-8")
        return path


def combined(title: str, reports: Sequence[Report], *, intro: str = "", meta: Mapping[str, Any] | None = None
             ) -> Report:
    """One report holding the sections of several (the demo)."""
    out = Report(title, intro=intro, meta=meta, quick=any(r.quick for r in reports))
    for r in reports:
        out.add(*r.sections)
    return out
