"""Merging models trained on different datasets from one start (the Rethinking paper's Tab. 3).

The paper fine-tunes one start on CIFAR-10 (model 1) and on CIFAR-100 (model 2) and evaluates each model,
their uniform soup and their ensembles on both: model 1 scores 5.8 % on CIFAR-100, the soup 49.6 %, and the
ensembles stay near model 1. Here the pair is two of our offline datasets of one shape (default MNIST-5k and
Animal-MNIST, both 28×28 with 10 classes): a shared start pre-trained on dataset A, model 1 fine-tuned on A,
model 2 fine-tuned on B from the same start (``TrainConfig.base_dataset``), for ``n_seeds`` zoo seeds. Each of
model 1, model 2, the uniform soup (every tensor averaged, heads included), the logit ensemble and the feature
ensemble (averaged features, averaged heads) is scored on both test sets.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mergelab.ensemble import ensemble_logits, feature_ensemble_logits, merged_head, model_outputs
from mergelab.report import FigureRef, Table
from mergelab.report.plots import grouped_bars
from mergelab.runtime import progress_over
from mergelab.soups import uniform_soup
from mergelab.studies.claims import ClaimRow, claims_study_result
from mergelab.studies.common import StudyResult, ZooRecipe, study_runner
from mergelab.studies.verdict import claim_verdict, paired_difference
from mergelab.zoo.data import load_dataset
from mergelab.zoo.train import TrainConfig, Zoo, ZooSpec, train_zoos

METHODS = {"model_1": "Model 1 (trained on A)", "model_2": "Model 2 (trained on B)", "uniform_soup": "Uniform soup",
           "logit_ensemble": "Logit ens.", "feature_ensemble": "Feature ens."}


@dataclass(frozen=True)
class Config(ZooRecipe):
    #: dataset pairs "A:B" of one input shape and class count; the shared start is pre-trained on A
    pairs: tuple[str, ...] = ("mnist5k:animal-mnist",)
    archs: tuple[str, ...] = ("vgg6bn", "resnet8", "vgg6")


QUICK = Config(archs=("vgg6bn",), n_seeds=2, epochs=1, pretrain_epochs=2, n_train=1000)


def _pair(text: str) -> tuple[str, str]:
    a, sep, b = text.partition(":")
    if not sep or not a or not b or a == b:
        raise ValueError(f"pair '{text}' must name two different datasets as 'A:B', e.g. 'mnist5k:animal-mnist'")
    return a, b


def zoo_specs(cfg: Config) -> list[tuple[str, str, str, int, ZooSpec, ZooSpec]]:
    """(A, B, arch, seed, zoo on A, zoo on B from A's start) for every pair × arch × seed."""
    out = []
    for pair in cfg.pairs:
        a, b = _pair(pair)
        for arch in cfg.archs:
            for s in cfg.zoo_seeds():
                base = TrainConfig(arch=arch, dataset=a, epochs=cfg.epochs, pretrain_epochs=cfg.pretrain_epochs,
                                   n_train=cfg.n_train, width=cfg.width, split_seed=cfg.split_seed, seed=s)
                other = replace(base, dataset=b, base_dataset=a)
                out.append((a, b, arch, s, ZooSpec(base, 1), ZooSpec(other, 1)))
    return out


def evaluate_pair(one: Zoo, two: Zoo, tests: dict[str, Any]) -> dict[tuple[str, str], torch.Tensor]:
    """Each example's 0/1 score of every method on every test set: ``{(test dataset, method): scores}``."""
    m1, m2 = one.models[0], two.models[0]
    soup = copy.deepcopy(m1)
    soup.load_state_dict(uniform_soup([m1.state_dict(), m2.state_dict()]))
    head = merged_head([m1.head, m2.head])
    out = {}
    for name, data in tests.items():
        o1, o2 = model_outputs(m1, data.x), model_outputs(m2, data.x)
        logits = {"model_1": o1.logits, "model_2": o2.logits, "uniform_soup": model_outputs(soup, data.x).logits,
                  "logit_ensemble": ensemble_logits([o1.logits, o2.logits]),
                  "feature_ensemble": feature_ensemble_logits([o1.features, o2.features], head)}
        for method, lg in logits.items():
            out[(name, method)] = (lg.argmax(1) == data.y).double()
    return out


Scores = dict[tuple[str, str, str, str, str], torch.Tensor]  # (A, B, arch, test set, method) → (seeds, examples)


def _claims(scores: Scores, cells: Sequence[tuple[str, str, str]], member_acc: dict[str, float],
            cfg: Config) -> list[ClaimRow]:
    def diffs(test: str, a: str, b: str) -> list[Any]:
        return [paired_difference(scores[(*c, c[1] if test == "B" else c[0], a)],
                                  scores[(*c, c[1] if test == "B" else c[0], b)], seed=i)
                for i, c in enumerate(cells)]

    setting = (f"{', '.join(cfg.pairs)}; {', '.join(cfg.archs)}; start pre-trained {cfg.pretrain_epochs} epochs on A, "
               f"each model fine-tuned {cfg.epochs} epochs on {cfg.n_train or 'all'} images; {cfg.n_seeds} seeds")
    regime = ("members learned their own task: " + ", ".join(f"{k} {v:.1f} %" for k, v in member_acc.items())
              + "; chance is 10 %")
    rows = []
    spec = [
        ("B", "uniform_soup", "model_1", "On dataset B the soup scores far above model 1 (trained on A)",
         "Tab. 3: on CIFAR-100, model 1 (CIFAR-10) 5.8 %, the soup 49.6 % (+43.8 points)"),
        ("B", "uniform_soup", "logit_ensemble", "On dataset B the soup beats the logit ensemble",
         "Tab. 3: the ensembles stay near model 1 on the second dataset, far below the soup's 49.6 %"),
        ("B", "uniform_soup", "feature_ensemble", "On dataset B the soup beats the feature ensemble",
         "Tab. 3: the ensembles stay near model 1 on the second dataset"),
        ("A", "uniform_soup", "model_2", "On dataset A the soup scores far above model 2 (trained on B)",
         "Tab. 3 (the same comparison the other way round)"),
        ("A", "logit_ensemble", "uniform_soup", "On dataset A the logit ensemble beats the soup",
         "Tab. 3: on CIFAR-10 the ensembles stay near model 1, above the soup"),
    ]
    for test, a, b, claim, paper in spec:
        d = diffs(test, a, b)
        v = claim_verdict(claim, d, what="(pair, architecture) cells", paper=paper)
        rows.append(ClaimRow(v, paper, d, setting, regime))
    return rows


def _figure(scores: Scores, cells: Sequence[tuple[str, str, str]], out: Path) -> FigureRef:
    panels = {}
    for a, b, _ in dict.fromkeys(cells):
        archs = [c[2] for c in cells if c[:2] == (a, b)]
        for test in (a, b):
            panels[f"test on {test} (A = {a}, B = {b})"] = (
                archs, {m: [100.0 * float(scores[(a, b, arch, test, m)].mean()) for arch in archs] for m in METHODS})
    path = grouped_bars(panels, out / "cross_dataset.png", ylabel="test accuracy (%)",
                        title="Models trained on different datasets from one start, and their merges",
                        labels=METHODS, ylim=(0, 100))
    return FigureRef(path, "Test accuracy of model 1 (fine-tuned on A), model 2 (fine-tuned on B), their uniform "
                           "soup and their ensembles, on A's and on B's test set (mean over seeds).",
                     "one panel per test set; one group of bars per architecture, one bar per model or merge, "
                     "height = test accuracy (0–100 %). The paper's pattern on B: model 1's bar near chance, the "
                     "soup's bar far above it, the ensemble bars close to model 1's.")


def build(out: Path, cfg: Config, *, show_progress: bool = True) -> StudyResult:
    jobs = zoo_specs(cfg)
    zoos = train_zoos([s for j in jobs for s in j[4:]], workers=cfg.workers, show_progress=show_progress,
                      executor=cfg.executor)
    tests = {d: load_dataset(d, "test", cfg.split_seed) for p in cfg.pairs for d in _pair(p)}
    per_seed: dict[tuple[str, str, str, str, str], list[torch.Tensor]] = {}
    rows = []
    for k, (a, b, arch, s, _, _) in progress_over(list(enumerate(jobs)), "evaluate cross-dataset merges",
                                                  show_progress=show_progress):
        got = evaluate_pair(zoos[2 * k], zoos[2 * k + 1], {a: tests[a], b: tests[b]})
        for (test, method), v in got.items():
            per_seed.setdefault((a, b, arch, test, method), []).append(v)
            rows.append({"A": a, "B": b, "arch": arch, "seed": s, "test_set": test, "method": method,
                         "test_acc": 100.0 * float(v.mean()), "n_test": int(v.numel())})
    scores = {k: torch.stack(v) for k, v in per_seed.items()}
    cells = list(dict.fromkeys((r["A"], r["B"], r["arch"]) for r in rows))
    member_acc = {f"{arch} model 1 on {a}": 100.0 * float(scores[(a, b, arch, a, "model_1")].mean())
                  for a, b, arch in cells}
    member_acc.update({f"{arch} model 2 on {b}": 100.0 * float(scores[(a, b, arch, b, "model_2")].mean())
                       for a, b, arch in cells})
    claims = _claims(scores, cells, member_acc, cfg)
    mean_rows = [{"A": a, "B": b, "arch": arch, "test_set": t,
                  **{m: 100.0 * float(scores[(a, b, arch, t, m)].mean()) for m in METHODS}}
                 for a, b, arch in cells for t in (a, b)]
    table = Table("Test accuracy (%) on each dataset, mean over seeds", mean_rows,
                  headers={"test_set": "test set", **METHODS},
                  note="Model 1 is fine-tuned on A, model 2 on B, both from one start pre-trained on A. Paper "
                       "(Tab. 3, CIFAR-10 → CIFAR-100): model 1 5.8 %, soup 49.6 % on CIFAR-100.")
    return claims_study_result(
        "Merging models trained on different datasets", {"seed": cfg.seed, "pairs": ", ".join(cfg.pairs)},
        "Merging models trained on different datasets (Tab. 3)",
        "A start pre-trained on dataset A is fine-tuned once on A (model 1) and once on B (model 2); the uniform "
        "soup averages every tensor of the two (heads included), the logit ensemble their logits, the feature "
        "ensemble their features under the averaged head. All are scored on A's and B's test sets; verdicts "
        "bootstrap over seeds and test examples.",
        claims, table, [_figure(scores, cells, out)], {"cross_dataset_per_seed.csv": rows, "cross_dataset": table},
        zoos)


run = study_runner("cross-dataset", build, Config(), QUICK)


__all__ = ["QUICK", "Config", "build", "evaluate_pair", "run"]
