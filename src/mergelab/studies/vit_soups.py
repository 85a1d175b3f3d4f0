"""ViT soups as N grows, with and without the Rethinking paper's random input layer (its Tab. 9).

The paper's ViT soups collapse as more models are averaged; its code puts an unseeded random input layer in
front of the pre-trained ViT, so the members do not share their first layer. This study trains shared-start
zoos of the same small ViT plain (``vit2``) and behind a 3×3 conv input layer that every member re-draws from
its own seed (``vit2-randin``, the paper's wrapper); ``archs=`` can add ``vit2-in``, where the members share
that layer (part of the start), to separate the extra layer from its randomness. It evaluates soups and
ensembles of the first N members, N = 2…10 (the weights-vs-features evaluation,
:func:`~mergelab.studies.weights_vs_features.evaluate_zoo`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mergelab.report import FigureRef, Table
from mergelab.report.plots import line_panels
from mergelab.runtime import progress_over
from mergelab.studies.claims import ClaimRow, claims_study_result
from mergelab.studies.common import StudyResult, ZooEval, ZooRecipe, splits, study_runner, zoo_spec
from mergelab.studies.verdict import Difference, claim_verdict, paired_difference
from mergelab.studies.weights_vs_features import evaluate_zoo
from mergelab.zoo.train import train_zoos

SHOWN = {"perf_ave": "Perf Ave", "uniform_soup": "Uniform soup", "greedy_soup": "Greedy soup",
         "logit_ensemble": "Logit ens."}
WRAPPERS = {"vit2": "no input layer", "vit2-in": "shared input layer", "vit2-randin": "random input layer per member"}


@dataclass(frozen=True)
class Config(ZooRecipe):
    datasets: tuple[str, ...] = ("mnist5k",)
    #: "vit2-in" (the input layer shared by the members) is the tighter control; it is an option because one
    #: more ViT zoo of 10 × 3 members costs about 10 more minutes on a shared 2-core machine
    archs: tuple[str, ...] = ("vit2", "vit2-randin")
    ns: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 9, 10)

    def __post_init__(self) -> None:  # bad settings fail in apply_options, before anything is written
        if len(self.ns) < 2:
            raise ValueError(f"the collapse needs at least two values of N, got {self.ns}")


QUICK = Config(archs=("vit2", "vit2-randin"), ns=(2, 3, 5), n_seeds=2, epochs=1, pretrain_epochs=2, n_train=1000)


Scores = dict[tuple[str, str, int, str], torch.Tensor]  # (dataset, arch, N, method) → (seeds, examples)


def build(out: Path, cfg: Config, *, show_progress: bool = True) -> StudyResult:
    seeds = cfg.zoo_seeds()
    grid = [(d, a, s) for d in cfg.datasets for a in cfg.archs for s in seeds]
    zoos = train_zoos([zoo_spec(replace(cfg, seed=s), a, d, "shared", max(cfg.ns)) for d, a, s in grid],
                      workers=cfg.workers, show_progress=show_progress, executor=cfg.executor)
    per: dict[tuple[str, str, int, str], list[torch.Tensor]] = {}
    rows: list[dict[str, Any]] = []
    for (d, arch, s), zoo in progress_over(list(zip(grid, zoos, strict=True)), "evaluate ViT soups",
                                           show_progress=show_progress):
        val, test = splits(d, cfg.split_seed)
        correct: dict[tuple[int, str], torch.Tensor] = {}
        for r in evaluate_zoo(ZooEval(zoo, val, test), cfg.ns, correct=correct):
            if r["method"] in SHOWN:
                rows.append({"dataset": d, "arch": arch, "seed": s, **r})
        for (n, m), v in correct.items():
            if m in SHOWN:
                per.setdefault((d, arch, n, m), []).append(v)
    scores = {k: torch.stack(v) for k, v in per.items()}
    return _report(out, cfg, zoos, rows, scores)


def _claims(cfg: Config, scores: Scores, rows: Sequence[dict[str, Any]]) -> list[ClaimRow]:
    lo, hi = min(cfg.ns), max(cfg.ns)
    datasets = sorted({k[0] for k in scores})

    def drop(d: str, arch: str) -> torch.Tensor:  # soup(N = lo) − soup(N = hi), per seed and example
        return scores[(d, arch, lo, "uniform_soup")] - scores[(d, arch, hi, "uniform_soup")]

    def have(arch: str) -> bool:
        return arch in cfg.archs

    setting = (f"{', '.join(cfg.archs)} on {', '.join(cfg.datasets)}; start {cfg.pretrain_epochs} epochs, members "
               f"fine-tuned {cfg.epochs} epochs (AdamW) on {cfg.n_train or 'all'} images; N = {lo}…{hi}; "
               f"{cfg.n_seeds} seeds")
    mean = {}
    for r in rows:
        mean.setdefault((r["arch"], r["N"], r["method"]), []).append(r["test_acc"])
    def avg(*key: Any) -> float:
        return sum(mean[key]) / len(mean[key])

    regime = "; ".join(f"{a}: members {avg(a, hi, 'perf_ave'):.1f} %, soup N={lo} {avg(a, lo, 'uniform_soup'):.1f} %, "
                       f"N={hi} {avg(a, hi, 'uniform_soup'):.1f} %" for a in cfg.archs if (a, hi, "perf_ave") in mean)
    paper = "Tab. 9: ViT uniform soups collapse as N grows (their wrapper re-draws a random input layer per model)"
    out = []

    def add(claim: str, diffs: list[Difference], paper_text: str) -> None:
        out.append(ClaimRow(claim_verdict(claim, diffs, what="datasets", paper=paper_text), paper_text, diffs,
                            setting, regime))

    if have("vit2-randin"):
        add(f"With a random input layer per member the uniform soup falls from N = {lo} to N = {hi}",
            [paired_difference(scores[(d, "vit2-randin", lo, "uniform_soup")],
                               scores[(d, "vit2-randin", hi, "uniform_soup")], seed=hi) for d in datasets], paper)
        add(f"With a random input layer per member the soup falls below Perf Ave at N = {hi}",
            [paired_difference(scores[(d, "vit2-randin", hi, "perf_ave")],
                               scores[(d, "vit2-randin", hi, "uniform_soup")], seed=hi) for d in datasets], paper)
    for ref in ("vit2", "vit2-in"):
        if have("vit2-randin") and have(ref):
            add(f"The soup's fall from N = {lo} to {hi} is larger with a random input layer than with "
                f"{WRAPPERS[ref]}", [paired_difference(drop(d, "vit2-randin"), drop(d, ref), seed=hi)
                                     for d in datasets],
                "the collapse comes from the members' unshared first layer (Tab. 9's wrapper), not from ViTs")
    return out


def _report(out: Path, cfg: Config, zoos: Sequence[Any], rows: list[dict[str, Any]], scores: Scores
            ) -> StudyResult:
    claims = _claims(cfg, scores, rows)
    datasets = sorted({k[0] for k in scores})
    mean_rows = [{"dataset": d, "arch": a, "wrapper": WRAPPERS.get(a, a), "N": n,
                  **{m: 100.0 * float(scores[(d, a, n, m)].mean()) for m in SHOWN}}
                 for d in datasets for a in cfg.archs for n in cfg.ns if (d, a, n, "uniform_soup") in scores]
    table = Table("Test accuracy (%) vs N, mean over seeds", mean_rows, headers=SHOWN)
    panels = {f"{WRAPPERS.get(a, a)} ({d})": (list(cfg.ns), {m: [100.0 * float(scores[(d, a, n, m)].mean())
                                                                  for n in cfg.ns] for m in SHOWN})
              for d in datasets for a in cfg.archs}
    path = line_panels(panels, out / "vit_soups_vs_n.png", xlabel="number of models N", ylabel="test accuracy (%)",
                       labels=SHOWN, title="ViT soups and ensembles as N grows")
    fig = FigureRef(path, "Test accuracy of the uniform and greedy soups, the logit ensemble and the members' mean "
                          "(Perf Ave) for the first N members, per ViT variant.",
                    "one panel per ViT variant (no input layer, a shared one, a random one per member); x = number "
                    "of models averaged, y = test accuracy in %. A blue soup line that falls while the grey Perf Ave "
                    "line stays flat is the collapse of Tab. 9.")
    return claims_study_result(
        "ViT soups", {"seed": cfg.seed, "zoo seeds": cfg.n_seeds},
        "ViT soups as N grows, with and without a random input layer (Tab. 9)",
        "Shared-start zoos of one small ViT, plain, behind a shared input layer, and behind an input layer each "
        "member re-draws from its own seed (the paper's wrapper; ours is seeded per member so runs repeat). "
        "Verdicts bootstrap over seeds and test examples.",
        claims, table, [fig], {"vit_soups_per_seed.csv": rows, "vit_soups": table}, zoos)


run = study_runner("vit-soups", build, Config(), QUICK)


__all__ = ["QUICK", "Config", "build", "run"]
