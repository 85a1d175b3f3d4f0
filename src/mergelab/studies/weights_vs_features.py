"""Study 1 — averaging weights vs averaging features (the paper's Table 1, Fig. 3 and Fig. 7a).

For each dataset × architecture zoo and each ensemble size N, compares the mean of the individuals
(Perf Ave), the best single model, the uniform and greedy soups, the logit ensemble, the feature ensemble
(features averaged; heads merged by weight averaging, or the first model's head) and the greedy logit and
feature ensembles, with their cost (parameters and FLOPs per prediction). Greedy selection uses the val
split; every accuracy reported is on the test split. Members 0..N−1 of one zoo are used for size N.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergelab.ensemble import ensemble_logits, feature_ensemble_logits, merged_head
from mergelab.report import FigureRef, Report, Section, Table, Verdict
from mergelab.report.plots import grouped_bars, line_panels
from mergelab.report.tables import best_in_row
from mergelab.runtime import make_progress, torch_threads
from mergelab.soups import greedy_ensemble, greedy_select
from mergelab.studies.common import (
    StudyResult,
    ZooEval,
    explain,
    run_config,
    splits,
    zoo_spec,
)
from mergelab.studies.verdict import Difference, check, claim_verdict, paired_difference
from mergelab.zoo.data import load_dataset
from mergelab.zoo.models import ARCHS, count_parameters, flops_per_example
from mergelab.zoo.primitives import accuracy_pct
from mergelab.zoo.train import Zoo, ZooSpec, train_zoos

METHODS: dict[str, str] = {
    "perf_ave": "Perf Ave",
    "best_single": "Best single",
    "uniform_soup": "Uniform soup",
    "greedy_soup": "Greedy soup",
    "logit_ensemble": "Logit ens.",
    "feature_ensemble": "Feature ens.",
    "feature_ensemble_first_head": "Feature ens. (1st head)",
    "greedy_logit_ensemble": "Greedy logit ens.",
    "greedy_feature_ensemble": "Greedy feature ens.",
}


@dataclass(frozen=True)
class Config:
    datasets: tuple[str, ...] = ("mnist5k", "animal-mnist")
    archs: tuple[str, ...] = ("resnet8", "vgg6", "vgg6bn", "densenet8", "vit2", "linear")
    #: architectures also trained from independent random inits (the case where soups should fail)
    independent_archs: tuple[str, ...] = ("vgg6",)
    ns: tuple[int, ...] = (2, 3, 5, 7, 10)
    epochs: int = 3
    pretrain_epochs: int = 3
    n_train: int | None = None
    width: int = 16
    eval_mode: str = "eval"  # "train": BatchNorm with batch statistics at test time, as the original code
    greedy_strict: bool = True
    split_seed: int = 0
    seed: int = 0
    workers: int | None = None
    executor: str | None = None  # train the zoos as executor jobs: local, local:N, ray, ray:ADDRESS


QUICK = Config(datasets=("mnist5k",), archs=("vgg6bn", "linear"), independent_archs=("vgg6bn",), ns=(2, 3, 5),
               epochs=1, pretrain_epochs=2, n_train=1000)


@dataclass
class Result(StudyResult):
    rows: list[dict[str, Any]] = field(default_factory=list)
    main_table: Table | None = None


def zoo_label(arch: str, init: str) -> str:
    return arch if init == "shared" else f"{arch} (indep.)"


def zoo_specs(cfg: Config) -> list[ZooSpec]:
    specs = []
    for ds in cfg.datasets:
        kind_tabular = load_dataset(ds, "val", cfg.split_seed).kind == "tabular"
        for arch in cfg.archs:
            if kind_tabular and ARCHS[arch].conv:
                continue  # convolutions need images or signals; tabular sets take linear/MLP only
            inits = ["shared"] + (["independent"] if arch in cfg.independent_archs else [])
            specs.extend(zoo_spec(cfg, arch, ds, init, max(cfg.ns)) for init in inits)
    return specs


def _costs(zoo: Zoo) -> tuple[int, int, int, int]:
    """(params, FLOPs, head params, head FLOPs) of one member."""
    model = zoo.models[0]
    shape = load_dataset(zoo.config.dataset, "val", zoo.config.split_seed).input_shape
    head = model.head
    return (count_parameters(model), flops_per_example(model, shape), count_parameters(head),
            2 * head.in_features * head.out_features)


#: methods whose per-example test correctness is kept for the verdicts' bootstrap
COMPARED = ("perf_ave", "uniform_soup", "greedy_soup", "logit_ensemble", "feature_ensemble")


def evaluate_zoo(ev: ZooEval, ns: Sequence[int], *, strict: bool = True,
                 correct: dict[tuple[int, str], torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """All methods for every N in ``ns`` (members 0..N−1) on one zoo; one row per (N, method).

    ``correct`` (when given) receives, per (N, method) of :data:`COMPARED`, each test example's score
    (1 right, 0 wrong; Perf Ave: the share of members right) for the verdicts' paired bootstrap."""
    zoo = ev.zoo
    p, f, ph, fh = _costs(zoo)
    val_y, test_y = ev.val.y, ev.test.y
    val_scores = [ev.member_acc(i, "val") for i in range(len(zoo))]
    test_scores = [ev.member_acc(i, "test") for i in range(len(zoo))]

    def logit_acc(idx: Sequence[int], split: str) -> float:
        y = val_y if split == "val" else test_y
        return accuracy_pct(ensemble_logits([ev.outputs(i, split).logits for i in idx]), y)

    def feature_acc(idx: Sequence[int], split: str, head: str = "merged") -> float:
        y = val_y if split == "val" else test_y
        h = merged_head([ev.members[i].head for i in idx]) if head == "merged" else ev.members[idx[0]].head
        return accuracy_pct(feature_ensemble_logits([ev.outputs(i, split).features for i in idx], h), y)

    rows: list[dict[str, Any]] = []
    for n in ns:
        if n > len(zoo):
            continue
        idx = list(range(n))

        def add(method: str, test: float, val: float, used: int, params: int, flops: int,
                selected: Sequence[int] | None = None, n: int = n) -> None:
            rows.append({"N": n, "method": method, "test_acc": test, "val_acc": val, "models_used": used,
                         "params": params, "flops": flops,
                         "selected": " ".join(map(str, selected)) if selected is not None else ""})

        add("perf_ave", float(np.mean(test_scores[:n])), float(np.mean(val_scores[:n])), 1, p, f)
        best = max(idx, key=lambda i: (val_scores[i], -i))
        add("best_single", test_scores[best], val_scores[best], 1, p, f, [best])
        add("uniform_soup", ev.soup_acc(idx, "test"), ev.soup_acc(idx, "val"), n, p, f, idx)
        g = greedy_select(val_scores[:n], lambda s: ev.soup_acc(s, "val"), strict=strict)
        add("greedy_soup", ev.soup_acc(g.selected, "test"), g.score, len(g.selected), p, f, g.selected)
        add("logit_ensemble", logit_acc(idx, "test"), logit_acc(idx, "val"), n, n * p, n * f, idx)
        add("feature_ensemble", feature_acc(idx, "test"), feature_acc(idx, "val"), n,
            n * (p - ph) + ph, n * (f - fh) + fh, idx)
        add("feature_ensemble_first_head", feature_acc(idx, "test", "first"), feature_acc(idx, "val", "first"),
            n, n * (p - ph) + ph, n * (f - fh) + fh, idx)
        gl = greedy_ensemble(val_scores[:n], lambda s: logit_acc(s, "val"), strict=strict)
        k = len(gl.selected)
        add("greedy_logit_ensemble", logit_acc(gl.selected, "test"), gl.score, k, k * p, k * f, gl.selected)
        gf = greedy_ensemble(val_scores[:n], lambda s: feature_acc(s, "val"), strict=strict)
        k = len(gf.selected)
        add("greedy_feature_ensemble", feature_acc(gf.selected, "test"), gf.score, k,
            k * (p - ph) + ph, k * (f - fh) + fh, gf.selected)
        if correct is not None:
            def hits(logits: torch.Tensor) -> torch.Tensor:
                return (logits.argmax(1) == test_y).double()

            correct[(n, "perf_ave")] = torch.stack([hits(ev.outputs(i, "test").logits) for i in idx]).mean(0)
            correct[(n, "uniform_soup")] = hits(ev.soup_outputs(idx, "test").logits)
            correct[(n, "greedy_soup")] = hits(ev.soup_outputs(g.selected, "test").logits)
            correct[(n, "logit_ensemble")] = hits(ensemble_logits([ev.outputs(i, "test").logits for i in idx]))
            head = merged_head([ev.members[i].head for i in idx])
            correct[(n, "feature_ensemble")] = hits(
                feature_ensemble_logits([ev.outputs(i, "test").features for i in idx], head))
    return rows


def _lookup(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, int, str], float]:
    return {(r["dataset"], r["zoo"], r["N"], r["method"]): r["test_acc"] for r in rows}


def main_table(rows: Sequence[dict[str, Any]], n: int) -> Table:
    """Table 1 layout: one row per dataset × architecture, one column per method (test accuracy, %)."""
    out = []
    for (ds, z) in dict.fromkeys((r["dataset"], r["zoo"]) for r in rows):
        sub = {r["method"]: r for r in rows if r["dataset"] == ds and r["zoo"] == z and r["N"] == n}
        if not sub:
            continue
        row: dict[str, Any] = {"dataset": ds, "architecture": z}
        row.update({m: sub[m]["test_acc"] for m in METHODS if m in sub})
        row["params (soup / ens.)"] = f"{sub['uniform_soup']['params'] / 1e3:.1f}k / " \
                                      f"{sub['logit_ensemble']['params'] / 1e3:.1f}k"
        row["MFLOPs (soup / ens.)"] = f"{sub['uniform_soup']['flops'] / 1e6:.2f} / " \
                                      f"{sub['logit_ensemble']['flops'] / 1e6:.2f}"
        out.append(row)
    return Table(f"Test accuracy (%) with N = {n} models; bold = best method in the row", out,
                 headers={"dataset": "Dataset", "architecture": "Architecture", **METHODS},
                 bold=best_in_row(list(METHODS)),
                 note="Perf Ave = mean accuracy of the N individual models; greedy methods select on the val "
                      "split. Costs are per prediction: a soup costs one model, an ensemble N.")


Key = tuple[str, str, int]  # (dataset, zoo label, N)


def _verdicts(rows: Sequence[dict[str, Any]], ns: Sequence[int],
              correct: Mapping[tuple[str, str, int, str], torch.Tensor]) -> tuple[list[Verdict], dict[str, Any]]:
    """The paper's claims as resolved comparisons (paired bootstrap over test examples), the identity as a check."""
    configs: list[Key] = sorted({(r["dataset"], r["zoo"], r["N"]) for r in rows})
    shared = [c for c in configs if not c[1].endswith("(indep.)") and c[1] != "linear"]
    indep = [c for c in configs if c[1].endswith("(indep.)")]
    nonlinear = [c for c in configs if c[1] != "linear"]

    def diff(c: Key, a: str, b: str) -> Difference:
        return paired_difference(correct[(*c, a)], correct[(*c, b)], seed=c[2])

    out = [
        claim_verdict("Averaging outputs beats averaging weights: logit ensemble > uniform soup",
                      [diff(c, "logit_ensemble", "uniform_soup") for c in nonlinear], what="zoo × N configurations",
                      paper="Tab. 1, Fig. 3: ensembles above the uniform soup (the linear model, where they are "
                            "the same function, is a check below, not evidence)"),
        claim_verdict("Averaging features beats averaging weights: feature ensemble > uniform soup",
                      [diff(c, "feature_ensemble", "uniform_soup") for c in nonlinear], what="zoo × N configurations",
                      paper="Tab. 1, Fig. 3: feature ensembles above the uniform soup"),
        claim_verdict("Uniform soup of shared-start fine-tunes > the mean of its members (Perf Ave)",
                      [diff(c, "uniform_soup", "perf_ave") for c in shared], what="shared-start configurations",
                      paper="Tab. 1: the soup is below Perf Ave on 5 of 7 datasets (the model-soups claim; the "
                            "Rethinking paper's own table mostly does not show it)"),
        claim_verdict("Greedy soup > Perf Ave (greedy selection on val, scored on test)",
                      [diff(c, "greedy_soup", "perf_ave") for c in shared], what="shared-start configurations",
                      paper="model soups (Wortsman et al. 2022): the greedy soup is never worse than the best "
                            "single model on held-out data"),
    ]
    if indep:
        out.append(claim_verdict("Soups of independently trained models fall below their members: Perf Ave > "
                                 "uniform soup", [diff(c, "perf_ave", "uniform_soup") for c in indep],
                                 what="independent-init configurations",
                                 paper="no shared basin, so weight averaging fails (the paper's motivation)"))
    lo, hi = min(ns), max(ns)
    grow = []
    for d, z in sorted({(c[0], c[1]) for c in nonlinear}):
        if (d, z, lo, "uniform_soup") in correct and (d, z, hi, "uniform_soup") in correct and lo != hi:
            gap_hi = correct[(d, z, hi, "logit_ensemble")] - correct[(d, z, hi, "uniform_soup")]
            gap_lo = correct[(d, z, lo, "logit_ensemble")] - correct[(d, z, lo, "uniform_soup")]
            grow.append(paired_difference(gap_hi, gap_lo, seed=hi))
    out.append(claim_verdict(f"The ensemble − soup gap grows with N (N = {lo} → {hi})", grow, what="zoos",
                             paper="Fig. 7a: the gap widens as more models are combined"))
    lin = [c for c in configs if c[1] == "linear"]
    if lin:
        same = sum(1 for c in lin if torch.equal(correct[(*c, "logit_ensemble")], correct[(*c, "uniform_soup")]))
        out.append(check("For a linear model the uniform soup is the logit ensemble (the same function)", same,
                         len(lin), "identical predictions on every test example"))
    summary = {v.claim: {"outcome": v.word, "detail": v.detail} for v in out}
    return out, summary


def _figures(rows: Sequence[dict[str, Any]], cfg: Config, out: Path, verdicts: Sequence[Verdict]
             ) -> list[FigureRef]:
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    acc = _lookup(rows)
    figs = []
    for n in cfg.ns:
        panels = {}
        for ds in datasets:
            zoos = list(dict.fromkeys(r["zoo"] for r in rows if r["dataset"] == ds and r["N"] == n))
            if zoos:
                panels[ds] = (zoos, {m: [acc[(ds, z, n, m)] for z in zoos] for m in METHODS})
        if not panels:
            continue
        path = grouped_bars(panels, out / f"fig3_bars_N{n}.png", ylabel="test accuracy (%)",
                            title=f"Soups vs ensembles, N = {n} models per method", labels=METHODS,
                            ylim=(0, 100))
        pairs = [(r["dataset"], r["zoo"]) for r in rows if r["N"] == n and r["method"] == "uniform_soup"]
        wins = sum(acc[(d, z, n, "logit_ensemble")] >= acc[(d, z, n, "uniform_soup")] for d, z in pairs)
        figs.append(FigureRef(path, f"Fig. 3 style: test accuracy of every method for N = {n}, per "
                                    "architecture (x axis) and dataset (panel). At this N the logit ensemble "
                                    f"scores at least the uniform soup's accuracy for {wins}/{len(pairs)} "
                                    "architectures (before any uncertainty). " + verdicts[0].sentence()))
    panels2 = {}
    for ds in datasets:
        zoos = list(dict.fromkeys(r["zoo"] for r in rows if r["dataset"] == ds))
        ns = [n for n in cfg.ns if any((ds, z, n, "uniform_soup") in acc for z in zoos)]
        panels2[ds] = (ns, {z: [acc[(ds, z, n, "logit_ensemble")] - acc[(ds, z, n, "uniform_soup")] for n in ns]
                            for z in zoos})
    path = line_panels(panels2, out / "fig7a_gap_vs_n.png", xlabel="number of models N",
                       ylabel="logit ensemble − uniform soup (points)", hline=0.0,
                       title="Ensemble − soup gap vs N (> 0: the ensemble wins)")
    grow = next(v for v in verdicts if v.claim.startswith("The ensemble − soup gap grows"))
    figs.append(FigureRef(path, "Fig. 7a style: test-accuracy gap between the logit ensemble and the uniform "
                                "soup as N grows, one line per architecture. " + grow.sentence()))
    return explain(figs, {
        "fig3_bars": "one group of bars per architecture, one bar per method (colours in the legend below the "
                     "plot), height = test accuracy from 0 to 100 %. Blue bars are soups (one model's cost), red and "
                     "orange bars ensembles (N models' cost); a soup bar as tall as the ensemble bars means averaging "
                     "weights loses nothing.",
        "fig7a_gap": "one line per architecture; y = logit-ensemble accuracy minus uniform-soup accuracy in points, "
                     "x = number of models averaged. Above the dashed zero line the ensemble wins; a line that rises "
                     "with N means the soup falls further behind as more models are averaged.",
    })


def build(out: Path, cfg: Config, *, show_progress: bool = True) -> Result:
    if cfg.eval_mode not in ("eval", "train"):
        raise ValueError(f"eval_mode must be 'eval' or 'train', got '{cfg.eval_mode}'")
    specs = zoo_specs(cfg)
    zoos = train_zoos(specs, workers=cfg.workers, show_progress=show_progress, executor=cfg.executor)
    rows: list[dict[str, Any]] = []
    correct: dict[tuple[str, str, int, str], torch.Tensor] = {}
    with make_progress(disable=not show_progress) as bar, torch_threads():
        task = bar.add_task("evaluate soups and ensembles", total=len(zoos))
        for zoo in zoos:
            val, test = splits(zoo.config.dataset, cfg.split_seed)
            ev = ZooEval(zoo, val, test, mode=cfg.eval_mode)  # type: ignore[arg-type]
            per_zoo: dict[tuple[int, str], torch.Tensor] = {}
            label = zoo_label(zoo.config.arch, zoo.config.init)
            zoo_rows = evaluate_zoo(ev, cfg.ns, strict=cfg.greedy_strict, correct=per_zoo)
            correct.update({(zoo.config.dataset, label, n, m): v for (n, m), v in per_zoo.items()})
            for r in zoo_rows:
                rows.append({"dataset": zoo.config.dataset, "zoo": zoo_label(zoo.config.arch, zoo.config.init),
                             "arch": zoo.config.arch, "init": zoo.config.init, **r, "eval_mode": cfg.eval_mode,
                             "seed": cfg.seed, "member_seeds": " ".join(map(str, zoo.member_seeds[:r["N"]]))})
            bar.advance(task)
    n_main = max(n for n in cfg.ns if any(r["N"] == n for r in rows))
    table = main_table(rows, n_main)
    per_n = [main_table(rows, n) for n in cfg.ns if n != n_main and any(r["N"] == n for r in rows)]
    verdicts, summary = _verdicts(rows, cfg.ns, correct)
    figs = _figures(rows, cfg, out, verdicts)
    section = Section(
        "Weights vs features: soups and ensembles (Table 1, Fig. 3, Fig. 7a)",
        text=[
            f"Zoos of {max(cfg.ns)} models per architecture and dataset; "
            + ("shared init: one pre-trained start, then members fine-tuned with their own seeds for the "
               "head, data order and augmentation" + (f"; {', '.join(cfg.independent_archs)} also from "
                                                      "independent random inits" if cfg.independent_archs
                                                      else ""))
            + f". Evaluation in {cfg.eval_mode} mode; greedy selection on the val split "
              f"({'strict' if cfg.greedy_strict else 'non-strict'} improvement); accuracies on the test split.",
            "The uniform soup averages the weights of members 0..N−1 (mergelab.merge_state_dicts, 'linear'); "
            "the logit ensemble averages their logits; the feature ensemble averages their penultimate "
            "features and applies the weight-averaged heads (or the first model's head).",
            "Fig. 3 (bars): if averaging weights were as good as averaging outputs, the blue soup bars would "
            "match the red/orange ensemble bars. Fig. 7a (gap vs N): points above 0 mean the ensemble beats "
            "the soup at that N.",
        ],
        verdicts=verdicts, tables=[table], figures=figs)
    report = Report("Weights vs features", meta={"seed": cfg.seed, "eval_mode": cfg.eval_mode,
                                                 "datasets": ", ".join(cfg.datasets)}).add(section)
    return Result(report, {"weights_vs_features.csv": rows, "table1.md": [table, *per_n]}, zoos, {"verdicts": summary},
                  rows=rows, main_table=table)


def run(out: Path, *, quick: bool = False, seed: int = 0, overwrite: bool = False, show_progress: bool = True,
        **options: Any) -> Path:
    """Run the study into ``out``; returns ``out/report.html``. ``options`` are :class:`Config` fields."""
    return run_config("weights-vs-features", out, build, QUICK if quick else Config(), quick=quick, seed=seed,
                      overwrite=overwrite, show_progress=show_progress, options=options)


__all__ = ["METHODS", "QUICK", "Config", "Result", "build", "evaluate_zoo", "run"]
