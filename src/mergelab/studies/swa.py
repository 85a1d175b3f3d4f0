"""Stochastic weight averaging vs the last checkpoint, conventional training and soups of independent runs.

For each architecture and zoo seed, one SWA run continues from the zoo's shared start for as many epochs as
the zoo's members fine-tune, with a constant or a cyclic learning rate, averaging a snapshot every few steps,
then recomputing BatchNorm statistics (:mod:`mergelab.zoo.swa`, ``torch.optim.swa_utils``). Compared on the
test set, with per-example scores for the paired bootstrap over seeds and examples:

- the SWA average, and the last checkpoint of the same run;
- conventional training: the zoo member fine-tuned from the same start for the same epochs (cosine lr);
- a uniform soup of independently trained runs (no shared start), as trained and after a BN reset;
- a uniform soup of shared-start fine-tunes (the model-soups setting) for reference.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mergelab.align import has_batchnorm, reset_bn_stats
from mergelab.report import FigureRef, Table
from mergelab.report.plots import grouped_bars
from mergelab.runtime import progress_over
from mergelab.soups import uniform_soup
from mergelab.studies.claims import ClaimRow, claims_study_result
from mergelab.studies.common import StudyResult, ZooRecipe, study_runner, zoo_spec
from mergelab.studies.verdict import claim_verdict, paired_difference
from mergelab.zoo.data import load_dataset, train_subset
from mergelab.zoo.models import ZooModel
from mergelab.zoo.primitives import predict_logits
from mergelab.zoo.swa import SWAConfig, train_swa
from mergelab.zoo.train import shared_start, train_zoos

METHODS = {"swa_constant": "SWA (constant lr)", "last_constant": "last checkpoint (constant lr)",
           "swa_cyclic": "SWA (cyclic lr)", "last_cyclic": "last checkpoint (cyclic lr)",
           "conventional": "conventional (cosine lr)", "independent_soup": "soup of independent runs",
           "independent_soup_bn_reset": "soup of independent runs + BN reset",
           "shared_soup": "soup of shared-start fine-tunes"}


@dataclass(frozen=True)
class Config(ZooRecipe):
    datasets: tuple[str, ...] = ("mnist5k",)
    archs: tuple[str, ...] = ("vgg6bn", "resnet8")
    n_soup: int = 3  # members in the soups of independent and of shared-start runs
    snapshot_every: int = 16  # steps between SWA snapshots (the cyclic schedule's cycle); 63 steps per epoch
    lr_constant: float = 0.5  # × the recipe's lr (0.1 for SGD nets)
    lr_cycle: tuple[float, float] = (1.0, 0.05)  # × the recipe's lr, start and end of every cycle
    bn_reset_batches: int = 10

    def __post_init__(self) -> None:  # bad settings fail in apply_options, before anything is written
        if self.n_soup < 2:
            raise ValueError(f"a soup needs n_soup ≥ 2 runs, got {self.n_soup}")


QUICK = Config(archs=("vgg6bn",), n_seeds=2, n_soup=2, epochs=1, pretrain_epochs=2, n_train=1000)


def _model(skeleton: ZooModel, state: dict[str, torch.Tensor]) -> ZooModel:
    net = copy.deepcopy(skeleton)
    net.load_state_dict(state)
    return net.eval()


def build(out: Path, cfg: Config, *, show_progress: bool = True) -> StudyResult:
    seeds = cfg.zoo_seeds()
    grid = [(d, a, s) for d in cfg.datasets for a in cfg.archs for s in seeds]
    specs = [zoo_spec(replace(cfg, seed=s), a, d, init, cfg.n_soup) for d, a, s in grid
             for init in ("shared", "independent")]
    zoos = train_zoos(specs, workers=cfg.workers, show_progress=show_progress, executor=cfg.executor)
    schedules = {"constant": SWAConfig("constant", cfg.epochs, cfg.lr_constant, cfg.lr_constant, cfg.snapshot_every),
                 "cyclic": SWAConfig("cyclic", cfg.epochs, *cfg.lr_cycle, cfg.snapshot_every)}
    per: dict[tuple[str, str, str], list[torch.Tensor]] = {}
    rows: list[dict[str, Any]] = []
    for k, (d, arch, s) in progress_over(list(enumerate(grid)), "SWA runs and soups", show_progress=show_progress):
        shared, indep = zoos[2 * k], zoos[2 * k + 1]
        test = load_dataset(d, "test", cfg.split_seed)
        train_x = train_subset(d, cfg.n_train, cfg.split_seed).x
        skeleton = shared.models[0]
        start = _model(skeleton, shared_start(shared.config))
        models: dict[str, ZooModel] = {"conventional": shared.models[0]}
        snapshots = {}
        for name, swa in schedules.items():
            res = train_swa(start, shared.config, swa, seed=shared.member_seeds[0])
            models[f"swa_{name}"] = _model(skeleton, res.averaged)
            models[f"last_{name}"] = _model(skeleton, res.last)
            snapshots[name] = res.snapshots
        models["independent_soup"] = _model(skeleton, uniform_soup(indep.state_dicts()))
        if has_batchnorm(skeleton):
            reset = copy.deepcopy(models["independent_soup"])
            reset_bn_stats(reset, train_x, num_batches=cfg.bn_reset_batches, seed=s)
            models["independent_soup_bn_reset"] = reset
        models["shared_soup"] = _model(skeleton, uniform_soup(shared.state_dicts()))
        for method, net in models.items():
            hits = (predict_logits(net, test.x).argmax(1) == test.y).double()
            per.setdefault((d, arch, method), []).append(hits)
            rows.append({"dataset": d, "arch": arch, "seed": s, "method": method,
                         "test_acc": 100.0 * float(hits.mean()),
                         "snapshots": snapshots.get(method.split("_", 1)[-1], "")
                         if method.startswith("swa") else ""})
    scores = {k: torch.stack(v) for k, v in per.items()}
    return _report(out, cfg, zoos, rows, scores)


def _claims(cfg: Config, scores: dict[tuple[str, str, str], torch.Tensor], rows: Sequence[dict[str, Any]]
            ) -> list[ClaimRow]:
    cells = sorted({(d, a) for d, a, _ in scores})

    def diffs(a: str, b: str) -> list[Any]:
        return [paired_difference(scores[(*c, a)], scores[(*c, b)], seed=i) for i, c in enumerate(cells)
                if (*c, a) in scores and (*c, b) in scores]

    setting = (f"{', '.join(cfg.archs)} on {', '.join(cfg.datasets)}; SWA from the shared start for {cfg.epochs} "
               f"epochs, a snapshot every {cfg.snapshot_every} steps, BN statistics recomputed; constant lr × "
               f"{cfg.lr_constant}, cyclic lr × {cfg.lr_cycle[0]} → {cfg.lr_cycle[1]}; soups of {cfg.n_soup} runs; "
               f"{cfg.n_seeds} seeds")
    mean = {(r["arch"], r["method"]): 0.0 for r in rows}
    for key in mean:
        vals = [r["test_acc"] for r in rows if (r["arch"], r["method"]) == key]
        mean[key] = sum(vals) / len(vals)
    regime = "; ".join(f"{a}: last checkpoint {mean[(a, 'last_constant')]:.1f} % (constant), conventional "
                       f"{mean[(a, 'conventional')]:.1f} %" for a in cfg.archs if (a, "conventional") in mean)
    swa_paper = ("Izmailov et al. 2018 (SWA): averaging the iterates of one run with a constant or cyclic lr, "
                 "then recomputing BN, beats conventional SGD at the same budget (about +1 to +2 points on CIFAR-100)")
    spec = [("swa_constant", "last_constant", "SWA (constant lr) > the last checkpoint of the same run", swa_paper),
            ("swa_cyclic", "last_cyclic", "SWA (cyclic lr) > the last checkpoint of the same run", swa_paper),
            ("swa_constant", "conventional", "SWA (constant lr) > conventional training from the same start, same "
                                             "epochs", swa_paper),
            ("swa_constant", "independent_soup", "SWA > a uniform soup of independent runs",
             "the lecture's contrast: iterates of one run share a basin, independent runs do not"),
            ("swa_constant", "independent_soup_bn_reset", "SWA > a uniform soup of independent runs even after its "
                                                          "BN reset", "as above, with the soup's BN statistics "
                                                                      "recomputed (BN nets)")]
    out = []
    for a, b, claim, paper in spec:
        d = diffs(a, b)
        out.append(ClaimRow(claim_verdict(claim, d, what="(dataset, architecture) cells", paper=paper), paper, d,
                            setting, regime))
    return out


def _report(out: Path, cfg: Config, zoos: Sequence[Any], rows: list[dict[str, Any]],
            scores: dict[tuple[str, str, str], torch.Tensor]) -> StudyResult:
    claims = _claims(cfg, scores, rows)
    cells = sorted({(d, a) for d, a, _ in scores})
    mean_rows = [{"dataset": d, "arch": a, **{m: 100.0 * float(scores[(d, a, m)].mean()) for m in METHODS
                                              if (d, a, m) in scores}} for d, a in cells]
    table = Table("Test accuracy (%), mean over seeds", mean_rows, headers=METHODS,
                  columns=["dataset", "arch", *METHODS])
    panels = {d: ([a for d2, a in cells if d2 == d],
                  {m: [100.0 * float(scores[(d, a, m)].mean()) if (d, a, m) in scores else float("nan")
                       for d2, a in cells if d2 == d] for m in METHODS}) for d in dict.fromkeys(d for d, _ in cells)}
    path = grouped_bars(panels, out / "swa.png", ylabel="test accuracy (%)", labels=METHODS, ylim=(0, 100),
                        title="SWA vs its last checkpoint, conventional training and soups")
    fig = FigureRef(path, "Test accuracy of the SWA averages, the last checkpoints of the same runs, conventional "
                          "training and uniform soups (mean over seeds).",
                    "one group of bars per architecture, one bar per model (legend below), height = test accuracy "
                    "from 0 to 100 %. SWA should stand at least as tall as its own last checkpoint; the soup of "
                    "independent runs collapses when the runs share no basin.")
    return claims_study_result(
        "Stochastic weight averaging", {"seed": cfg.seed, "zoo seeds": cfg.n_seeds},
        "Stochastic weight averaging (SWA)",
        "One run per seed continues from the shared start with a constant or a cyclic lr, averaging a snapshot "
        "every few steps (torch.optim.swa_utils.AveragedModel), then recomputing BN statistics (update_bn). "
        "Verdicts bootstrap over seeds and test examples.",
        claims, table, [fig], {"swa_per_seed.csv": rows, "swa": table}, zoos)


run = study_runner("swa", build, Config(), QUICK)


__all__ = ["METHODS", "QUICK", "Config", "build", "run"]
