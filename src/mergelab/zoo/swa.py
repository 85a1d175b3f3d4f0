"""Stochastic weight averaging (Izmailov et al. 2018) on zoo models, cached like zoo members.

One run continues from a start (a zoo's shared base) for ``epochs`` with a constant or cyclic learning rate;
every ``snapshot_every`` steps (at the end of each cycle for the cyclic schedule, where the lr is lowest) the
weights join a running average (``torch.optim.swa_utils.AveragedModel``). After the run the average's
BatchNorm statistics are recomputed on the training data (``torch.optim.swa_utils.update_bn``): averaged
weights need their own statistics. The last iterate of the same run is kept for comparison.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.optim.swa_utils import AveragedModel, update_bn

from mergelab.zoo.cache import cache_dir, load_entry, recipe_hash, save_entry
from mergelab.zoo.data import train_subset
from mergelab.zoo.models import ZooModel
from mergelab.zoo.train import TRAIN_VERSION, TrainConfig, fit

ScheduleName = Literal["constant", "cyclic"]


@dataclass(frozen=True)
class SWAConfig:
    schedule: ScheduleName = "constant"
    epochs: int = 2
    #: constant: lr = lr_high × the recipe's lr; cyclic: from lr_high down to lr_low within every cycle
    lr_high: float = 0.5
    lr_low: float = 0.05
    snapshot_every: int = 16  # steps between snapshots (the cycle length of the cyclic schedule)
    bn_batch_size: int = 128


@dataclass
class SWAResult:
    averaged: dict[str, torch.Tensor]  # the SWA weights, BN statistics recomputed on the training data
    last: dict[str, torch.Tensor]  # the run's last iterate
    snapshots: int
    cache_key: str


def _schedule(swa: SWAConfig):  # type: ignore[no-untyped-def]
    def make(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        if swa.schedule == "constant":
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: swa.lr_high)
        c = swa.snapshot_every

        def cyclic(step: int) -> float:  # Izmailov et al. 2018, eq. 2: linear from α1 to α2 within a cycle
            t = ((step % c) + 1) / c
            return (1 - t) * swa.lr_high + t * swa.lr_low

        return torch.optim.lr_scheduler.LambdaLR(opt, cyclic)

    return make


def train_swa(start: ZooModel, recipe: TrainConfig, swa: SWAConfig, seed: int, *, cache: Path | None = None
              ) -> SWAResult:
    """One SWA run from ``start`` (not modified) on ``recipe``'s dataset, seeded by ``seed``; cached by recipe."""
    if swa.schedule not in ("constant", "cyclic"):
        raise ValueError(f"schedule must be 'constant' or 'cyclic', got '{swa.schedule}'")
    if swa.snapshot_every < 1 or swa.epochs < 1:
        raise ValueError("snapshot_every and epochs must be at least 1")
    root = cache or cache_dir()
    start_hash = recipe_hash({k: float(v.double().sum()) for k, v in start.state_dict().items()})
    key = recipe_hash({"role": "swa", **asdict(recipe), "swa": asdict(swa), "seed": seed, "start": start_hash,
                       "version": TRAIN_VERSION})
    entry = load_entry(key, root)
    if entry is None:
        data = train_subset(recipe.dataset, recipe.n_train, recipe.split_seed)
        model = copy.deepcopy(start)
        averaged = AveragedModel(model)
        steps = [0]

        def snapshot() -> None:
            steps[0] += 1
            if steps[0] % swa.snapshot_every == 0:
                averaged.update_parameters(model)

        steps_per_epoch = (len(data) + recipe.batch_size - 1) // recipe.batch_size
        if swa.epochs * steps_per_epoch < swa.snapshot_every:
            raise ValueError(f"an SWA run of {swa.epochs} epoch(s) × {steps_per_epoch} steps takes no snapshot every "
                             f"{swa.snapshot_every} steps: lower snapshot_every or train longer")
        fit(model, data, recipe, swa.epochs, seed, schedule=_schedule(swa), on_step=snapshot)
        batches = [data.x[i:i + swa.bn_batch_size] for i in range(0, len(data), swa.bn_batch_size)]
        update_bn(batches, averaged)
        entry = {"averaged": averaged.module.state_dict(), "last": model.state_dict(),
                 "snapshots": int(averaged.n_averaged)}
        save_entry(key, entry, root)
    return SWAResult(entry["averaged"], entry["last"], int(entry["snapshots"]), key)


__all__ = ["SWAConfig", "SWAResult", "train_swa"]
