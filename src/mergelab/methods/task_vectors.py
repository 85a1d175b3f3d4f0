"""Generalized task arithmetic: the shared core of task arithmetic, TIES, DARE and Breadcrumbs.

``merged = base + λ · Σ_i w_i m_i(δ_i) c_i / D`` with ``δ_i = θ_i − θ_base``, a sparsification mask
``m_i`` (identity, magnitude top-k, random drop, outlier trim), an optional sign-consensus mask ``c_i``
(TIES' elect step) and ``D = Σ_i w_i c_i`` when ``normalize`` (disjoint mean), else 1.

The sum is accumulated model by model instead of stacking all deltas: with consensus it takes two passes
(elect signs, then sum the agreeing entries), keeping each sparsified delta in compact form in between,
so peak memory stays at the inputs plus three tensors and the compact deltas.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

Sparsifier = Callable[[int, torch.Tensor], torch.Tensor]
"""``(model_index, delta) -> sparsified delta``; must return the same result when called twice."""

Consensus = Literal["sum", "count"]


def _compute_dtype(base: torch.Tensor) -> torch.dtype:
    return torch.float64 if base.dtype == torch.float64 else torch.float32


def generalized_task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsify: Sparsifier | None = None,
    consensus: Consensus | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    if len(tensors) != len(weights):
        raise ValueError(f"got {len(tensors)} tensors but {len(weights)} weights")
    if not tensors:
        return base.clone()
    dtype = _compute_dtype(base)
    base_c = base.to(dtype)

    def weighted_delta(i: int) -> torch.Tensor:
        delta = tensors[i].to(dtype) - base_c
        if sparsify is not None:
            delta = sparsify(i, delta)
        return delta.mul_(weights[i])

    if consensus is None:
        mixed = torch.zeros_like(base_c)
        for i in range(len(tensors)):
            mixed += weighted_delta(i)
        divisor: torch.Tensor | float = float(sum(weights))
        if abs(divisor) < 1e-8:
            divisor = 1.0
    else:
        # Pass 1 elects the sign. Sparsification (a sort-like top-k, or a random draw) is the costly
        # step, so each sparsified delta is kept compactly (mask + kept values: 1 + 4·density bytes per
        # entry instead of 4) for pass 2 rather than recomputed.
        elected = torch.zeros_like(base_c)
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i in range(len(tensors)):
            wd = weighted_delta(i)
            elected += wd if consensus == "sum" else wd.sign()
            if sparsify is not None:
                nonzero = wd != 0
                kept.append((nonzero, wd[nonzero]))
        majority = torch.where(elected >= 0, 1.0, -1.0).to(dtype)
        del elected
        mixed = torch.zeros_like(base_c)
        div = torch.zeros_like(base_c)
        for i in range(len(tensors)):
            if sparsify is not None:
                nonzero, values = kept[i]
                wd = torch.zeros_like(base_c).masked_scatter_(nonzero, values)
            else:
                wd = weighted_delta(i)
            agree = wd.sign() == majority
            mixed += wd * agree
            div += agree.to(dtype) * weights[i]
        div[div == 0] = 1
        divisor = div
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base_c + mixed).to(base.dtype)
