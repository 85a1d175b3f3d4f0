"""The one batched evaluation: a model's outputs over many inputs, a batch at a time, and one accuracy scale.

Torch only (a foundation module, like :mod:`mergelab.types`), so that every layer can use it: ``align/`` for
the loss and accuracy along interpolation paths, :mod:`mergelab.ensemble` for features and logits, the zoo and
the studies for accuracies. Accuracy is always in percent (0–100), named ``*_pct``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

Out = TypeVar("Out", torch.Tensor, tuple[torch.Tensor, ...])


@torch.no_grad()
def in_batches(forward: Callable[[torch.Tensor], Out], x: torch.Tensor, batch_size: int = 500) -> Out:
    """``forward`` over ``x`` in slices of ``batch_size`` rows, concatenated (each part of a tuple on its own)."""
    parts = [forward(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    if parts and isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]
    return torch.cat(parts)  # type: ignore[arg-type,return-value]


def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Logits of ``model`` in eval mode, ``batch_size`` examples at a time (its training mode restored after)."""
    was = model.training
    model.eval()
    try:
        return in_batches(model, x, batch_size)
    finally:
        model.train(was)


def correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example, whether the top-1 prediction is right (bool): the input of paired bootstraps."""
    return logits.argmax(1) == y


def accuracy_pct(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent (0–100)."""
    return 100.0 * float(correct(logits, y).double().mean())


def mean_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy in nats, summed in float64 (so the order of the sum does not matter)."""
    return float(F.cross_entropy(logits.double(), y, reduction="sum")) / max(1, y.shape[0])


__all__ = ["accuracy_pct", "correct", "in_batches", "mean_cross_entropy", "predict_logits"]
