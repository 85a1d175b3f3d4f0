"""SWA: the cyclic schedule, the running average with its BN update, and the study end to end."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from mergelab.studies import run_study
from mergelab.zoo.models import build_model
from mergelab.zoo.swa import SWAConfig, _schedule, train_swa
from mergelab.zoo.train import TrainConfig

RECIPE = TrainConfig(arch="vgg6bn", dataset="digits", n_train=128, width=4, batch_size=32, epochs=1)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path_factory.getbasetemp() / "swa-cache"))


def test_cyclic_lr_falls_linearly_within_each_cycle_and_restarts() -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = _schedule(SWAConfig("cyclic", lr_high=1.0, lr_low=0.2, snapshot_every=4))(opt, 100)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # Izmailov et al. eq. 2 with t = (i mod c + 1) / c: 0.8, 0.6, 0.4, 0.2 (the snapshot), then again
    assert lrs == pytest.approx([0.8, 0.6, 0.4, 0.2] * 2)


def test_swa_averages_the_snapshots_and_recomputes_bn() -> None:
    torch.manual_seed(0)
    start = build_model("vgg6bn", (1, 8, 8), 10, width=4)
    res = train_swa(start, RECIPE, SWAConfig("constant", epochs=2, snapshot_every=2), seed=1)
    assert res.snapshots == 4  # 2 epochs × 4 steps, a snapshot every 2
    avg, last = res.averaged, res.last
    assert not torch.equal(avg["convs.0.weight"], last["convs.0.weight"])
    # BN statistics are the average's own, recomputed on the data: neither the last iterate's nor the start's
    assert not torch.equal(avg["convs.1.running_mean"], last["convs.1.running_mean"])
    assert not torch.equal(avg["convs.1.running_mean"], start.state_dict()["convs.1.running_mean"])
    again = train_swa(start, RECIPE, SWAConfig("constant", epochs=2, snapshot_every=2), seed=1)
    assert again.cache_key == res.cache_key and torch.equal(again.averaged["head.weight"], avg["head.weight"])
    with pytest.raises(ValueError, match="snapshot"):
        train_swa(start, RECIPE, SWAConfig("constant", epochs=1, snapshot_every=50), seed=1)


def test_swa_study_tiny(tmp_path: Path) -> None:
    report = run_study("swa", tmp_path / "out", datasets=("digits",), archs=("vgg6bn",), n_seeds=2, n_soup=2,
                       snapshot_every=2, n_train=128, width=4, epochs=1, pretrain_epochs=1, workers=1,
                       show_progress=False)
    with (tmp_path / "out" / "swa_per_seed.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 8  # seeds × methods (BN net: the independent soup also with a BN reset)
    assert {r["snapshots"] for r in rows if r["method"].startswith("swa")} == {"2"}
    assert "Izmailov" in (tmp_path / "out" / "claims.md").read_text() and report.exists()
