"""Loss and accuracy along the linear path θ(α) = (1 − α) θ_A + α θ_B, and the barrier height.

The barrier (Frankle et al. 2020; Entezari et al. 2022) is the largest rise of the loss above the straight
line between the endpoints' losses: ``max_α L(θ(α)) − ((1 − α) L(θ_A) + α L(θ_B))``. It is zero when the
two models lie in one linearly connected basin. For accuracy the same gap is measured downwards.
Interpolation goes through :func:`mergelab.merge_state_dicts` (method ``linear``), like every other merge.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mergelab.align.bn_reset import reset_bn_stats
from mergelab.evaluation import accuracy_pct, correct, in_batches, mean_cross_entropy, predict_logits
from mergelab.types import StateDict


@dataclass(frozen=True)
class PathResult:
    alphas: list[float]
    losses: list[float]
    """Mean cross-entropy (nats) at each α."""
    accuracies_pct: list[float]
    """Top-1 accuracy (%) at each α."""

    @property
    def loss_barrier(self) -> float:
        return barrier_height(self.alphas, self.losses)

    @property
    def accuracy_barrier(self) -> float:
        """The largest drop of accuracy below the straight line between the endpoints, in points."""
        return barrier_height(self.alphas, [-a for a in self.accuracies_pct])


def barrier_height(alphas: Sequence[float], values: Sequence[float]) -> float:
    """``max_α [v(α) − ((1 − α) v(0) + α v(1))]``, with ``alphas`` running from 0 to 1 (never negative)."""
    if len(alphas) != len(values) or len(alphas) < 2:
        raise ValueError("need matching alphas and values, at least the two endpoints")
    a = np.asarray(alphas, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    line = v[0] + a * (v[-1] - v[0])  # exactly v(0) everywhere when the endpoints are equal
    return float(max(0.0, np.max(v - line)))


def interpolate(a: StateDict, b: StateDict, alpha: float) -> dict[str, torch.Tensor]:
    """``(1 − α) a + α b`` tensor by tensor (integer buffers such as BN counters come from ``a``).

    The endpoints are returned as exact copies: a weighted average with a zero weight is exact anyway, but
    this keeps the path's endpoints bit-identical to the models whatever the method's arithmetic.
    """
    if alpha == 0.0:
        return {k: v.clone() for k, v in a.items()}
    if alpha == 1.0:
        return {k: (b[k] if v.is_floating_point() else v).clone() for k, v in a.items()}
    out = {}
    for k, va in a.items():
        if not va.is_floating_point():
            out[k] = va.clone()
            continue
        # the arithmetic of mergelab.methods.linear (float32 accumulator, divide by the weights' sum), so a
        # path point equals merge_state_dicts([a, b], "linear", weights=[1 − α, α]) bit for bit
        acc = torch.zeros(va.shape, dtype=torch.float64 if va.dtype == torch.float64 else torch.float32)
        acc.add_(va, alpha=1.0 - alpha).add_(b[k], alpha=alpha).div_((1.0 - alpha) + alpha)
        out[k] = acc.to(va.dtype)
    return out


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy in nats, accuracy in percent) in eval mode, from one batched pass
    (:mod:`mergelab.evaluation`)."""
    model.eval()
    device = next(model.parameters()).device
    logits = in_batches(lambda xb: model(xb.to(device)), x, batch_size)
    target = y.to(device)
    return mean_cross_entropy(logits, target), accuracy_pct(logits, target)


def linear_path(model: nn.Module, a: StateDict, b: StateDict, x: torch.Tensor, y: torch.Tensor, *,
                points: int = 25, bn_reset_x: torch.Tensor | None = None, bn_batches: int = 10,
                seed: int = 0) -> PathResult:
    """Loss and accuracy on (``x``, ``y``) at ``points`` evenly spaced α ∈ [0, 1].

    ``model`` is a skeleton of the right architecture (its weights are not changed). With ``bn_reset_x``,
    BatchNorm statistics are re-estimated on it at every interior point (the endpoints keep their own).
    """
    if points < 2:
        raise ValueError("a path needs at least 2 points")
    net = copy.deepcopy(model)
    alphas = [float(v) for v in np.linspace(0.0, 1.0, points)]
    losses, accs = [], []
    for alpha in alphas:
        net.load_state_dict(interpolate(a, b, alpha))
        if bn_reset_x is not None and 0.0 < alpha < 1.0:
            reset_bn_stats(net, bn_reset_x, num_batches=bn_batches, seed=seed)
        loss, acc = evaluate(net, x, y)
        losses.append(loss)
        accs.append(acc)
    return PathResult(alphas, losses, accs)


@torch.no_grad()
def path_example_losses(model: nn.Module, a: StateDict, b: StateDict, x: torch.Tensor, y: torch.Tensor,
                        alphas: Sequence[float], *, bn_reset_x: torch.Tensor | None = None, bn_batches: int = 10,
                        seed: int = 0, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Each test example's cross-entropy and 0/1 correctness at every α: two ``(len(alphas), examples)``
    tensors, for a bootstrap of the barrier over test examples (its mean over examples is :func:`linear_path`'s
    loss). BatchNorm statistics are re-estimated on ``bn_reset_x`` at interior points, as there."""
    net = copy.deepcopy(model)
    losses, right = [], []
    for alpha in alphas:
        net.load_state_dict(interpolate(a, b, float(alpha)))
        if bn_reset_x is not None and 0.0 < alpha < 1.0:
            reset_bn_stats(net, bn_reset_x, num_batches=bn_batches, seed=seed)
        logits = predict_logits(net, x, batch_size)
        losses.append(F.cross_entropy(logits, y, reduction="none").double())
        right.append(correct(logits, y).double())
    return torch.stack(losses), torch.stack(right)


def barrier_heights(alphas: Sequence[float], curves: np.ndarray) -> np.ndarray:
    """:func:`barrier_height` of every row of ``curves`` (shape ``(..., len(alphas))``) at once."""
    a = np.asarray(alphas, dtype=np.float64)
    line = (1 - a) * curves[..., :1] + a * curves[..., -1:]
    return np.maximum(0.0, (curves - line).max(-1))
