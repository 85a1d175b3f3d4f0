"""Figures of the task-vector study (matplotlib Agg, 150 dpi, labelled axes with units, legends)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np

from mergelab.report.plots import CELL_FONT, legend_below, new_figure, save, styled

#: fixed colours so every figure uses the same legend for a method
COLORS = {
    "pretrained": "#9e9e9e", "weight_averaging": "#1f77b4", "task_arithmetic": "#ff7f0e", "ties": "#2ca02c",
    "dare_ties": "#98df8a", "model_stock": "#8c564b", "fisher": "#e377c2", "regmean": "#7f7f7f",
    "cart": "#d62728", "cart_qkv": "#ff9896", "tsv": "#17becf", "iso_c": "#bcbd22", "iso_cts": "#393b79",
    "wudi": "#637939", "wudi_exact": "#b5cf6b",
    "logit_ensemble": "#9467bd", "individual": "#000000",
}


@styled
def method_bars(values: Mapping[str, float], labels: Mapping[str, str], path: Path, *, title: str) -> Path:
    """Horizontal bars of mean normalised test accuracy per method, with the 100 % line (fine-tuned)."""
    names = list(values)
    fig = new_figure(7.0, 0.38 * len(names) + 1.8)
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y, [values[n] for n in names], color=[COLORS.get(n, "#444444") for n in names],
            label="mean over tasks (test)")
    for yi, n in zip(y, names):
        ax.text(values[n] + 0.5, yi, f"{values[n]:.1f}", va="center", fontsize=CELL_FONT)
    ax.axvline(100.0, color="black", lw=0.8, ls="--", label="individual fine-tuned = 100 %")
    ax.set_yticks(y, [labels.get(n, n) for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("normalised accuracy (% of each task's fine-tuned accuracy)")
    ax.set_xlim(0, max(110.0, max(values.values()) + 8))
    legend_below(fig, [ax], ncols=2)
    ax.set_title(title)
    return save(fig, path)


@styled
def rank_sweep(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], baselines: Mapping[str, float],
               path: Path, *, title: str, ylabel: str) -> Path:
    """CART accuracy vs rank ratio, one line per λ (and split), baselines as horizontal lines."""
    fig = new_figure(7.2, 4.4)
    ax = fig.subplots()
    palette = matplotlib.colormaps["viridis"]
    lams = sorted({label.split(" ")[0] for label in curves if label.startswith("λ=")})
    for label, (x, y) in curves.items():
        head = label.split(" ")[0]
        if head in lams:  # one colour per λ: dashed = validation, solid = test
            color = palette(lams.index(head) / max(1, len(lams) - 1) * 0.9)
            ax.plot([100 * v for v in x], y, marker="o", ms=3, lw=1.2, color=color, label=label,
                    ls="--" if "(val)" in label else "-")
        else:
            ax.plot([100 * v for v in x], y, marker="s", ms=4, lw=2.2, color="#d62728", label=label)
    styles = iter(["-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1))])
    for name, v in baselines.items():
        ax.axhline(v, color=COLORS.get(name.split(" ")[0], "black"), lw=1.0, ls=next(styles, "--"), label=name)
    ax.set_xscale("symlog", linthresh=2.0)
    ax.set_xlim(0, 105)
    ax.set_xlabel("rank k of each low-rank centred task matrix (% of full rank, symlog scale)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    legend_below(fig, [ax], ncols=3)
    ax.set_title(title)
    return save(fig, path)


@styled
def interference_panels(ratios: Sequence[float], series: Mapping[str, Mapping[str, Sequence[float]]],
                        path: Path, *, title: str) -> Path:
    """One panel per measure (I(k)/(T(T−1)) with top-k and whole-spectrum normalisation, R(k)/R(0)) vs rank
    ratio, centred vs uncentred task matrices."""
    fig = new_figure(4.6 * len(series), 4.0)
    axes = fig.subplots(1, len(series))
    xs = [100 * r for r in ratios]
    ylabels = {"interference": "I(k) / (T(T−1)), top-k normalised σ̃ (mean over matrices)",
               "interference_full": "I(k) / (T(T−1)), whole-spectrum normalised σ̃ (mean over matrices)",
               "reconstruction": "relative reconstruction error R(k) / R(0) (mean over matrices)"}
    for ax, (panel, lines) in zip(axes, series.items()):
        for label, ys in lines.items():
            ax.plot(xs, ys, marker="o", ms=3.5, label=label, color="#d62728" if "centred" in label and
                    "un" not in label else "#ff7f0e")
        ax.set_xscale("symlog", linthresh=2.0)
        ax.set_xlim(0, 105)
        ax.set_xlabel("rank k (% of full rank, symlog scale)")
        ax.set_ylabel(ylabels[panel], fontsize=CELL_FONT)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    legend_below(fig, list(axes))
    fig.suptitle(title)
    return save(fig, path)


@styled
def scaling(ts: Sequence[int], series: Mapping[str, Sequence[float]], labels: Mapping[str, str], path: Path, *,
            title: str) -> Path:
    """Mean normalised test accuracy vs number of merged tasks T, one line per method."""
    fig = new_figure(7.0, 4.4)
    ax = fig.subplots()
    for name, ys in series.items():
        ax.plot(ts, ys, marker="o", ms=4, label=labels.get(name, name), color=COLORS.get(name))
    ax.set_xticks(list(ts))
    ax.set_xlabel("number of merged tasks T (count)")
    ax.set_ylabel("normalised accuracy (% of fine-tuned, test)")
    ax.grid(alpha=0.3)
    legend_below(fig, [ax], ncols=3)
    ax.set_title(title)
    return save(fig, path)
