"""ViT soups with the paper's random input layer: members re-draw it, and the study end to end."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from mergelab.studies import run_study
from mergelab.zoo.train import train_zoo

TINY = {"n_train": 100, "epochs": 0, "pretrain_epochs": 1, "width": 4, "batch_size": 50}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path_factory.getbasetemp() / "vit-cache"))


def test_members_redraw_the_random_input_layer_and_share_the_rest() -> None:
    rand = train_zoo("vit2-randin", "digits", 2, "shared", workers=1, show_progress=False, **TINY)
    a, b = (m.state_dict() for m in rand.models)
    assert not torch.equal(a["input_layer.weight"], b["input_layer.weight"])
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("input_layer"))  # ViT and head: the start
    shared = train_zoo("vit2-in", "digits", 2, "shared", workers=1, show_progress=False, **TINY)
    a, b = (m.state_dict() for m in shared.models)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vit_soups_study_tiny(tmp_path: Path) -> None:
    run_study("vit-soups", tmp_path / "out", datasets=("digits",), archs=("vit2-in", "vit2-randin"), ns=(2, 3),
              n_seeds=2, n_train=100, width=4, epochs=1, pretrain_epochs=1, workers=1, show_progress=False)
    with (tmp_path / "out" / "vit_soups_per_seed.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 * 4  # archs × seeds × N × shown methods
    claims = (tmp_path / "out" / "claims.md").read_text()
    assert "Tab. 9" in claims and claims.count("| With a random input layer") == 2
