"""Study 2 — sensitivity to weight magnitude (the paper's Fig. 4, Fig. 7b and Fig. 7c).

Every member's parameters are multiplied by c ∈ {1, 10, 20, …, 110} (``which="all"`` parameters or only
``"weights"`` — kernels with ≥ 2 dims; BatchNorm running statistics only with ``scale_bn_stats``), then the
uniform and greedy soups of the scaled models are compared with their logit and feature ensembles for each N.
Averaging never increases the max-entry or the variance of the weights (bounds checked on every soup);
large-magnitude weights of different models cancel in the average, while outputs are averaged intact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergelab.analysis.weight_stats import check_bounds, scale_state_dict
from mergelab.ensemble import ensemble_logits, feature_ensemble_logits, merged_head
from mergelab.report import FigureRef, Report, Section, Table, Verdict
from mergelab.report.plots import heatmaps, line_panels, scatter_panels
from mergelab.runtime import progress_over
from mergelab.soups import greedy_select, uniform_soup
from mergelab.studies.common import (
    StudyResult,
    ZooEval,
    explain,
    splits,
    study_runner,
    zoo_spec,
)
from mergelab.studies.verdict import Difference, check, claim_verdict, paired_difference
from mergelab.studies.weights_vs_features import zoo_label
from mergelab.zoo.models import ARCHS
from mergelab.zoo.primitives import accuracy_pct
from mergelab.zoo.train import train_zoos

METHODS = {"perf_ave": "Perf Ave", "uniform_soup": "Uniform soup", "greedy_soup": "Greedy soup",
           "logit_ensemble": "Logit ens.", "feature_ensemble": "Feature ens."}


@dataclass(frozen=True)
class Config:
    datasets: tuple[str, ...] = ("mnist5k",)
    archs: tuple[str, ...] = ("vgg6", "vgg6bn", "resnet8", "linear")
    init: str = "shared"
    cs: tuple[float, ...] = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110)
    ns: tuple[int, ...] = (2, 3, 5, 7, 10)
    which: str = "all"  # "all" float parameters, or "weights" (tensors with ≥ 2 dims)
    scale_bn_stats: bool = False  # also multiply BatchNorm running_mean / running_var by c
    batch_size: int = 100  # test batch size for the per-batch scatter (Fig. 4)
    scatter_n: int | None = None  # N for Fig. 4 and Fig. 7b (default: the largest N)
    # training recipe: the same defaults as the templates study (3 + 3 epochs, every training image, width
    # 16), so both share cached zoos; weights-vs-features moved to ZooRecipe's lighter recipe
    epochs: int = 3
    pretrain_epochs: int = 3
    n_train: int | None = None
    width: int = 16
    eval_mode: str = "eval"
    split_seed: int = 0
    seed: int = 0
    workers: int | None = None
    executor: str | None = None  # train the zoos as executor jobs: local, local:N, ray, ray:ADDRESS

    def __post_init__(self) -> None:  # bad settings fail in apply_options, before anything is written
        if self.which not in ("all", "weights"):
            raise ValueError(f"which must be 'all' or 'weights', got '{self.which}'")


QUICK = Config(archs=("vgg6bn", "linear"), cs=(1, 10, 50, 110), ns=(2, 3, 5), epochs=1, pretrain_epochs=2,
               n_train=1000)


@dataclass
class Result(StudyResult):
    rows: list[dict[str, Any]] = field(default_factory=list)
    bounds: list[dict[str, Any]] = field(default_factory=list)
    main_table: Table | None = None


def _scale(sd: dict[str, torch.Tensor], c: float, which: str, bn: bool) -> dict[str, torch.Tensor]:
    return scale_state_dict(sd, c, which=which, include_bn_stats=bn)  # type: ignore[arg-type]


def evaluate_scaled(ev: ZooEval, ns: Sequence[int], batch_size: int, scatter_n: int,
                    correct: dict[tuple[int, str], torch.Tensor] | None = None
                    ) -> tuple[list[dict[str, Any]], tuple[list[float], list[float]]]:
    """Rows (N, method, test_acc) for one scale, and per-test-batch (soup, ensemble) accuracies at ``scatter_n``;
    ``correct`` receives each test example's 0/1 score per (N, uniform_soup | logit_ensemble) for the verdicts."""
    n_all = len(ev.zoo)
    val_scores = [ev.member_acc(i, "val") for i in range(n_all)]
    test_scores = [ev.member_acc(i, "test") for i in range(n_all)]
    rows = []
    for n in ns:
        if n > n_all:
            continue
        idx = list(range(n))
        g = greedy_select(val_scores[:n], lambda s: ev.soup_acc(s, "val"))
        logits = ensemble_logits([ev.outputs(i, "test").logits for i in idx])
        head = merged_head([ev.members[i].head for i in idx])
        feats = feature_ensemble_logits([ev.outputs(i, "test").features for i in idx], head)
        for method, acc in [("perf_ave", float(np.mean(test_scores[:n]))),
                            ("uniform_soup", ev.soup_acc(idx, "test")),
                            ("greedy_soup", ev.soup_acc(g.selected, "test")),
                            ("logit_ensemble", accuracy_pct(logits, ev.test.y)),
                            ("feature_ensemble", accuracy_pct(feats, ev.test.y))]:
            rows.append({"N": n, "method": method, "test_acc": acc})
        if correct is not None:
            correct[(n, "uniform_soup")] = (ev.soup_outputs(idx, "test").logits.argmax(1) == ev.test.y).double()
            correct[(n, "logit_ensemble")] = (logits.argmax(1) == ev.test.y).double()
    idx = list(range(min(scatter_n, n_all)))
    soup_logits = ev.soup_outputs(idx, "test").logits
    ens_logits = ensemble_logits([ev.outputs(i, "test").logits for i in idx])
    y = ev.test.y
    per_soup, per_ens = [], []
    for s in range(0, len(y), batch_size):
        per_soup.append(accuracy_pct(soup_logits[s:s + batch_size], y[s:s + batch_size]))
        per_ens.append(accuracy_pct(ens_logits[s:s + batch_size], y[s:s + batch_size]))
    return rows, (per_soup, per_ens)


def _bounds(ev: ZooEval, ns: Sequence[int], which: str, bn: bool) -> list[dict[str, Any]]:
    out = []
    for n in ns:
        if n > len(ev.zoo):
            continue
        members = ev.state_dicts[:n]
        checks = check_bounds(members, uniform_soup(members), which=which, include_bn_stats=bn)  # type: ignore[arg-type]
        glob = checks[-1]
        per = checks[:-1]
        out.append({"N": n, "max_members": glob.max_members, "max_soup": glob.max_merged,
                    "var_members_max": glob.var_members_max, "var_soup": glob.var_merged,
                    "max_ratio": glob.max_merged / max(glob.max_members, 1e-30),
                    "var_ratio": glob.var_merged / max(glob.var_members_max, 1e-30),
                    "tensors": len(per), "max_bound_held": sum(c.max_bound_holds for c in per) + glob.max_bound_holds,
                    "var_bound_held": sum(c.var_bound_holds for c in per) + glob.var_bound_holds,
                    "checks": len(per) + 1})
    return out


def _verdicts(rows: Sequence[dict[str, Any]], bounds: Sequence[dict[str, Any]], cs: Sequence[float], n: int,
              correct: Mapping[tuple[str, str, float, int, str], torch.Tensor]) -> tuple[list[Verdict], dict[str, Any]]:
    """Claims as resolved comparisons (paired bootstrap over test examples); the averaging bounds as a check."""
    zoos = list(dict.fromkeys((r["dataset"], r["zoo"]) for r in rows))
    lo, hi = min(cs), max(cs)
    nonlin = [z for z in zoos if z[1] != "linear"]

    def diff(a: tuple[Any, ...], b: tuple[Any, ...]) -> Difference:
        return paired_difference(correct[a], correct[b], seed=int(a[3]))

    def drop(z: tuple[str, str], method: str) -> torch.Tensor:
        return correct[(*z, lo, n, method)] - correct[(*z, hi, n, method)]

    cells = sorted({(r["dataset"], r["zoo"], r["c"], r["N"]) for r in rows if r["zoo"] != "linear"})
    held_max = sum(b["max_bound_held"] for b in bounds)
    held_var = sum(b["var_bound_held"] for b in bounds)
    total = sum(b["checks"] for b in bounds)
    robust = [diff((*z, lo, n, "logit_ensemble"), (*z, hi, n, "logit_ensemble")) for z in zoos]
    out = [
        claim_verdict(f"Ensembles lose accuracy as the weights grow (c = {lo:g} → {hi:g})", robust, what="zoos",
                      paper="Fig. 4, 7b: logit ensembles degrade at large c while soups stay robust (issue 14 "
                            "re-examines this regime)"),
        claim_verdict(f"Soups are more robust to the weight scale than logit ensembles (c = {lo:g} → {hi:g}: the "
                      "ensemble's drop exceeds the soup's)",
                      [paired_difference(drop(z, "logit_ensemble"), drop(z, "uniform_soup"), seed=n) for z in nonlin],
                      what="non-linear zoos", paper="Fig. 4, 7b, Tab. 10: soups more robust than ensembles at large c"),
        claim_verdict("Logit ensemble > uniform soup across scales",
                      [diff((*c, "logit_ensemble"), (*c, "uniform_soup")) for c in cells],
                      what="(zoo, c, N) cells of non-linear zoos",
                      paper="Fig. 7c: the soup − ensemble gap changes sign near c ≈ 90 and peaks near c ≈ 100–110"),
        check("Averaging bounds: max-entry ≤ M and Var ≤ max σ² (a theorem)", min(held_max, held_var), total,
              f"max-entry bound {held_max}/{total}, variance bound {held_var}/{total}, every tensor and all weights "
              "together, every c and N"),
    ]
    summary = {v.claim: {"outcome": v.word, "detail": v.detail} for v in out}
    return out, summary


def main_table(rows: Sequence[dict[str, Any]], cs: Sequence[float], n: int) -> Table:
    """Accuracy vs c (columns) for each zoo × method at ``n`` models."""
    out = []
    for (ds, z) in dict.fromkeys((r["dataset"], r["zoo"]) for r in rows):
        for m, label in METHODS.items():
            row: dict[str, Any] = {"dataset": ds, "architecture": z, "method": label}
            for c in cs:
                v = [r["test_acc"] for r in rows if (r["dataset"], r["zoo"], r["c"], r["N"], r["method"])
                     == (ds, z, c, n, m)]
                row[f"c={c:g}"] = v[0] if v else None
            out.append(row)
    return Table(f"Test accuracy (%) after scaling every model's parameters by c, N = {n} models", out,
                 headers={"dataset": "Dataset", "architecture": "Architecture", "method": "Method"},
                 floatfmt="{:.1f}")


def _figures(rows: list[dict[str, Any]], scatter: dict[tuple[str, str], dict[float, tuple[list[float], list[float]]]],
             bounds: list[dict[str, Any]], cfg: Config, n: int, out: Path, verdicts: Sequence[Verdict]
             ) -> list[FigureRef]:
    zoos = list(dict.fromkeys((r["dataset"], r["zoo"]) for r in rows))
    acc = {(r["dataset"], r["zoo"], r["c"], r["N"], r["method"]): r["test_acc"] for r in rows}
    name = {z: f"{z[1]} / {z[0]}" for z in zoos}
    figs = []
    panels = {name[z]: (list(cfg.cs), {m: [acc[(*z, c, n, m)] for c in cfg.cs] for m in METHODS}) for z in zoos}
    figs.append(FigureRef(line_panels(panels, out / "fig7b_acc_vs_c.png", xlabel="scale factor c",
                                      ylabel="test accuracy (%)", labels=METHODS,
                                      title=f"Accuracy vs weight scale c (N = {n})"),
                          "Fig. 7b style: test accuracy of soups and ensembles as every member's parameters are "
                          f"multiplied by c. {verdicts[0].sentence()} {verdicts[1].sentence()}"))
    ns = [m for m in cfg.ns if any(r["N"] == m for r in rows)]
    mats = {name[z]: np.array([[acc[(*z, c, m, "uniform_soup")] - acc[(*z, c, m, "logit_ensemble")]
                                for c in cfg.cs] for m in ns]) for z in zoos}
    figs.append(FigureRef(heatmaps(mats, out / "fig7c_gap_heatmap.png", xticks=[f"{c:g}" for c in cfg.cs],
                                   yticks=[str(m) for m in ns], xlabel="scale factor c", ylabel="models N",
                                   cbar_label="uniform soup − logit ensemble (points)",
                                   title="Soup − ensemble gap over c × N (blue: the ensemble wins)"),
                          "Fig. 7c style: accuracy of the uniform soup minus the logit ensemble for every scale c "
                          f"and number of models N. {verdicts[2].sentence()}"))
    for z in zoos:
        per_c = scatter[z]
        sp = {f"c = {c:g}": (per_c[c][1], per_c[c][0]) for c in cfg.cs}
        fname = f"fig4_batches_{z[0]}_{z[1].replace(' ', '_').replace('(', '').replace(')', '').replace('.', '')}.png"
        figs.append(FigureRef(scatter_panels(sp, out / fname, xlabel="logit ensemble acc. (%)",
                                             ylabel="uniform soup acc. (%)",
                                             title=f"{name[z]}: per-batch accuracy, soup vs ensemble (N = {n})",
                                             point_label=f"one test batch of {cfg.batch_size}"),
                              f"Fig. 4 style for {name[z]}: each point is one test batch; below the diagonal "
                              f"the ensemble beats the soup on that batch. The ensemble is at least as accurate "
                              f"on {sum(e >= s for c in cfg.cs for s, e in zip(*per_c[c], strict=True))}/"
                              f"{sum(len(per_c[c][0]) for c in cfg.cs)} (c, batch) pairs."))
    bz = list(dict.fromkeys((b["dataset"], b["zoo"]) for b in bounds))
    c0 = min(cfg.cs)
    bp = {f"{z[1]} / {z[0]}": ([b["N"] for b in bounds if (b["dataset"], b["zoo"], b["c"]) == (*z, c0)],
                               {"max|soup| / M": [b["max_ratio"] for b in bounds
                                                  if (b["dataset"], b["zoo"], b["c"]) == (*z, c0)],
                                "Var(soup) / max σ²": [b["var_ratio"] for b in bounds
                                                       if (b["dataset"], b["zoo"], b["c"]) == (*z, c0)]})
          for z in bz}
    figs.append(FigureRef(line_panels(bp, out / "fig_bounds.png", xlabel="models averaged N",
                                      ylabel="soup / member bound (ratio)", hline=1.0,
                                      title="Averaging shrinks weights: ratios stay ≤ 1 (dashed line)"),
                          f"Max-entry and variance of the uniform soup relative to the paper's bounds (M and "
                          f"max σ² over members), all weights together at c = {c0:g} (ratios are scale-free: the "
                          f"same at every c). {verdicts[3].sentence()}"))
    return explain(figs, {
        "fig7b": "one panel per zoo; x = the factor c every member's parameters were multiplied by, y = test "
                 "accuracy (%), one line per method. A line that stays flat is robust to the weight scale; compare "
                 "the blue soup lines with the red/orange ensemble lines at large c.",
        "fig7c": "one heat map per zoo; columns = scale c, rows = models averaged N, each cell = soup minus "
                 "logit-ensemble accuracy in points (printed in the cell). Blue cells: the ensemble wins; red "
                 "cells: the soup wins; white: a tie.",
        "fig4_batches": "one panel per scale c; each point is one test batch, x = the logit ensemble's accuracy "
                        "on it, y = the uniform soup's. Points below the dashed diagonal are batches the ensemble "
                        "gets more right; points on it are ties.",
        "fig_bounds": "one panel per zoo; x = models averaged N, y = the soup's largest |weight| (or weight "
                      "variance) divided by the largest member value. The paper's bounds say both ratios stay at "
                      "or below the dashed line at 1; falling lines mean averaging shrinks the weights.",
    })


def build(out: Path, cfg: Config, *, show_progress: bool = True) -> Result:
    specs = [zoo_spec(cfg, a, d, cfg.init, max(cfg.ns)) for d in cfg.datasets for a in cfg.archs]
    zoos = train_zoos(specs, workers=cfg.workers, show_progress=show_progress, executor=cfg.executor)
    n = cfg.scatter_n or max(cfg.ns)
    rows: list[dict[str, Any]] = []
    bounds: list[dict[str, Any]] = []
    scatter: dict[tuple[str, str], dict[float, tuple[list[float], list[float]]]] = {}
    correct: dict[tuple[str, str, float, int, str], torch.Tensor] = {}
    for zoo, c in progress_over([(z, c) for z in zoos for c in cfg.cs], "scale, merge and ensemble",
                                show_progress=show_progress):
        val, test = splits(zoo.config.dataset, cfg.split_seed)
        key = (zoo.config.dataset, zoo_label(zoo.config.arch, zoo.config.init))
        ev = ZooEval(zoo, val, test, mode=cfg.eval_mode,  # type: ignore[arg-type]
                     transform=partial(_scale, c=c, which=cfg.which, bn=cfg.scale_bn_stats))
        per_cell: dict[tuple[int, str], torch.Tensor] = {}
        res, per_batch = evaluate_scaled(ev, cfg.ns, cfg.batch_size, n, per_cell)
        correct.update({(*key, c, m, meth): v for (m, meth), v in per_cell.items()})
        common = {"dataset": key[0], "zoo": key[1], "arch": zoo.config.arch, "c": c}
        rows += [{**common, **r, "which": cfg.which, "scale_bn_stats": cfg.scale_bn_stats,
                  "eval_mode": cfg.eval_mode, "seed": cfg.seed} for r in res]
        bounds += [{**common, **b} for b in _bounds(ev, cfg.ns, cfg.which, cfg.scale_bn_stats)]
        scatter.setdefault(key, {})[c] = per_batch
    batch_rows = [{"dataset": k[0], "zoo": k[1], "c": c, "batch": b, "soup_acc": s, "ensemble_acc": e}
                  for k, per_c in scatter.items() for c, (ss, es) in per_c.items()
                  for b, (s, e) in enumerate(zip(ss, es, strict=True))]
    table = main_table(rows, cfg.cs, n)
    verdicts, summary = _verdicts(rows, bounds, cfg.cs, n, correct)
    figs = _figures(rows, scatter, bounds, cfg, n, out, verdicts)
    bn_text = "and BatchNorm running statistics " if cfg.scale_bn_stats else ""
    bn_note = []
    if any(ARCHS[z.config.arch].batchnorm for z in zoos) and cfg.eval_mode == "eval":
        bn_note = ["BatchNorm models in eval mode normalise with stored running statistics; "
                   + ("those are scaled too (literally ×c, not ×c²), so " if cfg.scale_bn_stats else
                      "those are not scaled, so ")
                   + "any c ≠ 1 mis-normalises the scaled activations of every member — soups and ensembles "
                     "break alike. Run with eval_mode='train' (batch statistics, as the original code) to see "
                     "BatchNorm's scale invariance instead."]
    section = Section(
        "Weight magnitude: soups vs ensembles under scaling (Fig. 4, Fig. 7b, Fig. 7c)",
        text=[f"Each member's {'parameters' if cfg.which == 'all' else 'weight kernels (≥ 2-D)'} {bn_text}"
              f"are multiplied by c ∈ {{{', '.join(f'{c:g}' for c in cfg.cs)}}} before merging or ensembling "
              f"({cfg.init} init; N ∈ {{{', '.join(map(str, cfg.ns))}}}; {cfg.eval_mode} mode). A linear model "
              "is the control: its soup equals its logit ensemble at every c.",
              "Fig. 7b shows accuracy against c; Fig. 7c the soup − ensemble gap for every (c, N); Fig. 4 the "
              "per-batch accuracies (points below the diagonal: the ensemble wins that batch). The bound figure "
              "checks that averaging never raises the largest weight or the weight variance.", *bn_note,
              "These nets are 6 layers deep; the paper's VGG-19 depth, non-finite logits per method, the same grid "
              "in float64 (is the robustness gap a float32 overflow?) and both BatchNorm protocols are in "
              "`mergelab study magnitude-deep`."],
        verdicts=verdicts, tables=[table], figures=figs)
    report = Report("Weight magnitude", meta={"seed": cfg.seed, "which": cfg.which,
                                              "scale_bn_stats": cfg.scale_bn_stats}).add(section)
    tables = {"magnitude.csv": rows, "magnitude.md": table, "weight_bounds.csv": bounds,
              "magnitude_batches.csv": batch_rows}
    return Result(report, tables, zoos, {"verdicts": summary}, rows=rows, bounds=bounds, main_table=table)


run = study_runner("magnitude", build, Config(), QUICK)
