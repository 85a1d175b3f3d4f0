"""Train model families ("zoos") of one architecture on one dataset, cached on disk by recipe hash.

``init="shared"`` follows the model-soups recipe the paper uses: one model is pre-trained once (the shared
starting point), then each member gets a freshly initialised head and is fine-tuned with its own seed for
the head, the data order and the augmentation. ``init="independent"`` trains every member from its own
random initialisation for the same total number of epochs — the case where weight averaging is expected
to fail because the members are not in one linearly connected basin.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from mergelab.executor import Executor, get_executor
from mergelab.runtime import available_cores, default_threads
from mergelab.zoo.cache import cache_dir, load_entry, recipe_hash, save_entry
from mergelab.zoo.data import SPLITS_VERSION, Dataset, load_dataset, train_subset
from mergelab.zoo.models import ARCHS, ZooModel, build_model
from mergelab.zoo.primitives import accuracy_pct, predict_logits, shift_augment, train_steps

#: bump when training code changes in a way that changes results, so stale cache entries are not reused
TRAIN_VERSION = 3

Init = Literal["shared", "independent"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained zoo member (hashed into the cache key)."""

    arch: str
    dataset: str
    init: Init = "shared"
    epochs: int = 3  # fine-tuning epochs per member (independent members get pretrain_epochs + epochs)
    pretrain_epochs: int = 2  # epochs of the shared starting point
    lr: float | None = None  # None: 0.1 (SGD, nesterov) or 2e-3 (AdamW for ViT and VGG without BN)
    # shared init: members fine-tune at this × lr. Measured at demo scale, 0.3 lowered members and soups alike
    # (a freshly initialised head needs the full lr to catch up in 2 epochs), so the default keeps the full lr
    finetune_lr_scale: float = 1.0
    batch_size: int = 32  # small batches: more steps per epoch, which short CPU runs need most
    width: int = 16
    n_train: int | None = None  # class-stratified subset of the train split (CPU budget); None = all
    split_seed: int = 0  # which train/val/test split
    seed: int = 0  # zoo seed: member i trains with member_seed(seed, i)
    augment: bool = True
    shift: int = 1  # max random translation (pixels/steps) when augmenting; ±2 slowed short runs a lot
    #: shared init: does a member start from the base's head ("keep") or a fresh one from its seed ("reset")?
    #: "auto" keeps it for the AdamW families (VGG without BN, ViT) and resets it for the SGD/BN ones. Measured
    #: with the demo recipe (MNIST-5k, 2,000 images, 3 + 2 epochs, width 8; val accuracy, members 1-3): vgg6
    #: members with a fresh head reach 70.8/72.2/75.8 % (the base 79.4 %), with the base's head 84.8/85.8/85.0 %,
    #: trained independently for 5 epochs 86.6/90.2/85.8 %: the random head's first AdamW steps at full lr
    #: scramble features that no BN renormalises. vit2: 72.0/68.0/71.4 vs 72.6/72.6/75.8 %. vgg6bn and resnet8
    #: lose nothing with a fresh head (94.6/94.4/94.8 vs 95.0/95.2/94.2 %), so they keep the head's diversity.
    member_head: str = "auto"
    #: shared init: pre-train the shared start on this dataset instead of ``dataset`` (same input shape and
    #: classes); members then fine-tune on ``dataset``. Merging models trained on different datasets from one
    #: start (the Rethinking paper's Tab. 3) pairs a zoo on A with a zoo on B whose base_dataset is A.
    base_dataset: str | None = None

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (2e-3 if uses_adamw(self.arch) else 0.1)

    def resolved_member_head(self) -> str:
        if self.member_head not in ("auto", "reset", "keep"):
            raise ValueError(f"member_head must be 'auto', 'reset' or 'keep', got '{self.member_head}'")
        if self.member_head == "auto":
            return "keep" if uses_adamw(self.arch) else "reset"
        return self.member_head


def uses_adamw(arch: str) -> bool:
    """Nets without normalisation layers (ViT here has LayerNorm but is a transformer; VGG without BN)
    barely move with plain SGD in a few epochs; AdamW trains them in the same budget."""
    return ARCHS[arch].family in ("vit", "vgg")


def member_seed(seed: int, index: int) -> int:
    """Seed of member ``index``: distinct across members and zoo seeds, recorded in every output."""
    return seed * 100_003 + index + 1


def base_seed(seed: int) -> int:
    """Seed of the shared pre-trained starting point (never equal to a member's)."""
    return seed * 100_003


@dataclass
class Zoo:
    config: TrainConfig
    models: list[ZooModel]
    member_seeds: list[int]
    base_seed: int | None
    cache_keys: list[str]
    histories: list[dict[str, Any]] = field(default_factory=list)
    trained: int = 0  # how many members were trained now (the rest came from the cache)

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.models]

    def __len__(self) -> int:
        return len(self.models)


def _augment(x: torch.Tensor, kind: str, gen: torch.Generator, r: int = 1) -> torch.Tensor:
    """Random translations by up to ``r`` pixels/steps (images, signals) or small Gaussian noise (tabular)."""
    if kind == "tabular":
        return x + 0.1 * torch.randn(x.shape, generator=gen)
    return shift_augment(x, gen, r)


def _optimizer(model: torch.nn.Module, config: TrainConfig, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    lr = config.resolved_lr() * lr_scale
    if uses_adamw(config.arch):
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


Schedule = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


def fit(model: ZooModel, data: Dataset, config: TrainConfig, epochs: int, seed: int, lr_scale: float = 1.0, *,
        schedule: Schedule | None = None, on_step: Callable[[], None] | None = None) -> list[float]:
    """Train in place with a cosine schedule (or ``schedule(optimizer, total_steps)``); ``seed`` fixes the data
    order and the augmentation; ``on_step`` runs after every step (SWA snapshots). Returns the mean training
    loss of every epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, config, lr_scale)
    steps_per_epoch = (len(data) + config.batch_size - 1) // config.batch_size
    total_steps = max(1, epochs * steps_per_epoch)
    sched = schedule(opt, total_steps) if schedule else torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps)
    augment = (lambda x: _augment(x, data.kind, gen, config.shift)) if config.augment else None
    model.train()
    losses: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        batches = [order[start:start + config.batch_size] for start in range(0, len(data), config.batch_size)]
        total = 0.0
        for loss, idx in zip(train_steps(model, opt, sched, data.x, data.y, batches, augment=augment,
                                         on_step=on_step), batches, strict=True):
            total += loss * len(idx)
        losses.append(total / len(data))
    model.eval()
    return losses


def _recipe(config: TrainConfig, role: str, seed: int) -> dict[str, Any]:
    recipe = {**asdict(config), "role": role, "member_seed": seed, "version": TRAIN_VERSION,
              "splits": SPLITS_VERSION}
    # the resolved head policy is hashed, and only when it keeps the head: a reset head is what every entry
    # cached before the policy existed did, so those entries stay valid
    del recipe["member_head"]
    if role == "member" and config.init == "shared" and config.resolved_member_head() == "keep":
        recipe["member_head"] = "keep"
    if recipe.pop("base_dataset") is not None:  # hashed only when set: older entries keep their keys
        recipe["base_dataset"] = config.base_dataset
    return recipe


def base_config(cfg: TrainConfig) -> TrainConfig:
    """The recipe of ``cfg``'s shared start (trained on ``base_dataset`` when it is set)."""
    return replace(cfg, dataset=cfg.base_dataset, base_dataset=None) if cfg.base_dataset else cfg


def _base_key(cfg: TrainConfig) -> str:
    # the base does not depend on the members' fine-tuning epochs
    return recipe_hash(_recipe(replace(base_config(cfg), epochs=0), "base", base_seed(cfg.seed)))


def shared_start(cfg: TrainConfig, cache: Path | None = None) -> dict[str, torch.Tensor]:
    """The state dict of ``cfg``'s shared start, from the cache (train the shared zoo first)."""
    entry = load_entry(_base_key(cfg), cache or cache_dir())
    if entry is None:
        raise RuntimeError(f"the shared start of {cfg.arch}/{cfg.dataset} (seed {cfg.seed}) is not in the cache: "
                           "train its shared zoo first (train_zoos)")
    return entry["state_dict"]


def _member_key(cfg: TrainConfig, seed: int) -> str:
    return recipe_hash(_recipe(cfg, "member", seed))


@dataclass(frozen=True)
class _Job:
    """One model to train; picklable so spawn workers can run it."""

    key: str
    config: TrainConfig
    role: str  # "base" or "member"
    seed: int
    epochs: int
    base_key: str | None  # a shared-init member starts from this cache entry


def _skeleton(cfg: TrainConfig, shape: tuple[int, ...], classes: int, seed: int,
              base_state: dict[str, torch.Tensor] | None) -> ZooModel:
    torch.manual_seed(seed)
    model = build_model(cfg.arch, shape, classes, width=cfg.width)
    if base_state is not None:
        model.load_state_dict(base_state)
        fresh = ARCHS[cfg.arch].fresh_per_member
        if fresh:  # layers the member does not share with the start (the paper's random ViT input layer)
            torch.manual_seed(seed)
            for name in fresh:
                model.get_submodule(name).reset_parameters()
        if cfg.resolved_member_head() == "reset":
            torch.manual_seed(seed)  # the member's own head: a fresh init from its seed
            model.head.reset_parameters()
    return model


def _run_job(job: _Job, root: str, threads: int) -> str:
    """Train one model and write it to the cache (runs in a worker process or in-process)."""
    torch.set_num_threads(threads)
    cache = Path(root)
    if load_entry(job.key, cache) is not None:  # another run finished it meanwhile
        return job.key
    cfg = job.config
    val = load_dataset(cfg.dataset, "val", cfg.split_seed)
    data = train_subset(cfg.dataset, cfg.n_train, cfg.split_seed)
    base = load_entry(job.base_key, cache) if job.base_key else None
    if job.base_key and base is None:
        raise RuntimeError(f"base model {job.base_key} missing from the cache at {cache}")
    model = _skeleton(cfg, data.input_shape, data.num_classes, job.seed, base["state_dict"] if base else None)
    start = time.perf_counter()
    scale = cfg.finetune_lr_scale if job.base_key else 1.0
    losses = fit(model, data, cfg, job.epochs, job.seed, lr_scale=scale)
    history = {"loss": losses, "val_acc_pct": accuracy_pct(predict_logits(model, val.x), val.y),
               "seconds": time.perf_counter() - start,
               "threads": threads}
    save_entry(job.key, {"state_dict": model.state_dict(), "recipe": _recipe(cfg, job.role, job.seed),
                         "history": history}, cache)
    return job.key


@dataclass(frozen=True)
class ZooSpec:
    """A zoo to train: the recipe and how many members."""

    config: TrainConfig
    n_models: int


def default_workers() -> int:
    """``$MERGELAB_WORKERS`` or one worker per available core.

    Members train in separate single-threaded processes: on a small shared machine, intra-op threading of
    these tiny convolutions was measured 2-4× *slower* than one thread whenever another process was busy.
    """
    env = os.environ.get("MERGELAB_WORKERS")
    return max(1, int(env)) if env else available_cores()


def _load_zoo(spec: ZooSpec, root: Path, loaded: Mapping[str, dict[str, Any]]) -> Zoo:
    """The zoo's models from the cache; ``loaded`` holds the entries already read (each file is read once)."""

    def entry_for(key: str) -> dict[str, Any] | None:
        return loaded[key] if key in loaded else load_entry(key, root)

    cfg = spec.config
    val = load_dataset(cfg.dataset, "val", cfg.split_seed)
    base_state = None
    b_seed = None
    if cfg.init == "shared":
        b_seed = base_seed(cfg.seed)
        entry = entry_for(_base_key(cfg))
        assert entry is not None
        base_state = entry["state_dict"]
    models, keys, histories = [], [], []
    for i in range(spec.n_models):
        s = member_seed(cfg.seed, i)
        key = _member_key(cfg, s)
        entry = entry_for(key)
        assert entry is not None, f"member {i} of {cfg.arch}/{cfg.dataset} missing after training"
        model = _skeleton(cfg, val.input_shape, val.num_classes, s, base_state)
        model.load_state_dict(entry["state_dict"])
        model.eval()
        models.append(model)
        keys.append(key)
        histories.append(dict(entry.get("history", {})))
    seeds = [member_seed(cfg.seed, i) for i in range(spec.n_models)]
    return Zoo(cfg, models, seeds, b_seed, keys, histories)


def train_zoos(specs: Sequence[ZooSpec], *, cache: Path | None = None, workers: int | None = None,
               show_progress: bool = True, executor: Executor | str | None = None) -> list[Zoo]:
    """Train every missing model of ``specs`` as executor jobs (shared bases in one round, then the
    members), then load all zoos from the cache. Cached models are never retrained.

    ``executor`` is an open :class:`~mergelab.executor.Executor` or a spec (``local``, ``local:N``, ``ray``,
    ``ray:ADDRESS``; see :mod:`mergelab.executor`); by default ``workers`` local processes (default
    :func:`default_workers`; one worker trains in this process). Every job trains with the same thread
    count, so the models are the same whichever executor trained them. Ray workers must see the same cache
    folder (a shared file system on a real cluster). Local workers are *spawned* processes: a script that
    calls this at import level needs the usual ``if __name__ == "__main__":`` guard.
    """
    root = cache or cache_dir()
    bases: dict[str, _Job] = {}
    members: dict[str, _Job] = {}
    loaded: dict[str, dict[str, Any]] = {}  # entries read to see whether they are cached, kept for loading

    def cached(key: str) -> bool:
        if key not in loaded and (entry := load_entry(key, root)) is not None:
            loaded[key] = entry
        return key in loaded

    for spec in specs:
        cfg = spec.config
        if cfg.init not in ("shared", "independent"):
            raise ValueError(f"init must be 'shared' or 'independent', got '{cfg.init}'")
        if cfg.base_dataset:
            a, b = (load_dataset(d, "val", cfg.split_seed) for d in (cfg.base_dataset, cfg.dataset))
            if (a.input_shape, a.num_classes) != (b.input_shape, b.num_classes):
                raise ValueError(f"base_dataset '{cfg.base_dataset}' has inputs {a.input_shape} and {a.num_classes} "
                                 f"classes but '{cfg.dataset}' has {b.input_shape} and {b.num_classes}: a shared "
                                 "start needs the same; pick datasets of one shape")
        bkey = _base_key(cfg) if cfg.init == "shared" else None
        if bkey and not cached(bkey):
            bases.setdefault(bkey, _Job(bkey, base_config(cfg), "base", base_seed(cfg.seed), cfg.pretrain_epochs,
                                        None))
        per_member = cfg.epochs if cfg.init == "shared" else cfg.epochs + cfg.pretrain_epochs
        for i in range(spec.n_models):
            s = member_seed(cfg.seed, i)
            key = _member_key(cfg, s)
            if not cached(key):
                members.setdefault(key, _Job(key, cfg, "member", s, per_member, bkey))
    if bases or members:
        if executor is None or isinstance(executor, str):
            n = workers or default_workers()
            spec_text = executor or f"local:{n if n > 1 and len(bases) + len(members) > 1 else 0}"
            with get_executor(spec_text, threads_per_job=default_threads(), show_progress=show_progress) as ex:
                _train_jobs(ex, bases, members, root)
        else:
            _train_jobs(executor, bases, members, root)
    return _load_zoos(specs, root, members, loaded)


def _train_jobs(ex: Executor, bases: Mapping[str, _Job], members: Mapping[str, _Job], root: Path) -> None:
    for label, phase in (("pre-train shared bases", bases), ("train zoo members", members)):
        if phase:
            ex.map(_run_task, [_TrainTask(job, str(root)) for job in phase.values()], desc=label)


def _load_zoos(specs: Sequence[ZooSpec], root: Path, trained: Mapping[str, object],
               loaded: Mapping[str, dict[str, Any]]) -> list[Zoo]:
    zoos = [_load_zoo(spec, root, loaded) for spec in specs]
    for zoo in zoos:
        zoo.trained = sum(1 for k in zoo.cache_keys if k in trained)
    return zoos


@dataclass(frozen=True)
class _TrainTask:
    """One training as an executor job (picklable; the thread count is set by the executor)."""

    job: _Job
    root: str


def _run_task(task: _TrainTask) -> str:
    return _run_job(task.job, task.root, torch.get_num_threads())


def train_zoo(arch: str, dataset: str, n_models: int, init: Init = "shared", *,
              config: TrainConfig | None = None, cache: Path | None = None, workers: int | None = None,
              show_progress: bool = True, executor: Executor | str | None = None, **overrides: Any) -> Zoo:
    """Train (or load from the cache) ``n_models`` members of one architecture on one dataset.

    Member ``i`` depends only on the recipe and ``i`` — never on ``n_models`` — so a zoo of 10 reuses the
    first 5 of a zoo of 5, and studies taking the first N members see nested subsets.
    ``overrides`` are :class:`TrainConfig` fields (``epochs=``, ``n_train=``, ``seed=`` …).
    """
    cfg = replace(config or TrainConfig(arch=arch, dataset=dataset), arch=arch, dataset=dataset, init=init,
                  **overrides)
    return train_zoos([ZooSpec(cfg, n_models)], cache=cache, workers=workers, show_progress=show_progress,
                      executor=executor)[0]
