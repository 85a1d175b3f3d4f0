"""Matplotlib figures for the studies: PNG, 150 dpi, axis labels with units, legends.

Figures are built on ``matplotlib.figure.Figure`` directly (Agg canvas), never through pyplot, so they work
headless and never touch a user's interactive backend or global figure state. Every figure is drawn under
one type scale (:data:`STYLE`, applied with ``rc_context``, never globally) and puts its legend outside the
data; the HTML report shows figures at the page width and full size on a click.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

DPI = 150
#: one type scale for every figure (points): titles 11, labels 10, ticks and legends 9, cell labels 8
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
         "legend.fontsize": 9, "figure.titlesize": 12}
CELL_FONT = 8
F = TypeVar("F", bound=Callable[..., Any])


def styled(fn: F) -> F:
    """Draw under :data:`STYLE` (a context: the caller's matplotlib settings are untouched)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def legend_below(fig: Figure, axes: Sequence[Any], ncols: int = 4) -> None:
    """One legend for the whole figure, under the panels (never on the data), each label once."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=min(ncols, len(seen)))
#: fixed colours per method, so every figure of every study uses the same legend
METHOD_COLORS: dict[str, str] = {
    "perf_ave": "#9e9e9e",
    "best_single": "#616161",
    "uniform_soup": "#1f77b4",
    "greedy_soup": "#6baed6",
    "logit_ensemble": "#d62728",
    "feature_ensemble": "#ff7f0e",
    "feature_ensemble_first_head": "#fdae6b",
    "greedy_logit_ensemble": "#9467bd",
    "greedy_feature_ensemble": "#c5b0d5",
    "uniform_soup_bn_reset": "#17becf",
    "greedy_soup_bn_reset": "#9edae5",
    "soup_picks_logit_ensemble": "#8c564b",
    "soup_picks_feature_ensemble": "#c49c94",
}


#: colours for series without a fixed one (matplotlib's default cycle, tab10)
CYCLE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
         "#17becf")


def series_colors(panels_series: Iterable[Iterable[str]]) -> dict[str, str]:
    """One colour per series name for a whole figure: the method's fixed colour (:data:`METHOD_COLORS`), else
    the next :data:`CYCLE` colour that no fixed colour of this figure uses, in order of first appearance.

    Each axes cycling colours on its own gave one label different colours in different panels (rebasin's
    'aligned' was orange where it came second and green where it came third), so the one legend lied.
    """
    names = list(dict.fromkeys(s for series in panels_series for s in series))
    fixed = {s: METHOD_COLORS[s] for s in names if s in METHOD_COLORS}
    free = itertools.cycle([c for c in CYCLE if c not in fixed.values()] or CYCLE)
    return {s: fixed[s] if s in fixed else next(free) for s in names}


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


@styled
def grouped_bars(panels: Mapping[str, tuple[Sequence[str], Mapping[str, Sequence[float]]]], path: Path, *,
                 ylabel: str, title: str, labels: Mapping[str, str] | None = None,
                 ylim: tuple[float, float] | None = None) -> Path:
    """One panel per key: groups on the x axis (e.g. architectures), one bar per series (e.g. method)."""
    rows, cols = _grid(len(panels), 1)
    n_groups = max(len(g) for g, _ in panels.values())
    fig = new_figure(max(7.0, 1.6 * n_groups + 2), 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = series_colors(series for _, series in panels.values())
    for ax, (name, (groups, series)) in zip(axes, panels.items(), strict=False):
        width = 0.8 / max(1, len(series))
        x = np.arange(len(groups))
        for j, (s, vals) in enumerate(series.items()):
            ax.bar(x + (j - (len(series) - 1) / 2) * width, vals, width,
                   label=(labels or {}).get(s, s), color=colors[s])
        ax.set_xticks(x, groups)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("architecture")
        ax.set_title(name)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(axis="y", alpha=0.3)
    legend_below(fig, axes[:1], ncols=5)
    fig.suptitle(title)
    return save(fig, path)


@styled
def line_panels(panels: Mapping[str, tuple[Sequence[float], Mapping[str, Sequence[float]]]], path: Path, *,
                xlabel: str, ylabel: str, title: str, labels: Mapping[str, str] | None = None,
                hline: float | None = None, logx: bool = False, max_cols: int = 3) -> Path:
    """One panel per key with several lines (x values shared within a panel)."""
    rows, cols = _grid(len(panels), max_cols)
    fig = new_figure(max(6.5, 4.3 * cols), 3.6 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = series_colors(series for _, series in panels.values())
    for ax, (name, (x, series)) in zip(axes, panels.items(), strict=False):
        for s, vals in series.items():
            ax.plot(x, vals, marker="o", ms=3.5, label=(labels or {}).get(s, s), color=colors[s])
        if hline is not None:
            ax.axhline(hline, color="black", lw=0.8, ls="--")
            lo, hi = ax.get_ylim()
            pad = 0.03 * max(hi - lo, 1e-9)
            ax.set_ylim(min(lo, hline - pad), max(hi, hline + pad))  # keep the reference line in view
        if logx:
            ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    legend_below(fig, axes[:len(panels)])
    fig.suptitle(title)
    return save(fig, path)


@styled
def heatmaps(panels: Mapping[str, np.ndarray], path: Path, *, xticks: Sequence[str], yticks: Sequence[str],
             xlabel: str, ylabel: str, cbar_label: str, title: str, max_cols: int = 3) -> Path:
    """Diverging heat maps centred on 0 (blue < 0 < red), one per key, values printed in the cells."""
    rows, cols = _grid(len(panels), max_cols)
    # cells large enough for their printed values at CELL_FONT
    fig = new_figure(max(4.5, 0.6 * len(xticks) + 1.8) * cols, (0.55 * len(yticks) + 1.8) * rows + 0.5)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    lim = max(1e-9, max(float(np.nanmax(np.abs(m))) for m in panels.values()))
    norm = TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim)
    im = None
    for ax, (name, mat) in zip(axes, panels.items(), strict=False):
        im = ax.imshow(mat, cmap="RdBu_r", norm=norm, aspect="auto")
        ax.set_xticks(range(len(xticks)), xticks)
        ax.set_yticks(range(len(yticks)), yticks)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        for (i, j), v in np.ndenumerate(mat):
            text = f"{v:.0f}" if abs(v) >= 9.95 else f"{v:.1f}"
            ax.text(j, i, "0" if text in ("-0.0", "0.0") else text, ha="center", va="center", fontsize=CELL_FONT,
                    color="white" if abs(v) > 0.6 * lim else "black")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=list(axes[:len(panels)]), label=cbar_label, shrink=0.9)
    fig.suptitle(title)
    return save(fig, path)


@styled
def scatter_panels(panels: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path, *,
                   xlabel: str, ylabel: str, title: str, max_cols: int = 4, lim: tuple[float, float] = (0, 100),
                   point_label: str = "one test batch") -> Path:
    """Scatter per key with the y = x diagonal (points above it: y wins)."""
    rows, cols = _grid(len(panels), max_cols)
    fig = new_figure(3.0 * cols, 3.0 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, (x, y)) in zip(axes, panels.items(), strict=False):
        ax.plot(lim, lim, color="black", lw=0.8, ls="--", label="y = x")
        ax.scatter(x, y, s=9, alpha=0.6, color="#d62728", label=point_label)
        ax.set_xlim(*lim)
        ax.set_ylim(*lim)
        ax.set_aspect("equal")
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    legend_below(fig, axes[:1])
    fig.suptitle(title)
    return save(fig, path)


@styled
def image_grid(rows: Sequence[tuple[str, Sequence[np.ndarray]]], path: Path, *, col_labels: Sequence[str],
               title: str, diverging: Sequence[bool] | None = None, cbar_labels: Sequence[str] | None = None,
               cell: float = 1.05, share_scale: bool = False) -> Path:
    """Rows of small images (class means, templates, kernels). Diverging rows use a symmetric blue-white-red
    map around 0 (weights); the others grey scale (pixels). Each row gets its own colour bar, unless
    ``share_scale``: then all diverging rows use one range, so magnitudes compare across rows."""
    n_cols = max(len(imgs) for _, imgs in rows)
    shared_lim = max(float(np.abs(i).max()) for _, imgs in rows for i in imgs)
    fig = new_figure(cell * n_cols + 2.6, cell * len(rows) + 0.8)
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        div = bool(diverging[r]) if diverging else False
        lim = max(1e-12, shared_lim if share_scale else max(float(np.abs(i).max()) for i in imgs))
        kwargs = {"cmap": "RdBu_r", "vmin": -lim, "vmax": lim} if div else {
            "cmap": "gray", "vmin": min(float(i.min()) for i in imgs), "vmax": max(float(i.max()) for i in imgs)}
        im = None
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                im = ax.imshow(imgs[c], **kwargs)
            else:
                ax.set_visible(False)
            if r == 0 and c < len(col_labels):
                ax.set_title(col_labels[c], fontsize=CELL_FONT)
        axes[r, 0].set_ylabel(label, fontsize=CELL_FONT, rotation=0, ha="right", va="center")
        if im is not None:
            fig.colorbar(im, ax=list(axes[r, :]), shrink=0.8, pad=0.01,
                         label=(cbar_labels[r] if cbar_labels else ("weight" if div else "pixel")))
    fig.suptitle(title)
    return save(fig, path)
