"""Arcee Fusion: take the other model's value only where it changed the base a lot, by an outlier threshold.

Arcee AI 2025, "Arcee Fusion" (no paper; mergekit's reference is https://arcee.ai), as implemented in mergekit
(arXiv:2403.13257). The importance of entry ``j`` is
``|θ_1 − θ_0|_j · KL(softmax(θ_1) ‖ softmax(θ_0))`` of its row (softmax over the last dim; a 1-D tensor is one
row); entries whose importance reaches ``median + 1.5 · IQR`` (Tukey's outlier fence over the tensor) take the
other model's value, the rest keep the base's. Computed in the config's ``dtype`` with mergekit's operations
(float32 without one).

mergekit estimates the quartiles of tensors over 1,000,000 entries from a random sample (unseeded); here they
are the exact order statistics at the same positions, for every size: the same on tensors up to 1e6 entries,
deterministic above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergelab.methods.registry import MergeMethod, register
from mergelab.methods.sparsify import kth_largest
from mergelab.methods.task_vectors import arithmetic_dtype

_QUARTILES = (0.25, 0.5, 0.75)


def fusion_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``|θ_1 − θ_0| · KL(softmax(θ_1) ‖ softmax(θ_0))`` with the KL per row (last dim), broadcast on the row."""
    eps = 1e-8
    p = F.softmax(other, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


def order_statistics(values: torch.Tensor, quantiles: tuple[float, ...]) -> list[torch.Tensor]:
    """The entries at positions ``⌊q (n − 1)⌋`` (0-based, float32 product as mergekit) of the sorted values."""
    flat = values.reshape(-1)
    n = flat.numel()
    positions = (torch.tensor(quantiles) * (n - 1)).long().tolist()
    return [kth_largest(flat, n - pos).to(values.dtype) for pos in positions]


def arcee_fusion_merge(base: torch.Tensor, other: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``θ_0 + (θ_1 − θ_0) ⊙ [I ≥ Q2 + 1.5 (Q3 − Q1)]``, ``I`` = :func:`fusion_importance`, ``Q`` its quartiles;
    computed in ``dtype`` (the config's; float32 when None, float64 stays), returned in the base's dtype."""
    out_dtype = base.dtype
    if base.numel() == 0:  # no quartiles of nothing: an empty tensor is the (empty) base
        return base.clone()
    dtype = arithmetic_dtype(base, dtype)
    base, other = base.to(dtype), other.to(dtype)
    importance = fusion_importance(base, other)
    q1, median, q3 = order_statistics(importance, _QUARTILES)
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    del importance
    return (base + (other - base) * mask).to(out_dtype)


register(MergeMethod(
    name="arcee_fusion",
    function=arcee_fusion_merge,
    params=(),
    summary="Keep the base except where the other model's change is an outlier in |Δ| · KL of its row.",
    paper="Arcee AI 2025, Arcee Fusion (https://arcee.ai), no paper; in mergekit (arXiv:2403.13257)",
    formula="θ = θ_0 + [I ≥ Q_2(I) + 1.5 (Q_3(I) − Q_1(I))] ⊙ (θ_1 − θ_0),  "
            "I = |θ_1 − θ_0| · KL(softmax θ_1 ‖ softmax θ_0) per row",
    min_models=1,
    max_models=1,
    also_in=("mergekit",),
))
