"""Merging models trained on different datasets from one start (Tab. 3 of the Rethinking paper)."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mergelab.studies import run_study
from mergelab.studies.cross_dataset import METHODS, evaluate_pair
from mergelab.zoo.data import load_dataset
from mergelab.zoo.models import build_model
from mergelab.zoo.train import train_zoo

TINY = {"n_train": 100, "epochs": 0, "pretrain_epochs": 1, "width": 4, "batch_size": 50}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path_factory.getbasetemp() / "cross-dataset-cache"))


def _zoo(seed: int) -> SimpleNamespace:
    torch.manual_seed(seed)
    return SimpleNamespace(models=[build_model("vgg6bn", (1, 28, 28), 10, width=4).eval()])


def test_a_model_merged_with_itself_scores_like_itself_under_every_method() -> None:
    data = load_dataset("mnist5k", "test", 0).subset(200)
    one = _zoo(0)
    scores = evaluate_pair(one, one, {"mnist5k": data})
    assert set(scores) == {("mnist5k", m) for m in METHODS}
    for m in METHODS:
        assert torch.equal(scores[("mnist5k", m)], scores[("mnist5k", "model_1")]), m


def test_two_different_models_give_a_soup_that_is_neither() -> None:
    data = load_dataset("mnist5k", "test", 0).subset(300)
    scores = evaluate_pair(_zoo(0), _zoo(1), {"mnist5k": data})
    soup = scores[("mnist5k", "uniform_soup")]
    assert not torch.equal(soup, scores[("mnist5k", "model_1")])
    assert not torch.equal(soup, scores[("mnist5k", "model_2")])


def test_a_start_pretrained_on_another_dataset_is_shared_by_both_zoos() -> None:
    on_a = train_zoo("vgg6", "mnist5k", 1, "shared", workers=1, show_progress=False, **TINY)
    on_b = train_zoo("vgg6", "animal-mnist", 1, "shared", workers=1, show_progress=False, base_dataset="mnist5k",
                     **TINY)
    assert on_b.trained == 1  # only the member: the base came from A's zoo
    # zero fine-tuning epochs and the base's head kept (vgg6): both members are A's start, bit for bit
    for x, y in zip(on_a.models[0].state_dict().values(), on_b.models[0].state_dict().values(), strict=True):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="same"):
        train_zoo("linear", "digits", 1, "shared", workers=1, show_progress=False, base_dataset="mnist5k", **TINY)


def test_cross_dataset_study_scores_every_method_on_both_test_sets(tmp_path: Path) -> None:
    report = run_study("cross-dataset", tmp_path / "out", archs=("vgg6bn",), n_seeds=2, n_train=100, width=4,
                       epochs=1, pretrain_epochs=1, workers=1, show_progress=False)
    with (tmp_path / "out" / "cross_dataset_per_seed.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["test_set"], r["method"]) for r in rows} == {(t, m) for t in ("mnist5k", "animal-mnist")
                                                            for m in METHODS}
    assert {r["seed"] for r in rows} == {"0", "1"}
    claims = (tmp_path / "out" / "claims.md").read_text()
    assert "49.6" in claims and claims.count("| mnist5k:animal-mnist") == 5
    assert "how to read" in report.read_text().lower()
    with pytest.raises(ValueError, match="A:B"):
        run_study("cross-dataset", tmp_path / "bad", pairs=("mnist5k",), show_progress=False)
