"""Per-layer plot of the SVD-family diagnostics (:mod:`mergelab.analysis.svd_diagnostics`): PNG, 150 dpi."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mergelab.analysis.svd_diagnostics import LayerDiagnostics, matrix_diagnostics
from mergelab.report.plots import new_figure, save
from mergelab.report.tables import write_csv

#: matrices above this many entries are skipped by default: a matrix costs T + 2 float64 SVDs (one per task, the
#: sum, the merge); one SVD of 2048 × 2048 took 2.35 s on 2 cores here (1024²: 0.33 s), so about 20 s at
#: 4096 × 4096 and minutes for a 32000 × 4096 embedding, where the merge itself takes well under a second
MAX_ENTRIES = 4096 * 4096


def _short(name: str) -> str:
    """A tick label: the last three dotted parts without ``.weight`` (``model.layers.0.mlp.up_proj.weight`` →
    ``0.mlp.up_proj``), so that labels cut at whole words and the layer index survives."""
    parts = name.removesuffix(".weight").split(".")
    return ".".join(parts[-3:])


def plot_layer_diagnostics(rows: Sequence[LayerDiagnostics], path: str | Path, *, merged_label: str = "merged",
                           title: str | None = None) -> Path:
    """Two panels over the weight matrices in state-dict order: relative singular task interference of the
    task vectors (bars), and SAR_avg against task arithmetic's sum and against the merge (lines)."""
    if not rows:
        raise ValueError("no layers to plot")
    x = list(range(len(rows)))
    fig = new_figure(max(6.0, 0.35 * len(rows) + 2), 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.bar(x, [r.relative_interference for r in rows], color="tab:red")
    top.set_title("task vectors θ_t − θ_0", fontsize="medium")  # one series: a title, not a legend over the bars
    top.set_ylabel("singular task interference\nSTI / Σσ (unitless)")
    bottom.plot(x, [r.alignment_task_arithmetic for r in rows], "o-", label="task arithmetic (Σ_t τ_t)")
    if any(r.alignment_merged is not None for r in rows):
        bottom.plot(x, [r.alignment_merged if r.alignment_merged is not None else float("nan") for r in rows],
                    "s-", label=merged_label)
    bottom.set_ylim(0, 1.05)
    bottom.set_ylabel("subspace alignment ratio\nSAR_avg (0–1)")
    bottom.set_xlabel("weight matrix (layer index . module; in the order given)")
    bottom.set_xticks(x, [_short(r.name) for r in rows], rotation=70, ha="right", fontsize=7)
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: never over a point
    if title:
        fig.suptitle(title)
    return save(fig, Path(path))


class LayerDiagnosticsWriter:
    """The engine's :class:`~mergelab.merge.engine.TensorObserver` for ``mergelab merge --diagnostics``: the
    SVD-family diagnostics of every changed 2-D weight, computed from the tensors the engine already holds, then
    ``diagnostics/layers.csv`` and ``diagnostics/layers.png`` written beside the merged weights.

    Matrices are skipped, and the reason recorded, when there is no base (no task vectors), the models leave the
    matrix unchanged, a value is not finite, it has more than ``max_entries`` entries, or its SVD does not converge."""

    def __init__(self, *, captured: float = 0.95, max_entries: int = MAX_ENTRIES) -> None:
        self.captured, self.max_entries = captured, max_entries
        self.rows: list[LayerDiagnostics] = []
        self.skipped: dict[str, list[str]] = {}

    def _skip(self, why: str, name: str) -> None:
        self.skipped.setdefault(why, []).append(name)

    def observe(self, name: str, base: torch.Tensor | None, tensors: list[torch.Tensor],
                merged: torch.Tensor) -> None:
        if merged.dim() != 2 or not merged.is_floating_point() or not tensors:
            return  # biases, norms, buffers: no singular vectors to speak of
        if base is None:
            self._skip("no base model", name)
        elif merged.numel() > self.max_entries:
            self._skip(f"more than {self.max_entries} entries", name)
        elif not all(bool(torch.isfinite(t).all()) for t in (base, *tensors, merged)):
            self._skip("non-finite values", name)
        elif all(torch.equal(t, base) for t in tensors):
            self._skip("unchanged by every model", name)
        else:
            try:
                self.rows.append(matrix_diagnostics(name, base, tensors, merged, captured=self.captured))
            except RuntimeError:  # LAPACK's SVD can fail to converge on ill-conditioned input: a skip, not a crash
                self._skip("SVD did not converge", name)

    def finish(self, folder: Path, method: str) -> dict[str, Any]:
        record: dict[str, Any] = {"measures": "singular task interference (TSV) and subspace alignment ratio (Iso)",
                                  "captured": self.captured, "matrices": len(self.rows),
                                  "skipped": {why: len(names) for why, names in self.skipped.items()}}
        if not self.rows:
            return record
        out = folder / "diagnostics"
        write_csv([dataclasses.asdict(r) for r in self.rows], out / "layers.csv")
        plot_layer_diagnostics(self.rows, out / "layers.png", merged_label=method,
                               title=f"{method}: per-layer diagnostics of {len(self.rows)} weight matrices")
        merged = [r.alignment_merged for r in self.rows if r.alignment_merged is not None]
        record.update({
            "csv": "diagnostics/layers.csv", "plot": "diagnostics/layers.png",
            "mean_relative_interference": statistics.fmean(r.relative_interference for r in self.rows),
            "mean_alignment_task_arithmetic": statistics.fmean(r.alignment_task_arithmetic for r in self.rows),
            "mean_alignment_merged": statistics.fmean(merged) if merged else None})
        return record
