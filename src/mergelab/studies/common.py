"""Shared pieces of the studies: option handling, per-zoo evaluation with memoised soups, run records."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from mergelab import __version__
from mergelab.ensemble import EvalMode, Outputs, model_outputs
from mergelab.soups import uniform_soup
from mergelab.zoo.data import Dataset, load_dataset
from mergelab.zoo.models import ZooModel
from mergelab.zoo.task_suite import accuracy_pct
from mergelab.zoo.train import TrainConfig, Zoo, ZooSpec

C = TypeVar("C")


class TrainingRecipe(Protocol):
    """The training fields a study's Config shares with the others (same values → same cached zoos)."""

    @property
    def epochs(self) -> int: ...
    @property
    def pretrain_epochs(self) -> int: ...
    @property
    def n_train(self) -> int | None: ...
    @property
    def width(self) -> int: ...
    @property
    def split_seed(self) -> int: ...
    @property
    def seed(self) -> int: ...


def zoo_spec(cfg: TrainingRecipe, arch: str, dataset: str, init: str, n_models: int) -> ZooSpec:
    """``n_models`` members of ``arch`` on ``dataset`` trained with the study's recipe."""
    return ZooSpec(TrainConfig(arch=arch, dataset=dataset, init=init,  # type: ignore[arg-type]
                               epochs=cfg.epochs, pretrain_epochs=cfg.pretrain_epochs, n_train=cfg.n_train,
                               width=cfg.width, split_seed=cfg.split_seed, seed=cfg.seed), n_models)


def apply_options(config: C, options: Mapping[str, Any]) -> C:
    """``dataclasses.replace`` that names the unknown key and the allowed ones (CLI-friendly errors);
    lists become tuples and comma-separated strings are split for tuple fields."""
    fields = {f.name: f for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; allowed: {sorted(fields)}")
    clean: dict[str, Any] = {}
    for k, v in options.items():
        current = getattr(config, k)
        if isinstance(current, tuple):
            if isinstance(v, str):
                v = [s.strip() for s in v.split(",") if s.strip()]
            items = list(v)
            if current and isinstance(current[0], int | float) and not isinstance(current[0], bool):
                items = [type(current[0])(s) for s in items]
            v = tuple(items)
        clean[k] = v
    return dataclasses.replace(config, **clean)  # type: ignore[type-var]


@dataclass
class ZooEval:
    """Evaluates one zoo: member outputs once per split, soups memoised by the set of members averaged.

    ``transform`` maps each member's state dict before anything is computed (the magnitude study scales
    weights there); soups average the transformed state dicts.
    """

    zoo: Zoo
    val: Dataset
    test: Dataset
    mode: EvalMode = "eval"
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    _state_dicts: list[dict[str, torch.Tensor]] = field(default_factory=list)
    _members: list[ZooModel] = field(default_factory=list)
    _outputs: dict[tuple[str, int], Outputs] = field(default_factory=dict)
    _soups: dict[tuple[str, frozenset[int]], Outputs] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sds = self.zoo.state_dicts()
        self._state_dicts = [self.transform(sd) for sd in sds] if self.transform else sds
        self._members = []
        for model, sd in zip(self.zoo.models, self._state_dicts, strict=True):
            if self.transform:
                model = copy.deepcopy(model)
                model.load_state_dict(sd)
            self._members.append(model)

    @property
    def members(self) -> list[ZooModel]:
        return self._members

    @property
    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return self._state_dicts

    def data(self, split: str) -> Dataset:
        return self.val if split == "val" else self.test

    def outputs(self, i: int, split: str) -> Outputs:
        key = (split, i)
        if key not in self._outputs:
            self._outputs[key] = model_outputs(self._members[i], self.data(split).x, mode=self.mode)
        return self._outputs[key]

    def member_acc(self, i: int, split: str) -> float:
        return accuracy_pct(self.outputs(i, split).logits, self.data(split).y)

    def soup_model(self, members: Sequence[int]) -> ZooModel:
        model = copy.deepcopy(self._members[0])
        model.load_state_dict(uniform_soup([self._state_dicts[i] for i in members]))
        return model

    def soup_outputs(self, members: Sequence[int], split: str) -> Outputs:
        key = (split, frozenset(members))
        if key not in self._soups:
            self._soups[key] = model_outputs(self.soup_model(sorted(members)), self.data(split).x, mode=self.mode)
        return self._soups[key]

    def soup_acc(self, members: Sequence[int], split: str) -> float:
        return accuracy_pct(self.soup_outputs(members, split).logits, self.data(split).y)


def splits(dataset: str, split_seed: int) -> tuple[Dataset, Dataset]:
    return load_dataset(dataset, "val", split_seed), load_dataset(dataset, "test", split_seed)


def zoo_record(zoo: Zoo) -> dict[str, Any]:
    """What made a zoo (for mergelab.json): recipe, seeds, cache keys, per-member validation accuracy."""
    return {"recipe": dataclasses.asdict(zoo.config), "member_seeds": zoo.member_seeds,
            "base_seed": zoo.base_seed, "cache_keys": zoo.cache_keys,
            "val_acc_at_training": [h.get("val_acc") for h in zoo.histories], "trained_now": zoo.trained}


def write_record(out: Path, study: str, config: Any, zoos: Sequence[Zoo], started: float,
                 extra: Mapping[str, Any] | None = None) -> Path:
    """``mergelab.json``: study, version, options, seeds, zoo recipes, wall time."""
    record = {"study": study, "mergelab_version": __version__, "torch": torch.__version__,
              "config": dataclasses.asdict(config), "zoos": [zoo_record(z) for z in zoos],
              "wall_seconds": round(time.perf_counter() - started, 2), **(extra or {})}
    path = out / "mergelab.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def verdict_from_fraction(hits: int, total: int, *, majority: float = 0.75) -> bool | None:
    """Held when at least ``majority`` of the configurations agree, failed when at most 1 − majority."""
    if total == 0:
        return None
    share = hits / total
    return True if share >= majority else (False if share <= 1 - majority else None)
