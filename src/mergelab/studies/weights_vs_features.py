"""Study 1 — averaging weights vs averaging features (the paper's Table 1, Fig. 3 and Fig. 7a).

For each dataset × architecture zoo and each ensemble size N, compares the mean of the individuals
(Perf Ave), the best single model, the uniform and greedy soups, the logit ensemble, the feature ensemble
(features averaged; heads merged by weight averaging, or the first model's head) and the greedy logit and
feature ensembles, with their cost (parameters and FLOPs per prediction). Greedy selection uses the val
split; every accuracy reported is on the test split. Members 0..N−1 of one zoo are used for size N.

Greedy ensembles are built two ways: by their own val score, and from the greedy soup's picks (the paper's
protocol: the ensemble of the models the greedy soup kept). For BatchNorm nets the soups are also evaluated
after a BN reset on training data (running statistics re-estimated for the averaged weights). With
``n_seeds`` > 1 every zoo is trained from that many seeds and the verdicts bootstrap over seeds and test
examples; the tables show the mean over seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergelab.align.bn_reset import has_batchnorm
from mergelab.ensemble import ensemble_logits, feature_ensemble_logits, merged_head
from mergelab.report import FigureRef, Report, Section, Table, Verdict
from mergelab.report.plots import grouped_bars, line_panels
from mergelab.report.tables import best_in_row
from mergelab.runtime import progress_over
from mergelab.soups import greedy_ensemble, greedy_select
from mergelab.studies.claims import ClaimRow, claims_table
from mergelab.studies.common import (
    StudyResult,
    ZooEval,
    ZooRecipe,
    explain,
    splits,
    study_runner,
    zoo_spec,
)
from mergelab.studies.verdict import Difference, check, claim_verdict, compare, paired_difference
from mergelab.zoo.data import load_dataset, train_subset
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
    "soup_picks_logit_ensemble": "Logit ens. of greedy-soup picks",
    "soup_picks_feature_ensemble": "Feature ens. of greedy-soup picks",
    "uniform_soup_bn_reset": "Uniform soup + BN reset",
    "greedy_soup_bn_reset": "Greedy soup + BN reset",
}
#: the methods drawn as bars (the rest are in the tables)
BAR_METHODS = ("perf_ave", "uniform_soup", "uniform_soup_bn_reset", "greedy_soup", "logit_ensemble",
               "feature_ensemble", "soup_picks_logit_ensemble")
#: methods only BatchNorm nets have (a BN reset leaves any other net unchanged)
BN_METHODS = ("uniform_soup_bn_reset", "greedy_soup_bn_reset")


@dataclass(frozen=True)
class Config(ZooRecipe):
    """The full setting: three families at two depths each (VGG with and without BN, ResNet), N = 2…10, 3 zoo
    seeds, the demo's training recipe (2,000 MNIST-5k images, 3 + 2 epochs, half-width convs), so that a
    shared 2-core machine runs it within an hour and the demo's zoos (seed 0) come from the cache. DenseNet,
    ViT and Animal-MNIST are options (``archs=``, ``datasets=``); ViT soups have their own study."""

    datasets: tuple[str, ...] = ("mnist5k",)
    archs: tuple[str, ...] = ("vgg6", "vgg9", "vgg6bn", "vgg9bn", "resnet8", "resnet14", "linear")
    #: architectures also trained from independent random inits (the case where soups should fail)
    independent_archs: tuple[str, ...] = ("vgg6",)
    ns: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 9, 10)
    eval_mode: str = "eval"  # "train": BatchNorm with batch statistics at test time, as the original code
    greedy_strict: bool = True
    #: also evaluate BN nets' soups after re-estimating BN statistics on this many training batches (0: off)
    bn_reset_batches: int = 10

    def __post_init__(self) -> None:  # bad settings fail in apply_options, before anything is written
        if self.eval_mode not in ("eval", "train"):
            raise ValueError(f"eval_mode must be 'eval' or 'train', got '{self.eval_mode}'")


QUICK = Config(datasets=("mnist5k",), archs=("vgg6bn", "linear"), independent_archs=("vgg6bn",), ns=(2, 3, 5),
               epochs=1, pretrain_epochs=2, n_train=1000, width=16, n_seeds=1)


@dataclass
class Result(StudyResult):
    rows: list[dict[str, Any]] = field(default_factory=list)
    main_table: Table | None = None


def zoo_label(arch: str, init: str) -> str:
    return arch if init == "shared" else f"{arch} (indep.)"


def zoo_specs(cfg: Config) -> list[ZooSpec]:
    """Every zoo of the grid, for every zoo seed."""
    return [spec for s in cfg.zoo_seeds() for spec in _seed_specs(replace(cfg, seed=s))]


def _seed_specs(cfg: Config) -> list[ZooSpec]:
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
COMPARED = ("perf_ave", "uniform_soup", "greedy_soup", "logit_ensemble", "feature_ensemble",
            "greedy_logit_ensemble", "soup_picks_logit_ensemble", *BN_METHODS)


def evaluate_zoo(ev: ZooEval, ns: Sequence[int], *, strict: bool = True,
                 correct: dict[tuple[int, str], torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """All methods for every N in ``ns`` (members 0..N−1) on one zoo; one row per (N, method).

    The BN-reset soups are added when the zoo's nets have BatchNorm and ``ev.bn_reset_x`` is set.
    ``correct`` (when given) receives, per (N, method) of :data:`COMPARED`, each test example's score
    (1 right, 0 wrong; Perf Ave: the share of members right) for the verdicts' paired bootstrap."""
    zoo = ev.zoo
    p, f, ph, fh = _costs(zoo)
    val_y, test_y = ev.val.y, ev.test.y
    val_scores = [ev.member_acc(i, "val") for i in range(len(zoo))]
    test_scores = [ev.member_acc(i, "test") for i in range(len(zoo))]
    with_bn_reset = ev.bn_reset_x is not None and has_batchnorm(zoo.models[0])

    def logit_out(idx: Sequence[int], split: str) -> torch.Tensor:
        return ensemble_logits([ev.outputs(i, split).logits for i in idx])

    def feature_out(idx: Sequence[int], split: str, head: str = "merged") -> torch.Tensor:
        h = merged_head([ev.members[i].head for i in idx]) if head == "merged" else ev.members[idx[0]].head
        return feature_ensemble_logits([ev.outputs(i, split).features for i in idx], h)

    def acc(logits: torch.Tensor, split: str) -> float:
        return accuracy_pct(logits, val_y if split == "val" else test_y)

    def logit_acc(idx: Sequence[int], split: str) -> float:
        return acc(logit_out(idx, split), split)

    def feature_acc(idx: Sequence[int], split: str, head: str = "merged") -> float:
        return acc(feature_out(idx, split, head), split)

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

        ens_p, ens_f = (lambda k: k * p), (lambda k: k * f)
        feat_p, feat_f = (lambda k: k * (p - ph) + ph), (lambda k: k * (f - fh) + fh)
        add("perf_ave", float(np.mean(test_scores[:n])), float(np.mean(val_scores[:n])), 1, p, f)
        best = max(idx, key=lambda i: (val_scores[i], -i))
        add("best_single", test_scores[best], val_scores[best], 1, p, f, [best])
        add("uniform_soup", ev.soup_acc(idx, "test"), ev.soup_acc(idx, "val"), n, p, f, idx)
        g = greedy_select(val_scores[:n], lambda s: ev.soup_acc(s, "val"), strict=strict)
        add("greedy_soup", ev.soup_acc(g.selected, "test"), g.score, len(g.selected), p, f, g.selected)
        add("logit_ensemble", logit_acc(idx, "test"), logit_acc(idx, "val"), n, ens_p(n), ens_f(n), idx)
        add("feature_ensemble", feature_acc(idx, "test"), feature_acc(idx, "val"), n, feat_p(n), feat_f(n), idx)
        add("feature_ensemble_first_head", feature_acc(idx, "test", "first"), feature_acc(idx, "val", "first"),
            n, feat_p(n), feat_f(n), idx)
        gl = greedy_ensemble(val_scores[:n], lambda s: logit_acc(s, "val"), strict=strict)
        k = len(gl.selected)
        add("greedy_logit_ensemble", logit_acc(gl.selected, "test"), gl.score, k, ens_p(k), ens_f(k), gl.selected)
        gf = greedy_ensemble(val_scores[:n], lambda s: feature_acc(s, "val"), strict=strict)
        k = len(gf.selected)
        add("greedy_feature_ensemble", feature_acc(gf.selected, "test"), gf.score, k, feat_p(k), feat_f(k),
            gf.selected)
        # the paper's greedy ensembles: the models the greedy soup kept, ensembled
        k = len(g.selected)
        add("soup_picks_logit_ensemble", logit_acc(g.selected, "test"), logit_acc(g.selected, "val"), k,
            ens_p(k), ens_f(k), g.selected)
        add("soup_picks_feature_ensemble", feature_acc(g.selected, "test"), feature_acc(g.selected, "val"), k,
            feat_p(k), feat_f(k), g.selected)
        if with_bn_reset:
            add("uniform_soup_bn_reset", ev.soup_acc(idx, "test", bn_reset=True),
                ev.soup_acc(idx, "val", bn_reset=True), n, p, f, idx)
            gb = greedy_select(val_scores[:n], lambda s: ev.soup_acc(s, "val", bn_reset=True), strict=strict)
            add("greedy_soup_bn_reset", ev.soup_acc(gb.selected, "test", bn_reset=True), gb.score,
                len(gb.selected), p, f, gb.selected)
        if correct is not None:
            def hits(logits: torch.Tensor) -> torch.Tensor:
                return (logits.argmax(1) == test_y).double()

            correct[(n, "perf_ave")] = torch.stack([hits(ev.outputs(i, "test").logits) for i in idx]).mean(0)
            correct[(n, "uniform_soup")] = hits(ev.soup_outputs(idx, "test").logits)
            correct[(n, "greedy_soup")] = hits(ev.soup_outputs(g.selected, "test").logits)
            correct[(n, "logit_ensemble")] = hits(logit_out(idx, "test"))
            correct[(n, "feature_ensemble")] = hits(feature_out(idx, "test"))
            correct[(n, "greedy_logit_ensemble")] = hits(logit_out(gl.selected, "test"))
            correct[(n, "soup_picks_logit_ensemble")] = hits(logit_out(g.selected, "test"))
            if with_bn_reset:
                correct[(n, "uniform_soup_bn_reset")] = hits(ev.soup_outputs(idx, "test", bn_reset=True).logits)
                correct[(n, "greedy_soup_bn_reset")] = hits(
                    ev.soup_outputs(gb.selected, "test", bn_reset=True).logits)
    return rows


def mean_over_seeds(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, zoo, N, method): accuracies averaged over the zoo seeds (``seeds`` counts them)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["zoo"], r["N"], r["method"]), []).append(r)
    out = []
    for group in groups.values():
        row = dict(group[0])
        for k in ("test_acc", "val_acc", "models_used"):
            row[k] = float(np.mean([g[k] for g in group]))
        row["seeds"] = len(group)
        out.append(row)
    return out


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
    present = [m for m in METHODS if any(m in r for r in out)]
    return Table(f"Test accuracy (%) with N = {n} models; bold = best method in the row", out,
                 columns=["dataset", "architecture", *present, "params (soup / ens.)", "MFLOPs (soup / ens.)"],
                 headers={"dataset": "Dataset", "architecture": "Architecture", **METHODS},
                 bold=best_in_row(list(METHODS)),
                 note="Perf Ave = mean accuracy of the N individual models; greedy methods select on the val "
                      "split; + BN reset: BN statistics re-estimated on training data (BN nets only). Costs are "
                      "per prediction: a soup costs one model, an ensemble N.")


Key = tuple[str, str, int]  # (dataset, zoo label, N)
Correct = Mapping[tuple[str, str, int, str], torch.Tensor]  # (dataset, zoo, N, method) → (seeds, examples)

#: the paper's Tab. 1 (7 datasets): how often the uniform soup is below Perf Ave (the issue's count)
PAPER_SOUP_BELOW_PERF_AVE = "Tab. 1: the uniform soup is below Perf Ave on 5 of 7 datasets"


def _depth(arch: str) -> int:
    """The depth in an architecture's name (vgg9bn → 9, vit4 → 4)."""
    digits = "".join(ch if ch.isdigit() else " " for ch in arch).split()
    return int(digits[0]) if digits else 1


def depth_pairs(configs: Sequence[Key]) -> list[tuple[Key, Key]]:
    """(shallower, deeper) zoo pairs of one family, dataset and N (the deepest vs the shallowest)."""
    by_family: dict[tuple[str, str, int, bool], list[Key]] = {}
    for c in configs:
        arch = c[1].removesuffix(" (indep.)")
        if arch not in ARCHS or ARCHS[arch].family == "linear":
            continue
        by_family.setdefault((c[0], ARCHS[arch].family, c[2], c[1].endswith("(indep.)")), []).append(c)
    out = []
    for group in by_family.values():
        ordered = sorted(group, key=lambda c: _depth(c[1]))
        if len(ordered) > 1 and _depth(ordered[0][1]) != _depth(ordered[-1][1]):
            out.append((ordered[0], ordered[-1]))
    return out


def regime_text(rows: Sequence[dict[str, Any]], n: int) -> str:
    """What the claims rest on: the members' mean test accuracy (Perf Ave) of every zoo at N = ``n``, and for an
    architecture trained both ways, its shared-start members beside its independent ones (a shared-start recipe
    whose members fall well below independent training is a broken zoo, not a finding)."""
    perf = {(d, z): acc for (d, z, m_n, m), acc in _lookup(rows).items() if m == "perf_ave" and m_n == n}
    text = f"members' mean test accuracy (Perf Ave, N = {n}): " + ", ".join(
        f"{z}{'' if len({d for d, _ in perf}) == 1 else f' ({d})'} {v:.1f} %" for (d, z), v in perf.items())
    pairs = [f"{z.removesuffix(' (indep.)')} shared start {perf[(d, z.removesuffix(' (indep.)'))]:.1f} % vs "
             f"independent {v:.1f} %" for (d, z), v in perf.items()
             if z.endswith("(indep.)") and (d, z.removesuffix(" (indep.)")) in perf]
    return text + (f"; {'; '.join(pairs)}" if pairs else "")


def setting_text(cfg: Config) -> str:
    indep = f"; {', '.join(cfg.independent_archs)} also from independent inits" if cfg.independent_archs else ""
    return (f"{', '.join(cfg.archs)} on {', '.join(cfg.datasets)}; one start pre-trained {cfg.pretrain_epochs} "
            f"epochs, members fine-tuned {cfg.epochs} epochs on {cfg.n_train or 'all'} images (width {cfg.width})"
            f"{indep}; N = {', '.join(map(str, cfg.ns))}; {cfg.n_seeds} zoo seed(s); BN in {cfg.eval_mode} mode")


def _claims(rows: Sequence[dict[str, Any]], cfg: Config, correct: Correct
            ) -> tuple[list[ClaimRow], list[Verdict], dict[str, Any]]:
    """The paper's claims as resolved comparisons (paired bootstrap over test examples and zoo seeds), each a
    claims-table row beside the paper's statement; the linear identity as a check (never evidence)."""
    configs: list[Key] = sorted({(r["dataset"], r["zoo"], r["N"]) for r in rows})
    shared = [c for c in configs if not c[1].endswith("(indep.)") and c[1] != "linear"]
    indep = [c for c in configs if c[1].endswith("(indep.)")]
    nonlinear = [c for c in configs if c[1] != "linear"]
    bn = [c for c in shared if (*c, "uniform_soup_bn_reset") in correct]
    lo, hi = min(cfg.ns), max(r["N"] for r in rows)
    setting, regime = setting_text(cfg), regime_text(rows, hi)
    claims: list[ClaimRow] = []

    def diff(c: Key, a: str, b: str) -> Difference:
        return paired_difference(correct[(*c, a)], correct[(*c, b)], seed=c[2])

    def add(claim: str, diffs: list[Difference], what: str, paper: str, extra: str = "") -> None:
        claims.append(ClaimRow(claim_verdict(claim, diffs, what=what, paper=paper), paper, diffs,
                               setting + (f"; {extra}" if extra else ""), regime))

    add("Averaging outputs beats averaging weights: logit ensemble > uniform soup",
        [diff(c, "logit_ensemble", "uniform_soup") for c in nonlinear], "zoo × N configurations",
        "Tab. 1, Fig. 3: ensembles above the uniform soup (the linear model, where they are the same function, is "
        "a check, not evidence)")
    add("Averaging features beats averaging weights: feature ensemble > uniform soup",
        [diff(c, "feature_ensemble", "uniform_soup") for c in nonlinear], "zoo × N configurations",
        "Tab. 1, Fig. 3: feature ensembles above the uniform soup")
    add("Greedy ensemble of the greedy soup's picks > greedy soup (the paper's protocol)",
        [diff(c, "soup_picks_logit_ensemble", "greedy_soup") for c in nonlinear], "zoo × N configurations",
        "Tab. 1: greedy ensembles (the greedy soup's ingredients, ensembled) above greedy soups",
        "greedy selection on the val split, scored on test")
    add("Uniform soup of shared-start fine-tunes > the mean of its members (Perf Ave)",
        [diff(c, "uniform_soup", "perf_ave") for c in shared], "shared-start configurations",
        PAPER_SOUP_BELOW_PERF_AVE + " (the model-soups claim; the Rethinking paper's own table mostly does not "
                                    "show it)")
    add("Greedy soup > Perf Ave (greedy selection on val, scored on test)",
        [diff(c, "greedy_soup", "perf_ave") for c in shared], "shared-start configurations",
        "model soups (Wortsman et al. 2022): the greedy soup is never worse than the best single model on held-out "
        "data")
    if bn:
        reset = f"BN statistics re-estimated on {cfg.bn_reset_batches} training batches"
        add("A BN reset on training data lifts the uniform soup of BN nets",
            [diff(c, "uniform_soup_bn_reset", "uniform_soup") for c in bn], "BN configurations",
            "not the paper's protocol (it keeps the averaged running statistics); REPAIR (Jordan et al. 2023) "
            "re-estimates them after averaging", reset)
        add("Logit ensemble > uniform soup even after the soup's BN reset",
            [diff(c, "logit_ensemble", "uniform_soup_bn_reset") for c in bn], "BN configurations",
            "Tab. 1's ensemble advantage, with the soup given re-estimated BN statistics", reset)
    if indep:
        add("Soups of independently trained models fall below their members: Perf Ave > uniform soup",
            [diff(c, "perf_ave", "uniform_soup") for c in indep], "independent-init configurations",
            "no shared basin, so weight averaging fails (the paper's motivation)")
    grow = []
    for d, z in sorted({(c[0], c[1]) for c in nonlinear}):
        if (d, z, lo, "uniform_soup") in correct and (d, z, hi, "uniform_soup") in correct and lo != hi:
            gap_hi = correct[(d, z, hi, "logit_ensemble")] - correct[(d, z, hi, "uniform_soup")]
            gap_lo = correct[(d, z, lo, "logit_ensemble")] - correct[(d, z, lo, "uniform_soup")]
            grow.append(paired_difference(gap_hi, gap_lo, seed=hi))
    add(f"The ensemble − soup gap grows with N (N = {lo} → {hi})", grow, "zoos",
        "Fig. 7a: the gap widens as more models are combined",
        f"gap at N = {hi} minus gap at N = {lo}, per zoo")
    pairs = depth_pairs([c for c in nonlinear if c[2] == hi])
    deeper = []
    for shallow, deep in pairs:
        gap_deep = correct[(*deep, "logit_ensemble")] - correct[(*deep, "uniform_soup")]
        gap_shallow = correct[(*shallow, "logit_ensemble")] - correct[(*shallow, "uniform_soup")]
        deeper.append(paired_difference(gap_deep, gap_shallow, seed=hi))
    if deeper:
        add(f"The ensemble − soup gap is larger for the deeper variant of a family (N = {hi})", deeper, "families",
            "no number in the paper (its nets are VGG-19/ResNet-like deep); measured here because issue 14 asks "
            "whether depth matters",
            "deep − shallow gap: " + ", ".join(f"{deep[1]} vs {shallow[1]}" for shallow, deep in pairs))
    checks = []
    lin = [c for c in configs if c[1] == "linear"]
    if lin:
        same = sum(1 for c in lin if torch.equal(correct[(*c, "logit_ensemble")], correct[(*c, "uniform_soup")]))
        checks.append(check("For a linear model the uniform soup is the logit ensemble (the same function)", same,
                            len(lin), "identical predictions on every test example and seed"))
    verdicts = [c.verdict for c in claims] + checks
    summary = {v.claim: {"outcome": v.word, "detail": v.detail} for v in verdicts}
    return claims, verdicts, summary


def perf_ave_table(rows: Sequence[dict[str, Any]], n: int, correct: Correct) -> Table:
    """The paper's soup-vs-Perf-Ave comparison beside ours: one row per shared-start zoo at N = ``n``."""
    mean = _lookup(rows)
    out: list[dict[str, Any]] = [{"setting": "paper", "zoo": "Tab. 1, 7 datasets (CIFAR, ImageNet subsets …)",
                                  "perf_ave": "", "uniform_soup": "", "difference": "",
                                  "outcome": "soup below Perf Ave on 5/7 datasets"}]
    below = above = 0
    for d, z in dict.fromkeys((r["dataset"], r["zoo"]) for r in rows):
        if z.endswith("(indep.)") or (d, z, n, "uniform_soup") not in correct:
            continue
        dif = paired_difference(correct[(d, z, n, "uniform_soup")], correct[(d, z, n, "perf_ave")], seed=n)
        outcome = {"better": "soup above", "worse": "soup below", "tie": "no difference at this size"}[compare(dif)]
        below += outcome == "soup below"
        above += outcome == "soup above"
        out.append({"setting": f"ours, {d}", "zoo": z, "perf_ave": mean[(d, z, n, "perf_ave")],
                    "uniform_soup": mean[(d, z, n, "uniform_soup")], "difference": dif.text(), "outcome": outcome})
    total = len(out) - 1
    return Table(f"Uniform soup vs Perf Ave (mean of the members), N = {n}: paper beside ours", out,
                 headers={"setting": "Setting", "zoo": "Zoo", "perf_ave": "Perf Ave (%)",
                          "uniform_soup": "Uniform soup (%)", "difference": "soup − Perf Ave [95 % CI] (points)",
                          "outcome": "Outcome"},
                 note=f"Ours: the soup is resolved below Perf Ave in {below}/{total} shared-start zoos and above it "
                      f"in {above}/{total} (paired bootstrap over test examples and zoo seeds; the paper's count "
                      "has no uncertainty attached).")


def gap_table(rows: Sequence[dict[str, Any]], correct: Correct) -> Table:
    """Logit ensemble − uniform soup with its CI for every zoo and N (the data of Fig. 7a and the depth plot)."""
    out = []
    for d, z, n in sorted({(r["dataset"], r["zoo"], r["N"]) for r in rows}):
        if (d, z, n, "uniform_soup") not in correct:
            continue
        dif = paired_difference(correct[(d, z, n, "logit_ensemble")], correct[(d, z, n, "uniform_soup")], seed=n)
        out.append({"dataset": d, "zoo": z, "depth": _depth(z), "N": n, "gap": dif.mean, "ci_low": dif.low,
                    "ci_high": dif.high, "seeds": dif.n_seeds, "outcome": compare(dif)})
    return Table("Logit ensemble − uniform soup (points) with its 95 % CI, every zoo and N", out,
                 note="outcome: better = the ensemble is resolved above the soup, tie = not resolved at this size.")


def _figures(rows: Sequence[dict[str, Any]], cfg: Config, out: Path, verdicts: Sequence[Verdict]
             ) -> list[FigureRef]:
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    acc = _lookup(rows)
    nan = float("nan")
    figs = []
    shown = sorted({min(cfg.ns), max(cfg.ns)} & {r["N"] for r in rows})
    for n in shown:
        panels = {}
        for ds in datasets:
            zoos = list(dict.fromkeys(r["zoo"] for r in rows if r["dataset"] == ds and r["N"] == n))
            if zoos:
                panels[ds] = (zoos, {m: [acc.get((ds, z, n, m), nan) for z in zoos] for m in BAR_METHODS})
        if not panels:
            continue
        path = grouped_bars(panels, out / f"fig3_bars_N{n}.png", ylabel="test accuracy (%)",
                            title=f"Soups vs ensembles, N = {n} models per method",
                            labels={m: METHODS[m] for m in BAR_METHODS},
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
    n_hi = max(r["N"] for r in rows)
    families: dict[str, tuple[list[int], dict[str, list[float]]]] = {}
    for ds in datasets:
        grouped: dict[str, list[str]] = {}
        for z in dict.fromkeys(r["zoo"] for r in rows if r["dataset"] == ds and r["N"] == n_hi):
            arch = z.removesuffix(" (indep.)")
            if arch in ARCHS and ARCHS[arch].family != "linear":
                grouped.setdefault(ARCHS[arch].family + z[len(arch):], []).append(z)
        for family, zs in grouped.items():
            zs = sorted(zs, key=_depth)
            if len({_depth(z) for z in zs}) > 1:
                families.setdefault(family, ([_depth(z) for z in zs], {}))[1][ds] = [
                    acc[(ds, z, n_hi, "logit_ensemble")] - acc[(ds, z, n_hi, "uniform_soup")] for z in zs]
    if families:
        path = line_panels(families, out / "gap_vs_depth.png", xlabel="depth (number in the architecture's name)",
                           ylabel="logit ensemble − uniform soup (points)", hline=0.0,
                           title=f"Ensemble − soup gap vs depth, N = {n_hi}")
        deeper = [v for v in verdicts if v.claim.startswith("The ensemble − soup gap is larger for the deeper")]
        figs.append(FigureRef(path, f"Gap vs depth: the logit ensemble's lead over the uniform soup at N = {n_hi} "
                                    "for the shallow and deep variant of each family (mean over zoo seeds). "
                              + (deeper[0].sentence() if deeper else "")))
    return explain(figs, {
        "fig3_bars": "one group of bars per architecture, one bar per method (colours in the legend below the "
                     "plot), height = test accuracy from 0 to 100 %. Blue bars are soups (one model's cost), red and "
                     "orange bars ensembles (N models' cost); a soup bar as tall as the ensemble bars means averaging "
                     "weights loses nothing.",
        "gap_vs_depth": "one panel per architecture family, one line per dataset; x = depth of the variant, y = "
                        "logit-ensemble minus uniform-soup accuracy in points at the largest N. A rising line means "
                        "the deeper net's soup falls further behind its ensemble; the CIs are in gap_vs_n.csv.",
        "fig7a_gap": "one line per architecture; y = logit-ensemble accuracy minus uniform-soup accuracy in points, "
                     "x = number of models averaged. Above the dashed zero line the ensemble wins; a line that rises "
                     "with N means the soup falls further behind as more models are averaged.",
    })


def build(out: Path, cfg: Config, *, show_progress: bool = True) -> Result:
    specs = zoo_specs(cfg)
    zoos = train_zoos(specs, workers=cfg.workers, show_progress=show_progress, executor=cfg.executor)
    seed_rows: list[dict[str, Any]] = []
    per_seed: dict[tuple[str, str, int, str], list[torch.Tensor]] = {}
    for zoo in progress_over(zoos, "evaluate soups and ensembles", show_progress=show_progress):
        ds = zoo.config.dataset
        val, test = splits(ds, cfg.split_seed)
        train_x = train_subset(ds, cfg.n_train, cfg.split_seed).x
        ev = ZooEval(zoo, val, test, mode=cfg.eval_mode,  # type: ignore[arg-type]
                     bn_reset_x=train_x if cfg.bn_reset_batches > 0 else None,
                     bn_reset_seed=zoo.config.seed, bn_reset_batches=max(1, cfg.bn_reset_batches))
        per_zoo: dict[tuple[int, str], torch.Tensor] = {}
        label = zoo_label(zoo.config.arch, zoo.config.init)
        zoo_rows = evaluate_zoo(ev, cfg.ns, strict=cfg.greedy_strict, correct=per_zoo)
        for (n, m), v in per_zoo.items():
            per_seed.setdefault((ds, label, n, m), []).append(v)
        for r in zoo_rows:
            seed_rows.append({"dataset": ds, "zoo": label, "arch": zoo.config.arch, "init": zoo.config.init, **r,
                              "eval_mode": cfg.eval_mode, "seed": zoo.config.seed,
                              "member_seeds": " ".join(map(str, zoo.member_seeds[:r["N"]]))})
    # (seeds, examples) per configuration: the bootstrap resamples zoo seeds and test examples
    correct = {k: torch.stack(v) for k, v in per_seed.items()}
    rows = mean_over_seeds(seed_rows)
    n_main = max(n for n in cfg.ns if any(r["N"] == n for r in rows))
    table = main_table(rows, n_main)
    per_n = [main_table(rows, n) for n in cfg.ns if n != n_main and any(r["N"] == n for r in rows)]
    versus = perf_ave_table(rows, n_main, correct)
    gaps = gap_table(rows, correct)
    claims, verdicts, summary = _claims(rows, cfg, correct)
    claims_tab = claims_table(claims)
    figs = _figures(rows, cfg, out, verdicts)
    section = Section(
        "Weights vs features: soups and ensembles (Table 1, Fig. 3, Fig. 7a)",
        text=[
            f"Zoos of {max(cfg.ns)} models per architecture and dataset; "
            + ("shared init: one pre-trained start, then members fine-tuned with their own seeds for the "
               "head, data order and augmentation" + (f"; {', '.join(cfg.independent_archs)} also from "
                                                      "independent random inits" if cfg.independent_archs
                                                      else ""))
            + f"; {cfg.n_seeds} zoo seed(s), tables show the mean over seeds"
            + f". Evaluation in {cfg.eval_mode} mode; greedy selection on the val split "
              f"({'strict' if cfg.greedy_strict else 'non-strict'} improvement); accuracies on the test split.",
            "The uniform soup averages the weights of members 0..N−1 (mergelab.merge_state_dicts, 'linear'); "
            "the logit ensemble averages their logits; the feature ensemble averages their penultimate "
            "features and applies the weight-averaged heads (or the first model's head). Greedy ensembles come "
            "two ways: greedy on their own val score, and the ensemble of the greedy soup's picks (the paper's "
            "protocol)."
            + (f" BN nets' soups are also evaluated after re-estimating BN statistics on {cfg.bn_reset_batches} "
               "training batches (\"+ BN reset\")." if cfg.bn_reset_batches > 0 else ""),
            "Fig. 3 (bars): if averaging weights were as good as averaging outputs, the blue soup bars would "
            "match the red/orange ensemble bars. Fig. 7a (gap vs N): points above 0 mean the ensemble beats "
            "the soup at that N.",
        ],
        verdicts=verdicts, tables=[claims_tab, table, versus], figures=figs)
    report = Report("Weights vs features", meta={"seed": cfg.seed, "zoo seeds": ", ".join(map(str, cfg.zoo_seeds())),
                                                 "eval_mode": cfg.eval_mode,
                                                 "datasets": ", ".join(cfg.datasets)}).add(section)
    tables: dict[str, Any] = {"weights_vs_features.csv": rows, "weights_vs_features_per_seed.csv": seed_rows,
                              "table1.md": [table, *per_n], "soup_vs_perf_ave": versus, "gap_vs_n": gaps,
                              "claims": claims_tab}
    return Result(report, tables, zoos, {"verdicts": summary}, rows=rows, main_table=table)


run = study_runner("weights-vs-features", build, Config(), QUICK)


__all__ = ["METHODS", "QUICK", "Config", "Result", "build", "evaluate_zoo", "run"]
