"""Per-layer plot of the SVD-family diagnostics (:mod:`mergelab.analysis.svd_diagnostics`): PNG, 150 dpi."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mergelab.analysis.svd_diagnostics import LayerDiagnostics
from mergelab.report.plots import new_figure, save


def plot_layer_diagnostics(rows: Sequence[LayerDiagnostics], path: str | Path, *, merged_label: str = "merged",
                           title: str | None = None) -> Path:
    """Two panels over the weight matrices in state-dict order: relative singular task interference of the
    task vectors (bars), and SAR_avg against task arithmetic's sum and against the merge (lines)."""
    if not rows:
        raise ValueError("no layers to plot")
    x = list(range(len(rows)))
    fig = new_figure(max(6.0, 0.35 * len(rows) + 2), 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.bar(x, [r.relative_interference for r in rows], color="tab:red", label="task vectors θ_t − θ_0")
    top.set_ylabel("singular task interference\nSTI / Σσ (unitless)")
    top.legend(loc="upper right")
    bottom.plot(x, [r.alignment_task_arithmetic for r in rows], "o-", label="task arithmetic (Σ_t τ_t)")
    if any(r.alignment_merged is not None for r in rows):
        bottom.plot(x, [r.alignment_merged if r.alignment_merged is not None else float("nan") for r in rows],
                    "s-", label=merged_label)
    bottom.set_ylim(0, 1.05)
    bottom.set_ylabel("subspace alignment ratio\nSAR_avg (0–1)")
    bottom.set_xlabel("weight matrix (state-dict order)")
    bottom.set_xticks(x, [r.name[-28:] for r in rows], rotation=70, ha="right", fontsize=7)
    bottom.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    return save(fig, Path(path))
