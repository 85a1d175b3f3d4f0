"""Git Re-Basin study: do independently trained models become linearly connected after weight matching?

For every architecture × dataset × seed (one job each, run through an executor): train ``n_models`` members
from independent random initialisations, then

1. measure test loss and accuracy along the linear path A → B at ``points`` values of α, for the naive
   interpolation, after aligning B to A by weight matching, and (BatchNorm nets) after aligning and
   re-estimating BatchNorm statistics at every point; the naive path with a BN reset too, to show that
   the reset alone does not fix an unaligned interpolation;
2. average the first N members (uniform soup) with and without aligning members 2..N to the first, for
   every N in ``soup_sizes``, next to the members' mean accuracy and their logit ensemble.

Writes ``path.csv``, ``barriers.csv/.md``, ``soups.csv/.md``, PNG figures, ``report.html`` and
``mergelab.json`` (options, seeds, zoo recipes).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergelab.align import align, has_batchnorm, linear_path, reset_bn_stats
from mergelab.ensemble import ensemble_logits
from mergelab.evaluation import accuracy_pct, correct, predict_logits
from mergelab.executor import get_executor
from mergelab.report import FigureRef, Report, Section, Table, Verdict
from mergelab.report.plots import line_panels
from mergelab.soups import uniform_soup
from mergelab.studies.common import StudyResult, explain, study_runner
from mergelab.studies.verdict import Difference, claim_verdict, paired_difference
from mergelab.zoo.cache import cache_dir
from mergelab.zoo.data import load_dataset, train_subset
from mergelab.zoo.permutation_specs import spec_for
from mergelab.zoo.train import train_zoo

VARIANTS = ("naive", "naive+bn_reset", "aligned", "aligned+bn_reset")
LABELS = {"naive": "naive", "naive+bn_reset": "naive + BN reset", "aligned": "aligned (weight matching)",
          "aligned+bn_reset": "aligned + BN reset"}


@dataclass(frozen=True)
class RebasinConfig:
    archs: tuple[str, ...] = ("mlp2", "vgg6", "vgg6bn", "resnet8")
    datasets: tuple[str, ...] = ("digits", "mnist5k")
    seeds: tuple[int, ...] = (0, 1)
    n_models: int = 5
    soup_sizes: tuple[int, ...] = (2, 3, 5)
    # barriers after alignment shrink with width (Ainsworth et al. 2023, fig. 4): the full run uses twice the
    # quick run's width
    width: int = 32
    epochs: int = 15  # after pretrain_epochs: independent members train pretrain_epochs + epochs in all
    pretrain_epochs: int = 5
    n_train: int | None = None
    points: int = 25
    bn_batches: int = 10  # batches of 128 training examples for each BatchNorm reset
    n_test: int | None = None  # class-stratified test subset for the path (None: the whole test split)
    split_seed: int = 0
    seed: int = 0  # offsets every zoo seed
    executor: str = "local"  # local, local:N, ray, ray:ADDRESS: one job per (arch, dataset, seed) cell
    cache: Path | None = None  # the zoo cache (default: $MERGELAB_CACHE or the user cache folder)


# 8×8 digits: well-trained CNNs (97-99 % test accuracy) in seconds each, so the quick run shows the effects
# rather than the noise of under-trained models (measured: about a minute on 2 cores)
QUICK = RebasinConfig(datasets=("digits",), seeds=(0,), n_models=3, soup_sizes=(2, 3), width=16, bn_batches=5)


@dataclass(frozen=True)
class CellJob:
    """One grid cell: everything a worker needs (picklable, no open files)."""

    arch: str
    dataset: str
    seed: int
    config: RebasinConfig
    cache: str


@dataclass
class CellResult:
    path: list[dict[str, Any]] = field(default_factory=list)
    barriers: list[dict[str, Any]] = field(default_factory=list)
    soups: list[dict[str, Any]] = field(default_factory=list)
    zoo: dict[str, Any] = field(default_factory=dict)
    #: (N, soup variant) → each test example's 0/1 score, for the verdicts' paired bootstrap
    soup_correct: dict[tuple[int, str], list[int]] = field(default_factory=dict)


def _soup_row(model: torch.nn.Module, sds: Sequence[dict[str, torch.Tensor]], x: torch.Tensor, y: torch.Tensor,
              bn_x: torch.Tensor | None, bn_batches: int, seed: int) -> tuple[float, list[int]]:
    """Test accuracy (%) of the uniform soup of ``sds`` and each test example's 0/1 score."""
    net = copy.deepcopy(model)
    net.load_state_dict(uniform_soup(sds))
    if bn_x is not None:
        reset_bn_stats(net, bn_x, num_batches=bn_batches, seed=seed)
    logits = predict_logits(net, x, 1000)
    return accuracy_pct(logits, y), correct(logits, y).int().tolist()


def run_cell(job: CellJob) -> CellResult:
    """Train (or load) one zoo, then measure paths and soups. Deterministic given the job."""
    cfg = job.config
    zoo = train_zoo(job.arch, job.dataset, cfg.n_models, "independent", cache=Path(job.cache), workers=1,
                    show_progress=False, epochs=cfg.epochs, pretrain_epochs=cfg.pretrain_epochs, width=cfg.width,
                    n_train=cfg.n_train, split_seed=cfg.split_seed, seed=job.seed)
    test = load_dataset(job.dataset, "test", cfg.split_seed).subset(cfg.n_test, seed=cfg.split_seed)
    train = train_subset(job.dataset, cfg.n_train, cfg.split_seed)
    models = zoo.models
    sds = zoo.state_dicts()
    spec = spec_for(models[0])
    bn = has_batchnorm(models[0])
    key = {"arch": job.arch, "dataset": job.dataset, "seed": job.seed}
    out = CellResult(zoo={**key, "member_seeds": zoo.member_seeds, "cache_keys": zoo.cache_keys,
                          "recipe": dataclasses.asdict(zoo.config)})

    start = time.perf_counter()
    b_aligned, match = align(spec, sds[0], sds[1], seed=job.seed)
    match_seconds = time.perf_counter() - start
    variants = {"naive": (sds[1], False), "aligned": (b_aligned, False)}
    if bn:
        variants = {"naive": (sds[1], False), "naive+bn_reset": (sds[1], True),
                    "aligned": (b_aligned, False), "aligned+bn_reset": (b_aligned, True)}
    for name, (b, reset) in variants.items():
        res = linear_path(models[0], sds[0], b, test.x, test.y, points=cfg.points,
                          bn_reset_x=train.x if reset else None, bn_batches=cfg.bn_batches, seed=job.seed)
        for a, loss, acc in zip(res.alphas, res.losses, res.accuracies_pct, strict=True):
            out.path.append({**key, "variant": name, "alpha": a, "test_loss": loss, "test_acc": acc})
        mid = len(res.alphas) // 2
        out.barriers.append({**key, "variant": name, "loss_barrier": res.loss_barrier,
                             "acc_barrier": res.accuracy_barrier, "acc_A": res.accuracies_pct[0],
                             "acc_B": res.accuracies_pct[-1], "acc_mid": res.accuracies_pct[mid],
                             "match_sweeps": match.sweeps, "match_seconds": match_seconds})

    # soups: members 2..N aligned to the first one (each matched to member 0 on its own)
    aligned = [sds[0]] + [align(spec, sds[0], sd, seed=job.seed + i)[0] for i, sd in enumerate(sds[1:], start=1)]
    member_logits = [predict_logits(m, test.x, 1000) for m in models]
    for n in cfg.soup_sizes:
        if n > len(sds):
            continue
        accs = [accuracy_pct(lg, test.y) for lg in member_logits[:n]]
        ens = ensemble_logits(member_logits[:n])
        row = {**key, "N": n, "members_mean": sum(accs) / n, "ensemble": accuracy_pct(ens, test.y)}
        soups = {"naive": (sds[:n], None), "aligned": (aligned[:n], None)}
        if bn:
            soups.update({"naive+bn_reset": (sds[:n], train.x), "aligned+bn_reset": (aligned[:n], train.x)})
        for variant, (members, bn_x) in soups.items():
            row[variant], out.soup_correct[(n, variant)] = _soup_row(models[0], members, test.x, test.y, bn_x,
                                                                    cfg.bn_batches, job.seed)
        out.soups.append(row)
    return out


def run_grid(config: RebasinConfig, *, seed_offset: int = 0, executor: str = "local", cache: Path | None = None,
             show_progress: bool = True) -> list[CellResult]:
    """Every (arch, dataset, seed) cell through the executor; results in grid order."""
    root = str(cache or cache_dir())
    jobs = [CellJob(a, d, s + seed_offset, config, root)
            for a in config.archs for d in config.datasets for s in config.seeds]
    with get_executor(executor, show_progress=show_progress) as ex:
        return ex.map(run_cell, jobs, desc="rebasin cells")


def _fmt_variant_table(rows: list[dict[str, Any]], value: str) -> list[dict[str, Any]]:
    """One row per (arch, dataset, seed), one column per variant ('—' where it does not apply)."""
    table: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in rows:
        k = (r["arch"], r["dataset"], r["seed"])
        row = table.setdefault(k, {"arch": k[0], "dataset": k[1], "seed": k[2], "acc A / B": (
            f"{r['acc_A']:.1f} / {r['acc_B']:.1f}")})
        row[LABELS[r["variant"]]] = r[value]
    for row in table.values():
        for v in VARIANTS:
            row.setdefault(LABELS[v], "—")
    return list(table.values())


def build_report(out: Path, config: RebasinConfig, results: Sequence[CellResult], seed: int, executor: str
                 ) -> StudyResult:
    """Tables, figures (drawn into ``out``) and verdicts of a finished grid."""
    path_rows = [r for c in results for r in c.path]
    barrier_rows = [r for c in results for r in c.barriers]
    soup_rows = [r for c in results for r in c.soups]
    variant_cols = ["arch", "dataset", "seed", "acc A / B", *[LABELS[v] for v in VARIANTS]]
    loss_table = Table("Loss barrier on the A→B path (test cross-entropy, nats; lower is better)",
                       _fmt_variant_table(barrier_rows, "loss_barrier"), columns=variant_cols, floatfmt="{:.3f}",
                       note="Barrier = max over α of L(θ(α)) minus the straight line between the endpoint losses. "
                            "'—': no BatchNorm, so the BN reset does not apply.")
    acc_table = Table("Accuracy barrier on the A→B path (test accuracy, percentage points; lower is better)",
                      _fmt_variant_table(barrier_rows, "acc_barrier"), columns=variant_cols, floatfmt="{:.1f}")
    soup_cols = ["arch", "dataset", "seed", "N", "members_mean", "ensemble", "naive", "aligned", "naive+bn_reset",
                 "aligned+bn_reset"]
    soup_table = Table("Uniform soups of N independently trained models (test accuracy, %)",
                       [{c: r.get(c, "—") for c in soup_cols} for r in soup_rows], columns=soup_cols,
                       floatfmt="{:.1f}", headers={"members_mean": "members (mean)", "ensemble": "logit ensemble",
                                                   "naive": "soup", "aligned": "aligned soup",
                                                   "naive+bn_reset": "soup + BN reset",
                                                   "aligned+bn_reset": "aligned soup + BN reset"},
                       note="Members 2..N are each aligned to member 1 by weight matching before averaging.")

    figures = _figures(out, path_rows, soup_rows)
    verdicts = _verdicts(barrier_rows, results)
    report = Report("Git Re-Basin: permutation alignment, loss barriers and aligned soups",
                    intro="Independently trained models are interpolated linearly before and after weight "
                          "matching (Ainsworth et al. 2023), with BatchNorm statistics re-estimated where the "
                          "network has them (REPAIR-style reset, Jordan et al. 2023).",
                    meta={"seed": seed, "executor": executor})
    report.add(
        Section("Barriers along the linear path", verdicts=verdicts[:2], tables=[loss_table, acc_table],
                figures=figures[:2]),
        Section("Soups of N models", verdicts=verdicts[2:], tables=[soup_table], figures=figures[2:]),
    )
    tables = {"path.csv": path_rows, "barriers.csv": loss_table, "barriers.md": [loss_table, acc_table],
              "barriers_long.csv": barrier_rows, "soups": soup_table}
    return StudyResult(report, tables, extra={"executor": executor, "zoos": [c.zoo for c in results],
                                              "verdicts": {v.claim: v.word for v in verdicts}})


def _seed_difference(pairs: Sequence[tuple[float, float]]) -> Difference:
    """First minus second over seeds, with ±2 standard errors; one seed leaves it unresolved (no spread)."""
    d = np.array([a - b for a, b in pairs], dtype=np.float64)
    half = 2 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("inf")
    return Difference(float(d.mean()), float(d.mean() - half), float(d.mean() + half), 0, len(d))


def _verdicts(barrier_rows: Sequence[dict[str, Any]], results: Sequence[CellResult]) -> list[Verdict]:
    """Alignment and the BatchNorm reset credited separately: each compared with the same other treatment."""
    barrier = {(r["arch"], r["dataset"], r["seed"], r["variant"]): r["loss_barrier"] for r in barrier_rows}
    cells = sorted({(a, d) for a, d, _, _ in barrier})

    def barrier_diffs(better: str, worse: str) -> list[Difference]:
        out = []
        for a, d in cells:
            pairs = [(barrier[(a, d, s, worse)], barrier[(a, d, s, better)]) for (a2, d2, s, v) in barrier
                     if (a2, d2, v) == (a, d, better) and (a, d, s, worse) in barrier]
            if pairs:
                out.append(_seed_difference(pairs))  # > 0: ``better`` has the lower barrier
        return out

    def soup_diffs(better: str, worse: str) -> list[Difference]:
        return [paired_difference(c.soup_correct[(n, better)], c.soup_correct[(n, worse)], seed=n)
                for c in results for (n, v) in c.soup_correct if v == better and (n, worse) in c.soup_correct]

    barrier_paper = "Ainsworth et al. 2023 (Git Re-Basin): after weight matching, wide enough models show (near) zero "
    return [
        claim_verdict("Weight matching lowers the loss barrier (aligned vs naive, same BatchNorm treatment)",
                      barrier_diffs("aligned", "naive") + barrier_diffs("aligned+bn_reset", "naive+bn_reset"),
                      what="(architecture, dataset, BN treatment) cells, over seeds", unit="nats of barrier",
                      paper=barrier_paper + "loss barrier, e.g. MLPs on MNIST"),
        claim_verdict("Resetting BatchNorm statistics lowers the barrier of the aligned path (aligned + BN reset "
                      "vs aligned)", barrier_diffs("aligned+bn_reset", "aligned"), what="BatchNorm cells, over seeds",
                      unit="nats of barrier",
                      paper="Jordan et al. 2023 (REPAIR): interpolated BatchNorm nets need their statistics "
                            "re-estimated; the reset removes most of the remaining barrier"),
        claim_verdict("Aligned soups beat naive soups (same BatchNorm treatment)",
                      soup_diffs("aligned", "naive") + soup_diffs("aligned+bn_reset", "naive+bn_reset"),
                      what="(cell, N, BN treatment)", paper=barrier_paper + "barrier, so their average works"),
        claim_verdict("Resetting BatchNorm statistics improves aligned soups (aligned + BN reset vs aligned)",
                      soup_diffs("aligned+bn_reset", "aligned"), what="BatchNorm (cell, N)",
                      paper="Jordan et al. 2023 (REPAIR)"),
    ]


def _figures(out: Path, path_rows: list[dict[str, Any]], soup_rows: list[dict[str, Any]]) -> list[FigureRef]:
    cells = list(dict.fromkeys((r["arch"], r["dataset"], r["seed"]) for r in path_rows))  # grid order
    figs = []
    for metric, ylabel, fname in (("test_loss", "test loss (cross-entropy, nats)", "path_loss.png"),
                                  ("test_acc", "test accuracy (%)", "path_accuracy.png")):
        panels = {}
        for a, d, s in cells:
            series: dict[str, list[float]] = {}
            xs: list[float] = []
            for r in path_rows:
                if (r["arch"], r["dataset"], r["seed"]) == (a, d, s):
                    series.setdefault(LABELS[r["variant"]], []).append(r[metric])
                    if r["variant"] == "naive":
                        xs.append(r["alpha"])
            panels[f"{a} / {d} / seed {s}"] = (xs, series)
        figs.append(FigureRef(line_panels(panels, out / fname, xlabel="interpolation weight α (0 = A, 1 = B)",
                                          ylabel=ylabel, title=f"Linear path A→B: {ylabel}"),
                              f"{ylabel} along θ(α) = (1−α)θ_A + αθ_B"))
    soup_panels = {}
    for a, d, s in dict.fromkeys((r["arch"], r["dataset"], r["seed"]) for r in soup_rows):
        rows = [r for r in soup_rows if (r["arch"], r["dataset"], r["seed"]) == (a, d, s)]
        series = {name: [r[col] for r in rows] for col, name in (
            ("members_mean", "members (mean)"), ("ensemble", "logit ensemble"), ("naive", "soup"),
            ("aligned", "aligned soup"), ("naive+bn_reset", "soup + BN reset"),
            ("aligned+bn_reset", "aligned soup + BN reset")) if col in rows[0]}
        soup_panels[f"{a} / {d} / seed {s}"] = ([float(r["N"]) for r in rows], series)
    if soup_panels:
        figs.append(FigureRef(line_panels(soup_panels, out / "soups.png", xlabel="N (models averaged)",
                                          ylabel="test accuracy (%)", title="Uniform soups with and without alignment"),
                              "test accuracy of uniform soups of the first N members"))
    return explain(figs, {
        "path_loss": "one panel per (architecture, dataset, seed); x = α from model A (0) to model B (1), y = test "
                     "loss along the straight line between their weights, one line per variant (legend). A bump in "
                     "the middle is the loss barrier; the lower and flatter the line, the better the two models "
                     "are connected. Compare 'aligned' with 'naive' (alignment) and '+ BN reset' with the same "
                     "line without it (the BatchNorm reset).",
        "path_accuracy": "as the loss figure, with test accuracy (%) on the y axis: a dip in the middle is the "
                         "accuracy barrier.",
        "soups": "one panel per (architecture, dataset, seed); x = models averaged N, y = test accuracy (%). "
                 "Compare the aligned soup with the naive soup under the same BatchNorm treatment, and both with "
                 "the members' mean and their logit ensemble.",
    })


def build(out: Path, cfg: RebasinConfig, *, show_progress: bool = True) -> StudyResult:
    """Run the grid through ``cfg.executor``, then draw and tabulate it into ``out``."""
    results = run_grid(cfg, seed_offset=cfg.seed, executor=cfg.executor, cache=cfg.cache, show_progress=show_progress)
    return build_report(out, cfg, results, cfg.seed, cfg.executor)


run = study_runner("rebasin", build, RebasinConfig(), QUICK)
