"""The rebasin study end to end on a tiny grid, and the multi-task search demo on a tiny suite."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from mergelab.studies.rebasin import RebasinConfig
from mergelab.studies.rebasin import run as run_rebasin

TINY = RebasinConfig(archs=("mlp1", "resnet8"), datasets=("digits",), seeds=(0,), n_models=3, soup_sizes=(2, 3),
                     width=8, epochs=2, pretrain_epochs=1, n_train=400, points=5, bn_batches=2, n_test=200)


def test_rebasin_study_writes_tables_figures_and_report(tmp_path: Path) -> None:
    out = tmp_path / "study"
    report = run_rebasin(out, quick=True, seed=0, executor="local:0", config=TINY, cache=tmp_path / "cache",
                         show_progress=False)
    assert report == out / "report.html" and report.stat().st_size > 20_000
    path = list(csv.DictReader((out / "path.csv").open()))
    # mlp1: naive + aligned; resnet8 (BatchNorm): naive, naive + BN reset, aligned, aligned + BN reset
    assert len(path) == (2 + 4) * TINY.points
    assert {float(r["alpha"]) for r in path} == {0.0, 0.25, 0.5, 0.75, 1.0}
    barriers = list(csv.DictReader((out / "barriers_long.csv").open()))
    assert len(barriers) == 6 and all(float(r["loss_barrier"]) >= 0 for r in barriers)
    # the path's endpoints are the two models whatever the variant: alignment never changes B's function
    by_variant = {r["variant"]: r for r in barriers if r["arch"] == "resnet8"}
    assert by_variant["naive"]["acc_B"] == by_variant["aligned"]["acc_B"]
    soups = list(csv.DictReader((out / "soups.csv").open()))
    assert [int(r["N"]) for r in soups] == [2, 3, 2, 3]
    for name in ("path_loss.png", "path_accuracy.png", "soups.png", "barriers.md", "soups.md", "report.md"):
        assert (out / name).is_file(), name
    record = json.loads((out / "mergelab.json").read_text())
    assert record["study"] == "rebasin" and record["seed"] == 0 and len(record["zoos"]) == 2
    assert record["zoos"][0]["member_seeds"] == [1, 2, 3]


def test_multitask_search_demo_runs_on_a_tiny_suite(tmp_path: Path) -> None:
    pytest.importorskip("cma")
    from mergelab.studies.multitask_search import SuiteConfig
    from mergelab.studies.multitask_search import run as run_demo

    cfg = SuiteConfig(hidden=16, depth=2, pretrain_epochs=1, finetune_epochs=1, n_train=200,
                      lambdas=(0.5, 1.0), population=4, generations=2)
    report = run_demo(tmp_path / "demo", quick=True, seed=0, executor="local:0", config=cfg, show_progress=False)
    assert report.is_file()
    rows = list(csv.DictReader((tmp_path / "demo" / "results.csv").open()))
    methods = [r["method"] for r in rows]
    assert methods[0].startswith("pre-trained") and methods[-1].endswith("CMA-ES per-layer weights")
    record = json.loads((tmp_path / "demo" / "search" / "search.json").read_text())
    # the search starts from the best hand-tuned config, so on validation it can only match or beat it
    assert record["best"]["score"] >= record["initial"]["score"]
    assert record["reproduced_bitwise"] is True
    assert len(record["dimensions"]) == 3 * 2  # 3 task vectors × 2 hidden layers (heads are per task)
    # the verdict: a paired bootstrap over the test examples, centred on the table's test gain
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "paired bootstrap CI over" in md
    point = float(re.search(r"difference ([+-]\d+\.\d)", md).group(1))  # type: ignore[union-attr]
    assert point == pytest.approx(float(rows[-1]["test score"]) - float(rows[-2]["test score"]), abs=0.051)
