"""Generalized task arithmetic: the shared core of task arithmetic, TIES, DARE and Breadcrumbs.

``merged = base + λ · Σ_i w_i m_i(δ_i) c_i / D`` with ``δ_i = θ_i − θ_base``, a sparsification mask
``m_i`` (identity, magnitude top-k, random drop, outlier trim), an optional sign-consensus mask ``c_i``
(TIES' elect step) and ``D = Σ_i w_i c_i`` when ``normalize`` (disjoint mean), else 1.

The sum is accumulated model by model instead of stacking all deltas: with consensus it takes two passes
(elect signs, then sum the agreeing entries), keeping each sparsified delta in compact form in between,
so peak memory stays at the inputs plus three tensors and the compact deltas.

Arithmetic dtype: with ``dtype`` (a config's ``dtype``) every step rounds to it where mergekit's does —
deltas, weights, the weighted deltas, the sums over models (accumulated in float32, like torch's
half-precision reductions, and rounded once), the division and the final addition — so float16/bfloat16
merges agree with mergekit bit for bit. Computing in float32 instead flipped TIES sign votes and top-k
boundaries on about 3 % of entries (max 0.03–0.07, issue 12). Without ``dtype``: float32 (float64 inputs:
float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from mergelab.methods.weighting import weight_sum

Sparsifier = Callable[[int, torch.Tensor], torch.Tensor]
"""``(model_index, delta) -> sparsified delta``. ``delta`` is a fresh tensor owned by the caller: a
sparsifier may (and, to save memory, should) modify and return it in place."""

Consensus = Literal["sum", "count"]

_CHUNK = 1 << 20  # entries per chunk of the element-wise steps (4 MiB of float32)


def arithmetic_dtype(base: torch.Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype a task-vector method computes in: ``dtype`` if given, else float32 (float64 stays)."""
    if dtype is not None:
        return dtype
    return torch.float64 if base.dtype == torch.float64 else torch.float32


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of half-precision values accumulate in float32 and are rounded once (torch's reductions)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` as the nearest ``dtype`` number: mergekit holds weights in a tensor of the arithmetic dtype."""
    return float(torch.tensor(value, dtype=dtype))


def generalized_task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsify: Sparsifier | None = None,
    consensus: Consensus | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``dtype``: the arithmetic dtype (see the module's notes); the result has the base's dtype."""
    if len(tensors) != len(weights):
        raise ValueError(f"got {len(tensors)} tensors but {len(weights)} weights")
    if not tensors:
        return base.clone()
    dtype = arithmetic_dtype(base, dtype)
    acc = accumulator_dtype(dtype)
    weights = [rounded(w, dtype) for w in weights]

    def weighted_delta(i: int) -> torch.Tensor:
        delta = _delta(tensors[i], base, dtype)
        if sparsify is not None:
            delta = sparsify(i, delta)
        return delta.mul_(weights[i])

    if consensus is None:
        total = torch.zeros_like(base, dtype=acc)
        for i in range(len(tensors)):
            total += weighted_delta(i)
        mixed = total.to(dtype)
        del total
        if normalize:
            weight_sum(weights, "normalize")  # the one rule: weights summing to zero are refused
            mixed /= rounded(math.fsum(weights), dtype)
    else:
        # Pass 1 elects the sign. Sparsification (a sort-like top-k, or a random draw) is the costly
        # step, so each sparsified delta is kept compactly (mask + kept values: 1 + 4·density bytes per
        # entry instead of 4) for pass 2 rather than recomputed.
        elected = torch.zeros_like(base, dtype=acc)
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i in range(len(tensors)):
            wd = weighted_delta(i)
            elected += wd if consensus == "sum" else wd.sign()
            if sparsify is not None:
                nonzero = wd != 0
                kept.append((nonzero, wd[nonzero]))
            del wd
        # the vote is rounded to the arithmetic dtype before its sign is read, as mergekit's sum is
        positive = (elected.to(dtype) >= 0).reshape(-1)
        del elected
        mixed = _disjoint_sum(base, tensors, weights, kept if sparsify is not None else None, positive,
                              dtype, normalize)
    if lambda_ != 1:
        mixed *= lambda_
    return mixed.add_(base.to(dtype)).to(base.dtype)


def _delta(tensor: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor − base`` in ``dtype``, as a fresh contiguous tensor the caller owns.

    Subtracted chunk by chunk: a mixed-dtype ``sub_`` (bf16 base into a float32 delta) would first convert
    the whole base, one more tensor of memory.
    """
    delta = tensor.to(dtype, copy=True, memory_format=torch.contiguous_format)
    for d, b in zip(delta.view(-1).split(_CHUNK), base.reshape(-1).split(_CHUNK), strict=True):
        d.sub_(b)
    return delta


def _disjoint_sum(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                  kept: list[tuple[torch.Tensor, torch.Tensor]] | None, positive: torch.Tensor,
                  dtype: torch.dtype, normalize: bool) -> torch.Tensor:
    """Pass 2 of the sign election: Σ_i w_i δ_i where sgn δ_i agrees with the elected sign (``positive``:
    elected ≥ 0), divided entry-wise by Σ_i w_i [agree] when ``normalize``.

    Every step is element-wise, so it runs over flat chunks: only the result is tensor-sized, which keeps
    the peak of TIES/DARE-TIES near the inputs plus two tensors. Chunking changes no bit of the result.
    """
    n = base.numel()
    acc_dtype = accumulator_dtype(dtype)
    mixed = torch.zeros(n, dtype=dtype, device=base.device)
    base_flat = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors] if kept is None else []
    masks = [nz.reshape(-1) for nz, _ in kept] if kept is not None else []
    starts = list(range(0, n, _CHUNK))
    # where each chunk's kept values begin in model i's compact value list
    offsets = [[0, *torch.tensor([int(torch.count_nonzero(c)) for c in m.split(_CHUNK)]).cumsum(0).tolist()]
               for m in masks]
    for c, a in enumerate(starts):
        b = min(n, a + _CHUNK)
        pos = positive[a:b]
        acc = torch.zeros(b - a, dtype=acc_dtype, device=base.device)
        div = torch.zeros(b - a, dtype=acc_dtype, device=base.device) if normalize else None
        for i, w in enumerate(weights):
            if kept is not None:
                wd = torch.zeros(b - a, dtype=dtype, device=base.device).masked_scatter_(
                    masks[i][a:b], kept[i][1][offsets[i][c]:offsets[i][c + 1]])
            else:
                wd = _delta(flats[i][a:b], base_flat[a:b], dtype).mul_(w)
            # sign(wd) == elected sign (+1 where elected >= 0, else −1); zeros never agree
            agree = torch.where(pos, wd > 0, wd < 0)
            acc += wd.mul_(agree)
            if div is not None:
                div.add_(agree, alpha=w)
        out = mixed[a:b]
        out.copy_(acc)  # the sum over models, rounded once to the arithmetic dtype
        if div is not None:
            rounded_div = div.to(dtype)
            rounded_div[rounded_div == 0] = 1
            out /= rounded_div
    return mixed.reshape(base.shape)
