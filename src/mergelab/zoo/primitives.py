"""What every training and evaluation in the zoo shares: shift augmentation, one training loop, and the batched
evaluation with top-1 accuracy in percent (:mod:`mergelab.evaluation`, which the lower layers use too).

The zoo families (:mod:`mergelab.zoo.train`), the task suites (:mod:`mergelab.zoo.task_suite`, vision and
text) and the MLP multi-task suite (:mod:`mergelab.zoo.mlp_suite`) all train through :func:`train_steps`, so
a change to the loop is made once; each keeps its own optimiser, schedule and batch order (their cached
models depend on them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mergelab.evaluation import accuracy_pct, predict_logits


def shift_augment(x: torch.Tensor, gen: torch.Generator, r: int = 1) -> torch.Tensor:
    """Random translation of every example by up to ``r`` pixels (images) or steps (1-D signals), padded
    with the batch's smallest value (zero intensity after normalisation), drawn from ``gen``."""
    nd = x.dim() - 2
    padded = F.pad(x, [r] * (2 * nd), value=float(x.amin()))
    shifts = torch.randint(0, 2 * r + 1, (x.shape[0], nd), generator=gen)
    # one gather for the whole batch: each example reads its own shifted window of the padded input
    b = torch.arange(x.shape[0])
    rows = shifts[:, 0, None] + torch.arange(x.shape[2])
    if nd == 1:
        return padded[b[:, None], :, rows].transpose(1, 2).contiguous()
    cols = shifts[:, 1, None] + torch.arange(x.shape[3])
    return padded[b[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                x: torch.Tensor, y: torch.Tensor, batches: Iterable[torch.Tensor], *,
                augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                on_step: Callable[[], None] | None = None) -> list[float]:
    """One cross-entropy step per index batch (batches are drawn lazily, so a generator shared by the batch
    order and ``augment`` is consumed in the same order as a hand-written loop); returns each step's loss."""
    losses: list[float] = []
    for idx in batches:
        xb = x[idx]
        if augment is not None:
            xb = augment(xb)
        loss = F.cross_entropy(model(xb), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step()
    return losses


__all__ = ["accuracy_pct", "predict_logits", "shift_augment", "train_steps"]
