"""Report builder: tables (CSV/Markdown/HTML) and a self-contained HTML file with every figure embedded."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from mergelab.report import FigureRef, Report, Section, Table, Verdict, markdown_table, write_csv
from mergelab.report.plots import grouped_bars, heatmaps, image_grid, line_panels, scatter_panels
from mergelab.report.tables import best_in_row, read_csv


def test_tables(tmp_path: Path) -> None:
    rows = [{"arch": "a", "x": 1.234, "y": 2.0}, {"arch": "b", "x": 3.0, "y": None}]
    md = markdown_table(rows, bold=best_in_row(["x", "y"]))
    assert md.splitlines()[0] == "| arch | x | y |"
    assert "**2.00**" in md and "**3.00**" in md and md.count("\n") == 3
    write_csv(rows, tmp_path / "t.csv")
    assert read_csv(tmp_path / "t.csv")[0]["x"] == "1.234"
    html = Table("T", rows, headers={"x": "X"}).to_html()
    assert "<th>X</th>" in html and "3.00" in html


def test_numbers_and_short_labels_keep_to_one_line_and_long_text_wraps() -> None:
    rows = [{"arch": "vgg6bn", "acc": "97.2 / 96.2", "x": 1.5, "claim": "Weight matching lowers the loss barrier"}]
    html = Table("T", rows).to_html()
    assert '<td class="short">vgg6bn</td>' in html and '<td class="short">97.2 / 96.2</td>' in html
    assert '<td class="num">1.50</td>' in html and "<td>Weight matching lowers the loss barrier</td>" in html
    long = "Soups are more robust than logit ensembles to scaling every weight by c"
    assert f'<td class="long">{long}</td>' in Table("T", [{"claim": long}]).to_html()
    css = Report("R").to_html()
    assert "td.short{white-space:nowrap}" in css and "@media (max-width:700px){td.long{min-width:13em}}" in css


def test_a_series_keeps_its_colour_in_every_panel_of_a_figure() -> None:
    from mergelab.report.plots import CYCLE, METHOD_COLORS, series_colors

    # rebasin: an MLP panel has no BN variants, so 'aligned' comes second there and third in a BN panel
    colors = series_colors([["naive", "aligned"], ["naive", "naive+bn_reset", "aligned", "aligned+bn_reset"]])
    assert list(colors.values()) == list(CYCLE[:4])
    assert list(colors) == ["naive", "aligned", "naive+bn_reset", "aligned+bn_reset"]
    # a method keeps its fixed colour and no other series takes that colour
    colors = series_colors([["uniform_soup", "mine"]])
    assert colors["uniform_soup"] == METHOD_COLORS["uniform_soup"] == CYCLE[0] and colors["mine"] == CYCLE[1]


def test_markdown_columns_render_links_and_code_in_html_and_every_other_cell_stays_literal() -> None:
    rows = [{"study": "[report](runs/swa/report.html)", "command": "`mergelab study swa`", "note": "<b>x</b> `y`"}]
    html = Table("T", rows, markdown=("study", "command")).to_html()
    assert '<td><a href="runs/swa/report.html">report</a></td>' in html
    assert "<td><code>mergelab study swa</code></td>" in html
    assert '<td class="short">&lt;b&gt;x&lt;/b&gt; `y`</td>' in html  # not a Markdown column: escaped as before
    assert "| [report](runs/swa/report.html) |" in Table("T", rows, markdown=("study",)).to_markdown()


def test_report_embeds_every_figure(tmp_path: Path) -> None:
    figs = [
        grouped_bars({"d": (["a", "b"], {"uniform_soup": [1, 2], "logit_ensemble": [2, 3]})}, tmp_path / "bars.png",
                     ylabel="acc (%)", title="t"),
        line_panels({"p": ([1, 2, 3], {"s": [1, 2, 3]})}, tmp_path / "lines.png", xlabel="N", ylabel="y", title="t"),
        heatmaps({"h": np.array([[1.0, -2.0], [0.0, 3.0]])}, tmp_path / "heat.png", xticks=["1", "10"],
                 yticks=["2", "3"], xlabel="c", ylabel="N", cbar_label="gap", title="t"),
        scatter_panels({"c=1": ([50, 60], [55, 40])}, tmp_path / "scatter.png", xlabel="x", ylabel="y", title="t"),
        image_grid([("r", [np.eye(3), -np.eye(3)])], tmp_path / "img.png", col_labels=["a", "b"], title="t",
                   diverging=[True]),
    ]
    rep = Report("R", intro="hello").add(Section("S", text=["para"], verdicts=[Verdict("claim", True, "3/4")],
                                                 tables=[Table("T", [{"a": 1}])],
                                                 figures=[FigureRef(f, f"caption {f.name}") for f in figs]))
    out = rep.write(tmp_path / "report.html")
    text = out.read_text()
    for f in figs:
        assert f.name in text
        assert base64.b64encode(f.read_bytes()).decode()[:200] in text  # embedded, not linked
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "claim" in text and "held" in text and "<table>" in text
    assert "![bars.png](bars.png)" in rep.to_markdown()


def test_figures_show_at_their_print_size_so_a_point_of_text_is_the_same_in_every_figure(tmp_path: Path) -> None:
    from mergelab.report.html import png_css_width
    from mergelab.report.plots import new_figure, save

    narrow, wide = new_figure(4.0, 2.0), new_figure(20.0, 2.0)  # inches, saved at 150 dpi: 600 and 3000 px
    for fig in (narrow, wide):
        fig.subplots().plot([0, 1], [0, 1])
    paths = [save(narrow, tmp_path / "narrow.png"), save(wide, tmp_path / "wide.png")]
    assert [png_css_width(p.read_bytes()) for p in paths] == [4 * 96, 20 * 96]  # 96 CSS px per inch
    assert png_css_width(paths[0].read_bytes()[:40]) is None  # no pHYs chunk: no width, the page width rules
    report = Report("R").add(Section("S", figures=[FigureRef(p, "c", "h") for p in paths]))
    page = report.to_html()
    assert 'alt="narrow.png" width="384"' in page and 'alt="wide.png" width="1920"' in page
    # the CSS caps both at the page width (max-width: 100 %), and a click shows the PNG's own pixels
    assert "max-width:100%" in page and "figure.full img{max-width:none;width:auto" in page

