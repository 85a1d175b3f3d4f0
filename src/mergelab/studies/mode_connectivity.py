"""Linear mode connectivity of shared-start fine-tunes, beside independent runs and Git Re-Basin.

For each architecture and zoo seed, two models are interpolated linearly, θ(α) = (1 − α) θ_A + α θ_B, and the
test loss is measured at every α:

- ``shared``: two members of a shared-start zoo (one pre-trained start, fine-tuned with their own seeds), the
  pairs that model soups average;
- ``independent``: two members trained from their own random inits for the same total epochs;
- ``independent, aligned``: the same pair after Git Re-Basin weight matching of B to A (the rebasin study's
  treatment), so the shared start is compared with the best a permutation can do;

each with the BatchNorm statistics re-estimated at interior points as a second setting (BN nets). The barrier
is the largest rise of the loss above the straight line between the endpoints (:mod:`mergelab.align.barrier`).
Its confidence interval is a bootstrap over zoo seeds and test examples (the per-example losses along the path
are resampled, the barrier recomputed from the resampled mean curves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergelab.align import align, barrier_heights, has_batchnorm, path_example_losses
from mergelab.report import FigureRef, Table
from mergelab.report.plots import line_panels
from mergelab.runtime import progress_over
from mergelab.studies.claims import ClaimRow, claims_study_result
from mergelab.studies.common import StudyResult, ZooRecipe, study_runner, zoo_spec
from mergelab.studies.verdict import Difference, claim_verdict
from mergelab.zoo.data import load_dataset, train_subset
from mergelab.zoo.permutation_specs import spec_for
from mergelab.zoo.train import train_zoos

VARIANTS = {"shared": "shared start", "independent": "independent", "aligned": "independent, aligned (Re-Basin)"}


@dataclass(frozen=True)
class Config(ZooRecipe):
    datasets: tuple[str, ...] = ("mnist5k",)
    #: VGG and ResNet only: weight matching needs a permutation spec (zoo/permutation_specs.py)
    archs: tuple[str, ...] = ("vgg6", "vgg6bn", "resnet8")
    points: int = 11
    bn_reset_batches: int = 10
    n_boot: int = 1000

    def __post_init__(self) -> None:  # bad settings fail in apply_options, before anything is written
        if self.points < 3:
            raise ValueError(f"a path needs points ≥ 3, got {self.points}")


QUICK = Config(archs=("vgg6bn",), n_seeds=2, points=5, epochs=1, pretrain_epochs=2, n_train=1000)


@dataclass(frozen=True)
class Curves:
    """Per-example test loss and correctness along the path, stacked over seeds: ``(seeds, points, examples)``."""

    loss: np.ndarray
    correct: np.ndarray


def bootstrap_barrier(alphas: Sequence[float], curves: Sequence[np.ndarray], *, n_boot: int = 1000,
                      seed: int = 0, level: float = 0.95) -> list[np.ndarray]:
    """Bootstrap draws of the mean barrier (over seeds) of every ``(seeds, points, examples)`` array in
    ``curves``, all resampled with the same seeds and examples (paired)."""
    s, _, n = curves[0].shape
    rng = np.random.default_rng(seed)
    draws = [np.empty(n_boot) for _ in curves]
    for i in range(n_boot):
        rs, rx = rng.integers(0, s, s), rng.integers(0, n, n)
        for c, out in zip(curves, draws, strict=True):
            out[i] = barrier_heights(alphas, c[rs][:, :, rx].mean(-1)).mean()
    return draws


def _interval(point: float, draws: np.ndarray, n: int, seeds: int, level: float = 0.95) -> Difference:
    tail = (1 - level) / 2
    lo, hi = np.quantile(draws, [tail, 1 - tail])
    return Difference(point, float(lo), float(hi), n, seeds)


def barrier_difference(alphas: Sequence[float], worse: np.ndarray, better: np.ndarray, *, n_boot: int = 1000,
                       seed: int = 0) -> Difference:
    """barrier(``worse``) − barrier(``better``), paired bootstrap CI (> 0: ``better`` has the lower barrier)."""
    a, b = bootstrap_barrier(alphas, [worse, better], n_boot=n_boot, seed=seed)
    point = float(barrier_heights(alphas, worse.mean(-1)).mean() - barrier_heights(alphas, better.mean(-1)).mean())
    return _interval(point, a - b, worse.shape[2], worse.shape[0])


def build(out: Path, cfg: Config, *, show_progress: bool = True) -> StudyResult:
    seeds = cfg.zoo_seeds()
    grid = [(d, a, s) for d in cfg.datasets for a in cfg.archs for s in seeds]
    specs = [zoo_spec(replace(cfg, seed=s), a, d, init, 2) for d, a, s in grid for init in ("shared", "independent")]
    zoos = train_zoos(specs, workers=cfg.workers, show_progress=show_progress, executor=cfg.executor)
    alphas = [float(v) for v in np.linspace(0.0, 1.0, cfg.points)]
    per: dict[tuple[str, str, str, bool], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for k, (d, arch, s) in progress_over(list(enumerate(grid)), "interpolate pairs", show_progress=show_progress):
        test = load_dataset(d, "test", cfg.split_seed)
        train_x = train_subset(d, cfg.n_train, cfg.split_seed).x
        shared, indep = zoos[2 * k], zoos[2 * k + 1]
        ind = indep.state_dicts()
        pairs = {"shared": shared.state_dicts(), "independent": ind,
                 "aligned": [ind[0], align(spec_for(indep.models[0]), ind[0], ind[1], seed=s)[0]]}
        resets = (False, True) if has_batchnorm(shared.models[0]) and cfg.bn_reset_batches > 0 else (False,)
        for variant, (a, b) in pairs.items():
            for reset in resets:
                per.setdefault((d, arch, variant, reset), []).append(path_example_losses(
                    shared.models[0], a, b, test.x, test.y, alphas, bn_reset_x=train_x if reset else None,
                    bn_batches=cfg.bn_reset_batches, seed=s))
    curves = {k: Curves(torch.stack([lo for lo, _ in v]).numpy(), torch.stack([c for _, c in v]).numpy())
              for k, v in per.items()}
    return _report(out, cfg, zoos, alphas, curves)


def _label(key: tuple[str, str, str, bool]) -> str:
    return VARIANTS[key[2]] + (" + BN reset" if key[3] else "")


def _report(out: Path, cfg: Config, zoos: Sequence[Any], alphas: list[float],
            curves: dict[tuple[str, str, str, bool], Curves]) -> StudyResult:
    rows, path_rows = [], []
    for key, c in curves.items():
        d, arch, variant, reset = key
        draws = bootstrap_barrier(alphas, [c.loss], n_boot=cfg.n_boot, seed=cfg.seed)[0]
        point = float(barrier_heights(alphas, c.loss.mean(-1)).mean())
        ci = _interval(point, draws, c.loss.shape[2], c.loss.shape[0])
        acc = 100.0 * c.correct.mean(-1)  # (seeds, points)
        acc_barrier = float(barrier_heights(alphas, -acc).mean())
        rows.append({"dataset": d, "arch": arch, "pair": _label(key), "bn_reset": reset,
                     "loss_barrier": point, "ci_low": ci.low, "ci_high": ci.high, "acc_barrier": acc_barrier,
                     "acc_endpoints": f"{acc[:, 0].mean():.1f} / {acc[:, -1].mean():.1f}",
                     "acc_mid": float(acc[:, len(alphas) // 2].mean()), "seeds": c.loss.shape[0]})
        for s in range(c.loss.shape[0]):
            for j, a in enumerate(alphas):
                path_rows.append({"dataset": d, "arch": arch, "variant": variant, "bn_reset": reset,
                                  "seed": cfg.seed + s, "alpha": a, "test_loss": float(c.loss[s, j].mean()),
                                  "test_acc": float(acc[s, j])})
    claims = _claims(cfg, alphas, curves, rows)
    table = Table("Loss barrier on the linear path between two models (test cross-entropy, nats; mean over seeds)",
                  rows, floatfmt="{:.3f}",
                  columns=["dataset", "arch", "pair", "loss_barrier", "ci_low", "ci_high", "acc_barrier",
                           "acc_endpoints", "acc_mid", "seeds"],
                  headers={"pair": "pair", "loss_barrier": "loss barrier", "ci_low": "95 % CI low",
                           "ci_high": "95 % CI high", "acc_barrier": "accuracy barrier (points)",
                           "acc_endpoints": "accuracy A / B (%)", "acc_mid": "accuracy at α = ½ (%)"},
                  note="CI: bootstrap over zoo seeds and test examples. Re-Basin's own grid (more widths, soups of "
                       "aligned models) is the rebasin study; here its alignment is applied to this study's pairs.")
    figs = _figures(out, alphas, curves)
    return claims_study_result(
        "Linear mode connectivity of shared-start fine-tunes",
        {"seed": cfg.seed, "zoo seeds": cfg.n_seeds, "archs": ", ".join(cfg.archs)},
        "Linear mode connectivity: shared-start fine-tunes vs independent runs (and Re-Basin)",
        "Two members of a shared-start zoo, two independently trained members, and the independent pair after "
        "weight matching are interpolated linearly; the loss barrier is the largest rise of the test loss above "
        "the line between the endpoints. Model soups rely on shared-start fine-tunes lying in one linearly "
        "connected basin.",
        claims, table, figs, {"barriers": table, "path.csv": path_rows}, zoos)


def _claims(cfg: Config, alphas: list[float], curves: dict[tuple[str, str, str, bool], Curves],
            rows: Sequence[dict[str, Any]]) -> list[ClaimRow]:
    def diffs(worse: str, better: str) -> list[Difference]:
        return [barrier_difference(alphas, curves[(d, a, worse, r)].loss, curves[(d, a, better, r)].loss,
                                   n_boot=cfg.n_boot, seed=cfg.seed)
                for (d, a, v, r) in curves if v == better and (d, a, worse, r) in curves]

    setting = (f"{', '.join(cfg.archs)} on {', '.join(cfg.datasets)}; start {cfg.pretrain_epochs} epochs, fine-tunes "
               f"{cfg.epochs} epochs on {cfg.n_train or 'all'} images (independent: {cfg.pretrain_epochs + cfg.epochs} "
               f"epochs); {cfg.points} points on the path; {cfg.n_seeds} seeds")
    shared = [r for r in rows if r["pair"].startswith("shared")]
    regime = ("endpoints learned (accuracy A / B: " + "; ".join(f"{r['arch']} {r['acc_endpoints']}" for r in shared
                                                                 if not r["bn_reset"])
              + "); shared-start barriers: " + ", ".join(f"{r['arch']}{' +BN reset' if r['bn_reset'] else ''} "
                                                        f"{r['loss_barrier']:.3f} [{r['ci_low']:.3f}, "
                                                        f"{r['ci_high']:.3f}]" for r in shared))
    spec = [
        ("independent", "shared", "Shared-start fine-tunes have a lower loss barrier than independent runs",
         "Frankle et al. 2020, Neyshabur et al. 2020: fine-tunes of one pre-trained start are linearly connected "
         "(barrier ≈ 0), independent runs are not; model soups rest on it"),
        ("aligned", "shared", "Shared-start fine-tunes have a lower loss barrier than independent runs aligned by "
                              "Re-Basin weight matching",
         "Ainsworth et al. 2023: alignment lowers but, at small width, does not remove the barrier"),
        ("independent", "aligned", "Weight matching lowers the barrier of independent runs (this study's pairs)",
         "Ainsworth et al. 2023 (Git Re-Basin)"),
    ]
    out = []
    for worse, better, claim, paper in spec:
        d = diffs(worse, better)
        v = claim_verdict(claim, d, what="(architecture, BN treatment) cells", unit="nats of barrier", paper=paper)
        out.append(ClaimRow(v, paper, d, setting, regime, unit="nats"))
    return out


def _figures(out: Path, alphas: list[float], curves: dict[tuple[str, str, str, bool], Curves]) -> list[FigureRef]:
    panels: dict[str, tuple[list[float], dict[str, list[float]]]] = {}
    for key, c in curves.items():
        d, arch, _, _ = key
        panels.setdefault(f"{arch} ({d})", (alphas, {}))[1][_label(key)] = c.loss.mean((0, 2)).tolist()
    path = line_panels(panels, out / "lmc_paths.png", xlabel="α (0 = model A, 1 = model B)",
                       ylabel="test loss (nats)", title="Test loss along the linear path between two models")
    return [FigureRef(path, "Test loss along θ(α) = (1 − α) θ_A + α θ_B, mean over seeds, for each pair and BN "
                            "treatment.",
                      "one panel per architecture, one line per pair (shared start, independent, independent after "
                      "weight matching; '+ BN reset': BN statistics re-estimated at each α). A flat line means the "
                      "two models lie in one linearly connected basin; a hump in the middle is the barrier.")]


run = study_runner("mode-connectivity", build, Config(), QUICK)


__all__ = ["QUICK", "Config", "barrier_difference", "bootstrap_barrier", "build", "run"]
