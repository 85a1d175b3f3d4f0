"""Executors: local processes and Ray return the same results, in job order."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from mergelab.executor import LocalExecutor, get_executor
from mergelab.studies.rebasin import RebasinConfig, run_grid

TINY = RebasinConfig(archs=("mlp1", "vgg6bn"), datasets=("digits",), seeds=(0,), n_models=3, soup_sizes=(2, 3),
                     width=8, epochs=1, pretrain_epochs=1, n_train=300, points=5, bn_batches=2, n_test=200)


def _cells(results: list) -> list[dict]:
    return [dataclasses.asdict(r) | {"barriers": [{k: v for k, v in row.items() if k != "match_seconds"}
                                                  for row in r.barriers]} for r in results]


def test_local_executor_keeps_job_order_in_process_and_in_processes() -> None:
    jobs = [9, 4, 1, 16]
    with LocalExecutor(0, show_progress=False) as inline:
        assert inline.map(math.sqrt, jobs) == [3.0, 2.0, 1.0, 4.0]
    with LocalExecutor(2, show_progress=False) as pool:
        assert pool.map(math.sqrt, jobs) == [3.0, 2.0, 1.0, 4.0]
        with pytest.raises(ValueError):
            pool.map(math.sqrt, [-1.0])  # a job's exception reaches the caller


def test_unknown_executor_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="local, local:N, ray"):
        get_executor("slurm")


def test_ray_executor_returns_the_same_table_as_the_local_one(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    # every executor trains its own models (separate caches): equal tables mean equal training too
    local = run_grid(TINY, executor="local:2", cache=tmp_path / "cache-local", show_progress=False)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        remote = run_grid(TINY, executor="ray", cache=tmp_path / "cache-ray", show_progress=False)
    finally:
        ray.shutdown()
    assert _cells(remote) == _cells(local)
    assert len(local) == 2 and len(local[1].path) == 4 * TINY.points  # vgg6bn: naive/aligned × BN reset or not


def test_zoo_training_through_executors_gives_the_same_models(tmp_path: Path) -> None:
    from mergelab.zoo.train import train_zoo

    tiny = {"n_train": 200, "epochs": 1, "pretrain_epochs": 1, "width": 4, "batch_size": 50}
    direct = train_zoo("vgg6bn", "digits", 2, "shared", cache=tmp_path / "a", workers=1, show_progress=False,
                       **tiny)
    pooled = train_zoo("vgg6bn", "digits", 2, "shared", cache=tmp_path / "b", executor="local:2",
                       show_progress=False, **tiny)
    assert pooled.trained == 2 and pooled.cache_keys == direct.cache_keys
    for a, b in zip(direct.state_dicts(), pooled.state_dicts(), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
