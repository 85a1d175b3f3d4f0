"""Linear mode connectivity study: per-example path losses, the barrier bootstrap, and the study end to end."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from mergelab.align import barrier_height, barrier_heights, linear_path, path_example_losses
from mergelab.studies import run_study
from mergelab.studies.mode_connectivity import barrier_difference
from mergelab.zoo.models import build_model


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path_factory.getbasetemp() / "lmc-cache"))


def test_barrier_heights_is_barrier_height_row_by_row() -> None:
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    curves = np.array([[1.0, 2.0, 3.0, 2.0, 1.0],   # hump of 2 above the flat line
                       [1.0, 1.0, 1.0, 1.0, 3.0],   # below the rising line everywhere: 0
                       [0.0, 0.5, 1.0, 1.5, 2.0]])  # on the line: 0
    assert barrier_heights(alphas, curves).tolist() == [barrier_height(alphas, c) for c in curves] == [2.0, 0, 0]


def test_per_example_path_losses_average_to_the_linear_path() -> None:
    torch.manual_seed(0)
    a, b = (build_model("vgg6bn", (1, 8, 8), 10, width=4).state_dict() for _ in range(2))
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    model = build_model("vgg6bn", (1, 8, 8), 10, width=4)
    alphas = [0.0, 0.5, 1.0]
    loss, correct = path_example_losses(model, a, b, x, y, alphas)
    ref = linear_path(model, a, b, x, y, points=3)
    assert loss.shape == correct.shape == (3, 64)
    assert np.allclose(loss.mean(1).numpy(), ref.losses, atol=1e-5)
    assert np.allclose(100 * correct.mean(1).numpy(), ref.accuracies_pct)


def test_barrier_difference_resolves_a_hump_and_not_a_tie() -> None:
    alphas = [0.0, 0.5, 1.0]
    rng = np.random.default_rng(0)
    flat = rng.uniform(0.9, 1.1, (3, 3, 400))
    hump = flat.copy()
    hump[:, 1] += 0.5
    d = barrier_difference(alphas, hump, flat, n_boot=200)
    assert d.low > 0.3 and d.mean == pytest.approx(0.5, abs=0.05)
    same = barrier_difference(alphas, flat, flat, n_boot=200)
    assert same.mean == same.low == same.high == 0.0


def test_mode_connectivity_study_tiny(tmp_path: Path) -> None:
    report = run_study("mode-connectivity", tmp_path / "out", datasets=("digits",), archs=("vgg6bn",), n_seeds=2,
                       points=3, n_boot=50, n_train=200, width=4, epochs=1, pretrain_epochs=1, workers=1,
                       show_progress=False)
    with (tmp_path / "out" / "barriers.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6  # 3 pairs × (BN as trained, BN reset)
    for r in rows:
        assert float(r["ci_low"]) <= float(r["loss_barrier"]) <= float(r["ci_high"])
        assert r["seeds"] == "2"
    assert (tmp_path / "out" / "lmc_paths.png").exists() and "Re-Basin" in report.read_text()
