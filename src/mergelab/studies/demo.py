"""``mergelab demo``: the three studies, reduced to about 5 minutes on 2 CPU cores, in one HTML report.

All zoos of the three studies are trained up front in one batch (so both cores stay busy), with one recipe
shared by the studies so that each model is trained once; later runs reuse the on-disk cache and take
well under a minute.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from mergelab.report.html import Report, Section, combined
from mergelab.report.tables import Table
from mergelab.runtime import console
from mergelab.studies import magnitude, templates, weights_vs_features
from mergelab.studies.common import prepare_output, study_record, write_outputs, write_study
from mergelab.studies.paper_claims import find_runs, paper_claims_table
from mergelab.studies.weights_vs_features import METHODS
from mergelab.zoo.train import train_zoos

#: the shared training recipe of the demo: MNIST-5k, 2,000 training images, 3 + 2 epochs, half-width convs
RECIPE = {"n_train": 2000, "pretrain_epochs": 3, "epochs": 2, "width": 8}


def demo_configs(seed: int = 0) -> tuple[weights_vs_features.Config, magnitude.Config, templates.Config]:
    wvf = weights_vs_features.Config(datasets=("mnist5k",), archs=("resnet8", "vgg6", "vgg6bn", "densenet8", "vit2",
                                                                    "linear"),
                                     independent_archs=("vgg6",), ns=(2, 3, 5, 7), seed=seed, n_seeds=1, **RECIPE)
    mag = magnitude.Config(datasets=("mnist5k",), archs=("vgg6", "vgg6bn", "linear"),
                           cs=(1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110), ns=(2, 3, 5, 7), seed=seed,
                           **RECIPE)
    # Animal-MNIST installs only with --no-deps (its metadata requires tensorflow, which it never needs for
    # the data): `pip install "mergelab[studies]"` alone runs the demo on MNIST-5k and says so.
    animals = ("animal-mnist",) if importlib.util.find_spec("animal_mnist") is not None else ()
    if not animals:
        logging.getLogger(__name__).warning("Animal-MNIST is not installed (pip install --no-deps animal-mnist): "
                                            "the templates study runs on MNIST-5k only")
    tpl = templates.Config(datasets=("mnist5k", *animals), linear_epochs=4, cnn_arch="vgg6",
                           cnn_dataset="mnist5k", seed=seed, kernels_shown=16, **RECIPE)
    return wvf, mag, tpl


_SHORT = {"perf_ave": "PerfAve", "best_single": "Best", "uniform_soup": "Soup", "greedy_soup": "G.soup",
          "logit_ensemble": "Logit", "feature_ensemble": "Feat", "feature_ensemble_first_head": "Feat1",
          "greedy_logit_ensemble": "G.logit", "greedy_feature_ensemble": "G.feat",
          "soup_picks_logit_ensemble": "P.logit", "uniform_soup_bn_reset": "Soup+BN"}


def _print_table(table: Table) -> None:
    """The main table on stdout, short headers so it fits 100 columns (legend underneath)."""
    rt = RichTable(title=table.title, title_style="bold")
    cols = [m for m in METHODS if m in _SHORT and any(m in r for r in table.rows)]
    rt.add_column("architecture", no_wrap=True)
    for c in cols:
        rt.add_column(_SHORT[c], justify="right")
    for r in table.rows:
        best = max(float(r[m]) for m in cols if m in r)
        rt.add_row(str(r["architecture"]), *["" if c not in r else f"[bold]{r[c]:.1f}[/bold]" if r[c] == best
                                             else f"{r[c]:.1f}" for c in cols])
    out = Console(width=max(110, Console().width))
    out.print(rt)
    out.print("  ".join(f"{_SHORT[c]} = {METHODS[c]}" for c in cols), style="dim")


def claims_section(reports: Sequence[Report], out: Path, runs: Path | None) -> tuple[Section, Table]:
    """"The paper's claims": one row per claim of issue 14 with the demo's own verdict where it measured the
    claim, otherwise the study that does, linked to that study's run when ``runs`` (a folder the user gives)
    holds one."""
    verdicts = [v for r in reports for s in r.sections for v in s.verdicts]
    table = paper_claims_table(verdicts, find_runs(runs), base=out, runs_folder=runs, measured_by="the demo")
    text = ("Every claim of the paper that this project tests, with the paper's number. The demo measures some of "
            "them in a reduced setting (one seed, nets of depth ≤ 8, minutes of training); the rest, and all of "
            "them in the paper's regime (≥ 3 seeds, depth ≥ 19 for the magnitude claims), are measured by the "
            "study named in the row" + (f"; runs of those studies were looked up in `{runs}`." if runs else
                                         "; `mergelab demo --runs DIR` links the runs of them found in DIR."))
    return Section("The paper's claims", text=[text], tables=[table]), table


def run_demo(out: Path, *, seed: int = 0, overwrite: bool = False, show_progress: bool = True,
             runs: Path | None = None) -> Path:
    """Run the reduced studies into ``out`` (sub-folders per study) and write ``out/report.html``; ``runs``: a
    folder holding runs of the studies (``mergelab study NAME --out RUNS/NAME``), linked from the claims table."""
    started = time.perf_counter()
    out = prepare_output(out, overwrite)
    wvf, mag, tpl = demo_configs(seed)
    # every zoo of the three studies in one batch: bases first, then members, both cores busy
    specs = weights_vs_features.zoo_specs(wvf) + [templates._linear_spec(tpl, d) for d in tpl.datasets]
    train_zoos(specs, show_progress=show_progress)
    trained = time.perf_counter() - started
    parts = (("weights-vs-features", weights_vs_features, wvf), ("magnitude", magnitude, mag),
             ("templates", templates, tpl))
    results = [write_study(name, out / name.replace("-", "_"), module.build, cfg,  # type: ignore[attr-defined]
                           quick=True, show_progress=show_progress)[1] for name, module, cfg in parts]
    wall = time.perf_counter() - started
    report = combined(
        "mergelab demo — Rethinking weight-averaged model merging, at CPU scale", [r.report for r in results],
        intro="Three analyses of 'Rethinking Weight-Averaged Model-merging' on real offline data (MNIST-5k, "
              "Animal-MNIST), reduced to run in minutes on a laptop CPU: (1) averaging weights vs averaging "
              "features and outputs, (2) sensitivity of merging to weight magnitude, (3) weights as templates. "
              "Each section states whether the paper's claim held on this run; the first section lists every "
              "claim with the paper's number and the study that measures it in the paper's regime (`mergelab "
              "study NAME --out DIR`, each report with a claims table: ours with CIs over 3 seeds, the setting, "
              "the regime checks, a verdict).",
        meta={"seed": seed, "training recipe": RECIPE, "wall time (s)": round(wall, 1),
              "training time (s)": round(trained, 1)})
    section, claims = claims_section([r.report for r in results], out, runs)
    report.sections.insert(0, section)
    record = study_record("demo", {"recipe": RECIPE}, quick=True, seed=seed, started=started, extra={
        "training_seconds": round(trained, 2), "parts": {name: name.replace("-", "_") + "/mergelab.json"
                                                         for name, _, _ in parts}})
    path = write_outputs(out, report, {"claims": claims}, record)
    _print_table(results[0].main_table)
    for s in report.sections:
        for v in s.verdicts:
            colour = "dim" if v.kind == "check" else {True: "green", False: "red", None: "yellow"}[v.held]
            console.print(f"• {escape(v.claim)}: [{colour}]{v.word}[/{colour}] — {escape(v.detail)}")
    console.print(f"demo done in {wall:.0f} s")  # the caller (CLI) prints the report's path
    return path
