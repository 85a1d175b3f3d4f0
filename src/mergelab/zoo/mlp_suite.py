"""A small, real multi-task suite from the zoo's offline data: one MLP body, four tasks, one head per task.

An MLP (``depth`` hidden layers of ``hidden`` units) is pre-trained on MNIST (mnist5k) and then fine-tuned,
each copy with a fresh head of its own, on three other tasks: Animal-MNIST silhouettes, MNIST rotated by 90°,
and MNIST under one fixed, seeded pixel permutation. The hidden layers ("body") are what a merge combines;
every task keeps its own fine-tuned head (the multi-head setting of task-vector merging). The suite is saved
as safetensors bodies (``base``, one per task) and ``heads.pt``, so ``mergelab merge`` and ``mergelab
search`` read it like any checkpoints; :func:`evaluate` is the search's evaluator.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from mergelab.evaluation import accuracy_pct, predict_logits
from mergelab.zoo.data import Dataset, load_dataset
from mergelab.zoo.models import MLP
from mergelab.zoo.train import TrainConfig, fit


@dataclass(frozen=True)
class MLPSuiteConfig:
    hidden: int = 128
    depth: int = 3
    pretrain_epochs: int = 8
    finetune_epochs: int = 4
    n_train: int | None = None  # per task; None: the whole train split


TASKS = ("animals", "mnist-rot90", "mnist-perm")
PERM_SEED = 1234  # the pixel permutation of the mnist-perm task (fixed: it defines the task)


def _transform(task: str, d: Dataset) -> Dataset:
    x = d.x
    if task == "mnist-rot90":
        x = torch.rot90(x, 1, (2, 3)).contiguous()
    elif task == "mnist-perm":
        perm = torch.randperm(x[0].numel(), generator=torch.Generator().manual_seed(PERM_SEED))
        x = x.flatten(1)[:, perm].reshape(x.shape).contiguous()
    return Dataset(task, d.split, d.seed, x, d.y, d.num_classes, d.kind, d.class_names, d.input_shape, d.norm)


def task_data(task: str, split: str, n: int | None = None, seed: int = 0) -> Dataset:
    """One split of one task (``pretrain`` is plain mnist5k)."""
    source = "animal-mnist" if task == "animals" else "mnist5k"
    d = load_dataset(source, split, 0)  # type: ignore[arg-type]
    return _transform(task, d).subset(n, seed=seed)


def _body(model: MLP) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k.startswith("body.")}


def build_suite(root: Path, cfg: MLPSuiteConfig, seed: int) -> dict[str, Any]:
    """Train and save ``base.safetensors``, ``<task>.safetensors`` (bodies) and ``heads.pt``; cached in ``root``."""
    meta_path = root / "suite.yaml"
    recipe = {f.name: getattr(cfg, f.name) for f in fields(MLPSuiteConfig)}  # a subclass's extra fields: not ours
    meta = {"config": recipe, "seed": seed, "tasks": list(TASKS), "perm_seed": PERM_SEED}
    if meta_path.is_file() and yaml.safe_load(meta_path.read_text()) == yaml.safe_load(yaml.safe_dump(meta)):
        return meta
    root.mkdir(parents=True, exist_ok=True)
    shape = (1, 28, 28)
    torch.manual_seed(seed)
    model = MLP(shape, 10, cfg.depth, cfg.hidden)
    train_cfg = TrainConfig("mlp2", "mnist5k", augment=False, n_train=cfg.n_train)
    fit(model, load_dataset("mnist5k", "train", 0).subset(cfg.n_train, seed=seed), train_cfg, cfg.pretrain_epochs,
        seed)
    base = _body(model)
    save_file(base, str(root / "base.safetensors"))
    heads = {}
    for i, task in enumerate(TASKS):
        ft = MLP(shape, 10, cfg.depth, cfg.hidden)
        ft.load_state_dict(model.state_dict())
        torch.manual_seed(seed * 1000 + i + 1)  # the task's own fresh head
        ft.head.reset_parameters()
        fit(ft, task_data(task, "train", cfg.n_train, seed), train_cfg, cfg.finetune_epochs, seed * 1000 + i + 1)
        save_file(_body(ft), str(root / f"{task}.safetensors"))
        heads[task] = {k: v.clone() for k, v in ft.head.state_dict().items()}
    torch.save(heads, root / "heads.pt")
    meta_path.write_text(yaml.safe_dump(meta, sort_keys=False))
    return meta


@lru_cache(maxsize=4)
def _suite(suite: str) -> tuple[dict[str, dict[str, torch.Tensor]], int, int]:
    meta = yaml.safe_load((Path(suite) / "suite.yaml").read_text())
    heads = torch.load(Path(suite) / "heads.pt", weights_only=True)
    return heads, int(meta["config"]["depth"]), int(meta["config"]["hidden"])


@lru_cache(maxsize=8)
def _eval_data(task: str, split: str) -> Dataset:
    return task_data(task, split)


@torch.no_grad()
def task_logits(state_dict: dict[str, torch.Tensor], suite: str, split: str = "val",
                tasks: tuple[str, ...] | list[str] = TASKS) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per task, (logits, labels) of the body in ``state_dict`` with the task's own head on one split."""
    heads, depth, hidden = _suite(suite)
    model = MLP((1, 28, 28), 10, depth, hidden).eval()
    out = {}
    for task in tasks:
        model.load_state_dict({**{k: v for k, v in state_dict.items() if k.startswith("body.")},
                               **{f"head.{k}": v for k, v in heads[task].items()}})
        d = _eval_data(task, split)
        out[task] = (predict_logits(model, d.x, batch_size=max(1, len(d))), d.y)  # one batch, as the cached scores
    return out


def evaluate(state_dict: dict[str, torch.Tensor], suite: str, split: str = "val",
             tasks: tuple[str, ...] | list[str] = TASKS) -> dict[str, float]:
    """Evaluator for ``mergelab search``: mean accuracy (%) over the tasks, each with its own head."""
    out = {f"acc[{t}]": accuracy_pct(lg, y) for t, (lg, y) in task_logits(state_dict, suite, split, tasks).items()}
    out["score"] = sum(out[f"acc[{t}]"] for t in tasks) / len(tasks)
    return out


