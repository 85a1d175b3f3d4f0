"""CART: centred task vectors with a low-rank correction around the weight average.

Choi et al., "Revisiting Weight Averaging for Model Merging" (arXiv:2412.12153). The task vectors are
taken around the average ``θ_avg`` instead of the pretrained weights; their low-rank parts carry the
task-specific information while the rest is mostly interference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.methods.registry import MergeMethod, Param, register
from mergelab.methods.spectral import thin_svd
from mergelab.methods.weighting import weight_sum


def low_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation (truncated SVD) of a 2-D tensor."""
    if rank <= 0:
        return torch.zeros_like(matrix)
    u, s, vh = thin_svd(matrix)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]) @ vh[:r]


def rank_from_ratio(shape: torch.Size | Sequence[int], ratio: float) -> int:
    """Rank ``round(ratio · min(m, n))``, at least 1 for a positive ratio."""
    full = min(shape[0], shape[1])
    if ratio <= 0:
        return 0
    return min(full, max(1, round(ratio * full)))


def cart_merge(tensors: Sequence[torch.Tensor], *, rank_ratio: float = 0.1, lambda_: float = 1.0,
               weights: Sequence[float] | None = None, low_rank_this: bool = True,
               base: torch.Tensor | None = None, include_base: bool = False, low_rank_filter: str | None = None,
               name: str = "") -> torch.Tensor:
    """``θ_avg + λ Σ_t (N w_t / Σ_s w_s) SVD_k(θ_t − θ_avg)`` on 2-D weights, ``θ_avg`` elsewhere.

    ``θ_avg = Σ_t w_t θ_t / Σ_t w_t`` and ``k = rank_from_ratio((m, n), rank_ratio)``; with uniform
    weights the factor is 1 (the paper's formula). The factor makes the weighted centred task vectors sum
    to zero, so at full rank the result is ``θ_avg`` for any λ, with or without weights.
    With ``include_base`` the ``base`` is one more model of weight 1; ``low_rank_filter`` (``'|'``-separated
    substrings) limits the low-rank term to tensors whose ``name`` contains one of them.
    """
    if include_base and base is not None:
        tensors = [base, *tensors]
        if weights is not None:
            weights = [1.0, *weights]
    if low_rank_filter is not None:
        low_rank_this = low_rank_this and any(part in name for part in low_rank_filter.split("|"))
    if not tensors:
        raise ValueError("cart_merge needs at least one tensor")
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    ws = [1.0] * len(tensors) if weights is None else [float(w) for w in weights]
    if len(ws) != len(tensors):
        raise ValueError(f"got {len(tensors)} tensors but {len(ws)} weights")
    total = weight_sum(ws, "cart_merge")
    avg = torch.zeros(first.shape, dtype=dtype, device=first.device)
    for t, w in zip(tensors, ws, strict=True):
        avg.add_(t.to(dtype), alpha=w / total)
    if first.dim() != 2 or not low_rank_this or rank_ratio <= 0 or lambda_ == 0:
        return avg.to(first.dtype)
    k = rank_from_ratio(first.shape, rank_ratio)
    correction = torch.zeros_like(avg)
    for t, w in zip(tensors, ws, strict=True):
        correction.add_(low_rank(t.to(dtype) - avg, k), alpha=len(ws) * w / total)
    return (avg + lambda_ * correction).to(first.dtype)


register(MergeMethod(
    name="cart",
    function=cart_merge,
    params=(
        Param("weight", float, 1.0, scope="model", help="weight of this model in θ_avg"),
        Param("rank_ratio", float, 0.1, low=0.0, high=1.0, help="rank k as a fraction of min(m, n)"),
        Param("lambda", float, 1.0, help="scale of the summed low-rank centred task vectors"),
        Param("include_base", bool, False, help="count the base model as one of the averaged models"),
        Param("low_rank_filter", str, None,
              help="'|'-separated substrings of tensor names that get the low-rank term (default: all 2-D)"),
    ),
    summary="Weight average plus λ times the rank-k parts of the centred task vectors θ_t − θ_avg.",
    paper="Choi et al. 2024, Revisiting Weight Averaging for Model Merging (CART) (arXiv:2412.12153)",
    formula="θ = θ_avg + λ Σ_t (N w_t / Σ w) SVD_k(θ_t − θ_avg) on 2-D weights; θ_avg elsewhere",
    base="optional",
))
