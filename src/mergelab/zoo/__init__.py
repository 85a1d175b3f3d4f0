"""Model zoos: offline datasets, small architecture families, and cached training of model families."""

from mergelab.zoo.data import DATASETS, Dataset, load_dataset
from mergelab.zoo.models import ARCHS, ZooModel, build_model
from mergelab.zoo.train import TrainConfig, Zoo, ZooSpec, train_zoo, train_zoos

__all__ = [
    "ARCHS",
    "DATASETS",
    "Dataset",
    "TrainConfig",
    "Zoo",
    "ZooModel",
    "ZooSpec",
    "build_model",
    "load_dataset",
    "train_zoo",
    "train_zoos",
]
