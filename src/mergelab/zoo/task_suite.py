"""Multi-task suites for task-vector merging: one pretrained encoder, one fine-tuned encoder per task.

The recipe follows task arithmetic with frozen heads (Ilharco et al. 2023; CART keeps CLIP's zero-shot
heads the same way): for every task a linear head is first fitted on the *pretrained* encoder's features
(a linear probe, our stand-in for a zero-shot head), then the encoder is fine-tuned with that head frozen.
Merging then touches the encoders only and each task is evaluated with its own head, so the pretrained
row of a table (pretrained encoder + probe head) and every merged row are directly comparable.

Subclasses (:mod:`mergelab.zoo.vision_suite`, :mod:`mergelab.zoo.text_suite`) provide the encoder, the
data and the recipe constants; this module holds the shared training, caching and evaluation. Fine-tuned
encoders are cached under ``cache_dir()/task_suites`` keyed by a hash of everything that determines them.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from mergelab.evaluation import in_batches
from mergelab.runtime import make_progress, torch_threads
from mergelab.statistics import diagonal_fisher, input_grams
from mergelab.types import StateDict
from mergelab.zoo.cache import cache_dir, load_entry, recipe_hash, save_entry
from mergelab.zoo.primitives import accuracy_pct, train_steps

SPLITS = ("train", "val", "test")

#: bump when suite training changes in a way that changes results (invalidates cached fine-tunes)
SUITE_VERSION = 2


@dataclass(frozen=True)
class Task:
    name: str
    num_classes: int
    description: str


@dataclass(frozen=True)
class FinetuneRecipe:
    """Hyper-parameters of the per-task fine-tuning (all hashed into the cache key)."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of steps with a linear warm-up, then cosine decay
    probe_steps: int = 300  # full-batch Adam steps fitting the linear head on frozen pretrained features
    probe_lr: float = 0.05
    probe_weight_decay: float = 1e-4
    probe_examples: int | None = None  # train examples the probe sees (None: all); features cost a forward each
    #: the dtype forward passes autocast to (fine-tuning, probe features, evaluation); weights, gradients,
    #: the optimizer, task vectors and merges stay float32. "bfloat16" is mixed precision as CLIP fine-tunes use
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got '{self.compute_dtype}'")


COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def autocast(compute_dtype: str, device: torch.device | str = "cpu") -> AbstractContextManager[Any]:
    """Forward passes in ``compute_dtype`` (a no-op for float32)."""
    if compute_dtype == "float32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=COMPUTE_DTYPES[compute_dtype])


@dataclass
class TaskData:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


class TaskModel(nn.Module):
    """``head(encoder(x))``: the encoder is what gets merged, the head stays per task."""

    def __init__(self, encoder: nn.Module, head: nn.Linear, compute_dtype: str = "float32") -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # only the encoder's forward autocasts: the head, the loss and every backward run in float32
        with autocast(self.compute_dtype, x.device):
            features = self.encoder(x)
        return self.head(features.float())


@dataclass
class FineTuned:
    """Everything the merging study needs from one task (encoder weights relative to the suite's encoder)."""

    task: str
    state: StateDict
    head: StateDict
    seed: int
    cache_key: str
    history: dict[str, Any] = field(default_factory=dict)


def _schedule(step: int, total: int, warmup: float) -> float:
    warm = max(1, int(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


class TaskSuite(ABC):
    """A pretrained encoder, tasks with data splits, cached fine-tunes, and evaluation with per-task heads."""

    name: str = "suite"
    feature_dim: int
    eval_batch_size: int = 256

    def __init__(self, tasks: tuple[Task, ...], recipe: FinetuneRecipe, *, seed: int = 0,
                 cache: Path | None = None, show_progress: bool = True) -> None:
        if len({t.name for t in tasks}) != len(tasks):
            raise ValueError("task names must be unique")
        self.tasks = tasks
        self.recipe = recipe
        self.seed = seed
        self.cache = (cache or cache_dir()) / "task_suites"
        self.show_progress = show_progress
        # one intra-op thread by default: on a shared 2-core machine, two threads of these small matmuls
        # ran up to 7x slower than one whenever another process was busy (measured here)
        self.threads = int(os.environ.get("MERGELAB_THREADS", "1"))
        self._data: dict[tuple[str, str], TaskData] = {}
        self._encoder: nn.Module | None = None
        self._finetuned: dict[str, FineTuned] = {}

    # ---- what a concrete suite provides ---------------------------------------------------------------
    @abstractmethod
    def build_encoder(self) -> nn.Module:
        """A fresh encoder holding the pretrained weights (``forward(x) -> features``)."""

    @abstractmethod
    def load_split(self, task: Task, split: str) -> TaskData:
        """Inputs and labels of one split of one task (deterministic given the suite's seed)."""

    @abstractmethod
    def suite_recipe(self) -> dict[str, Any]:
        """What determines the pretrained encoder and the data (hashed into every cache key)."""

    def trainable(self, name: str) -> bool:
        """Whether fine-tuning updates this encoder parameter (text freezes the embeddings)."""
        return True

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return x

    def heads_text(self) -> str:
        """How the heads are fitted, for reports."""
        return "linear probes on pretrained features of each task's training inputs"

    def probe_data(self, task: Task) -> TaskData:
        """Examples the task's head is fitted on (pretrained features, head frozen afterwards): the task's own
        training split by default."""
        return self.data(task.name, "train")

    def eval_order(self, x: torch.Tensor) -> torch.Tensor:
        """Order in which to batch examples at evaluation (text sorts by length to cut padding)."""
        return torch.arange(x.shape[0])

    # ---- data and weights -----------------------------------------------------------------------------
    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"unknown task '{name}'; tasks: {[t.name for t in self.tasks]}")

    def data(self, task: str, split: str) -> TaskData:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
        key = (task, split)
        if key not in self._data:
            self._data[key] = self.load_split(self.task(task), split)
        return self._data[key]

    @property
    def encoder(self) -> nn.Module:
        """The working encoder module (weights get swapped in by :meth:`features`)."""
        if self._encoder is None:
            self._encoder = self.build_encoder().eval()
        return self._encoder

    def pretrained_state(self) -> StateDict:
        if not hasattr(self, "_pretrained"):
            self._pretrained = {k: v.detach().clone() for k, v in self.build_encoder().state_dict().items()}
        return self._pretrained

    # ---- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, state: Mapping[str, torch.Tensor], task: str, split: str, *,
                 limit: int | None = None) -> torch.Tensor:
        """Encoder features of the first ``limit`` examples (all by default) of one split."""
        return self.encode(state, self.data(task, split).x[:limit])

    @torch.no_grad()
    def encode(self, state: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Features of inputs ``x`` under the encoder weights ``state``."""
        enc = self.encoder
        enc.load_state_dict(state)
        enc.eval()
        order = self.eval_order(x)
        out = torch.empty(x.shape[0], self.feature_dim)
        with autocast(self.recipe.compute_dtype, x.device):
            out[order] = in_batches(lambda xb: enc(xb).float(), x[order], self.eval_batch_size)
        return out

    @torch.no_grad()
    def logits(self, state: Mapping[str, torch.Tensor], task: str, split: str,
               head: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        h = head if head is not None else self.finetuned()[task].head
        return F.linear(self.features(state, task, split), h["weight"], h["bias"])

    def accuracy(self, state: Mapping[str, torch.Tensor], task: str, split: str) -> float:
        """Top-1 accuracy in percent of ``state`` (an encoder) with the task's own head."""
        return accuracy_pct(self.logits(state, task, split), self.data(task, split).y)

    # ---- training -------------------------------------------------------------------------------------
    def task_seed(self, task: Task) -> int:
        """Seed of a task's probe and fine-tuning: from the suite seed and the task's *name*, so a task
        trains the same way whichever other tasks the suite holds (and its cache entry stays valid)."""
        return self.seed * 1000 + zlib.crc32(task.name.encode()) % 997

    def cache_key(self, task: Task) -> str:
        recipe = asdict(self.recipe)
        if recipe["compute_dtype"] == "float32":  # hashed as before the field existed: cached fine-tunes stay valid
            del recipe["compute_dtype"]
        return recipe_hash({"suite": self.suite_recipe(), "task": asdict(task), "recipe": recipe,
                            "seed": self.seed, "version": SUITE_VERSION})

    def finetuned(self, progress: Progress | None = None) -> dict[str, FineTuned]:
        """Fine-tuned encoder per task, from the cache or trained now (``progress`` shows training)."""
        missing = [t for t in self.tasks if t.name not in self._finetuned]
        if missing:
            own = progress is None
            bar = progress or make_progress(disable=not self.show_progress)
            with torch_threads(self.threads), (bar if own else nullcontext()):
                for t in missing:
                    self._finetuned[t.name] = self._load_or_train(t, bar)
        return {t.name: self._finetuned[t.name] for t in self.tasks}

    def _load_or_train(self, task: Task, bar: Progress) -> FineTuned:
        key = self.cache_key(task)
        entry = load_entry(key, self.cache)
        pre = self.pretrained_state()
        if entry is None:
            entry = self._train(task, self.task_seed(task), bar)
            save_entry(key, entry, self.cache)
            entry["history"]["trained_now"] = True
        state = {**pre, **entry["changed"]}
        return FineTuned(task.name, state, entry["head"], self.task_seed(task), key, dict(entry["history"]))

    def probe_features(self, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """Pretrained features and labels of the first ``recipe.probe_examples`` of :meth:`probe_data`: what a
        head is fitted on."""
        data = self.probe_data(task)
        feats = self.encode(self.pretrained_state(), data.x[:self.recipe.probe_examples])
        return feats, data.y[:feats.shape[0]]

    def fit_full_batch(self, params: list[torch.Tensor], loss: Callable[[], torch.Tensor], *,
                       weight_decay: float = 0.0) -> None:
        """``recipe.probe_steps`` full-batch Adam steps at ``recipe.probe_lr`` on ``loss()`` (deterministic, quick)."""
        opt = torch.optim.Adam(params, lr=self.recipe.probe_lr, weight_decay=weight_decay)
        for _ in range(self.recipe.probe_steps):
            value = loss()
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()

    def _fit_probe(self, task: Task, seed: int) -> nn.Linear:
        """Linear probe on frozen pretrained features."""
        feats, y = self.probe_features(task)
        torch.manual_seed(seed)
        head = nn.Linear(feats.shape[1], task.num_classes)
        self.fit_full_batch(list(head.parameters()), lambda: F.cross_entropy(head(feats), y),
                            weight_decay=self.recipe.probe_weight_decay)
        return head

    def fit_head(self, task: Task, seed: int) -> nn.Linear:
        """The task's head, frozen while the encoder is fine-tuned: a linear probe unless a suite says otherwise
        (text: zero-shot heads from class prompts)."""
        return self._fit_probe(task, seed)

    def _train(self, task: Task, seed: int, bar: Progress) -> dict[str, Any]:
        start = time.perf_counter()
        # dropout while fine-tuning draws from torch's global generator: seeded here, whatever the head, so a
        # fine-tune does not depend on what ran before it in the process (the probe also seeds its own init)
        torch.manual_seed(seed)
        head = self.fit_head(task, seed)
        head.requires_grad_(False)
        probe_val = accuracy_pct(self.logits(self.pretrained_state(), task.name, "val", head.state_dict()),
                                 self.data(task.name, "val").y)
        encoder = self.build_encoder()
        for name, p in encoder.named_parameters():
            p.requires_grad_(self.trainable(name))
        model = TaskModel(encoder, head, self.recipe.compute_dtype).train()
        params = [p for p in encoder.parameters() if p.requires_grad]
        r = self.recipe
        opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, r.steps, r.warmup))
        data = self.data(task.name, "train")
        gen = torch.Generator().manual_seed(seed)
        job = bar.add_task(f"fine-tune {self.name}/{task.name}", total=r.steps)
        losses = train_steps(model, opt, sched, data.x, data.y, _batches(len(data), r.batch_size, r.steps, gen),
                             augment=lambda x: self.augment(x, gen), on_step=lambda: bar.advance(job))
        pre = self.pretrained_state()
        changed = {k: v.detach().clone() for k, v in encoder.state_dict().items()
                   if v.is_floating_point() and not torch.equal(v, pre[k])}
        history = {"loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
                   "probe_val_acc": probe_val, "seconds": round(time.perf_counter() - start, 2),
                   "train_examples": len(data), "seed": seed}
        return {"changed": changed, "head": head.state_dict(), "history": history}

    # ---- statistics for data-aware methods -------------------------------------------------------------
    def _task_model(self, task: str) -> TaskModel:
        ft = self.finetuned()[task]
        enc = self.build_encoder()
        enc.load_state_dict(ft.state)
        head = nn.Linear(self.feature_dim, self.task(task).num_classes)
        head.load_state_dict(ft.head)
        for name, p in enc.named_parameters():
            p.requires_grad_(self.trainable(name))
        head.requires_grad_(False)
        return TaskModel(enc, head).eval()

    def fisher(self, task: str, n_examples: int, seed: int) -> StateDict:
        """Diagonal (true) Fisher of the task's fine-tuned encoder on ``n_examples`` training inputs, keyed
        by encoder tensor name; frozen tensors get zeros (Fisher merging then falls back to the mean)."""
        model = self._task_model(task)
        data = self.data(task, "train")
        fisher = diagonal_fisher(model, [(data.x, data.y)], max_examples=n_examples, seed=seed)
        out = {k.removeprefix("encoder."): v for k, v in fisher.items() if k.startswith("encoder.")}
        for k, v in model.encoder.state_dict().items():
            if v.is_floating_point() and k not in out:
                out[k] = torch.zeros_like(v)
        return out

    def grams(self, task: str, n_examples: int) -> StateDict:
        """RegMean's input Gram matrices of every ``nn.Linear`` in the fine-tuned encoder."""
        model = self._task_model(task)
        data = self.data(task, "train")
        n = min(n_examples, len(data))
        batches = [(data.x[i:i + 64], data.y[i:i + 64]) for i in range(0, n, 64)]
        grams = input_grams(model, batches)
        return {k.removeprefix("encoder."): v for k, v in grams.items() if k.startswith("encoder.")}

    def record(self) -> dict[str, Any]:
        """What made this suite's models (for the study's mergelab.json)."""
        return {
            "suite": self.name, "seed": self.seed, "suite_recipe": self.suite_recipe(),
            "finetune_recipe": asdict(self.recipe),
            "tasks": {t.name: {"classes": t.num_classes, "description": t.description,
                               "sizes": {s: len(self.data(t.name, s)) for s in SPLITS},
                               **({"seed": self._finetuned[t.name].seed,
                                   "cache_key": self._finetuned[t.name].cache_key,
                                   "history": self._finetuned[t.name].history}
                                  if t.name in self._finetuned else {})}
                      for t in self.tasks},
        }


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` mini-batches drawn epoch by epoch from seeded permutations."""
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[i:i + batch_size]
            done += 1
            if done >= steps:
                return
