"""Fisher-weighted averaging: each parameter averaged with weights from its diagonal Fisher information.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022 (arXiv:2111.09832).
The Fisher diagonals are statistics of each model on its own task's data; compute them with
:func:`mergelab.statistics.diagonal_fisher` and pass them in (``stats``): this function never sees data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.methods.registry import MergeMethod, Param, register


def fisher_merge(tensors: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor],
                 weights: Sequence[float] | None = None, *, eps: float = 1e-8) -> torch.Tensor:
    """``θ = Σ_i w_i F_i ⊙ θ_i / Σ_i w_i F_i`` elementwise, with ``F_i`` floored at ``eps``.

    The floor keeps entries that no model's data touched (zero Fisher everywhere) at the plain weighted
    average instead of 0/0.
    """
    if len(tensors) != len(fishers):
        raise ValueError(f"got {len(tensors)} tensors but {len(fishers)} Fisher diagonals")
    ws = [1.0] * len(tensors) if weights is None else list(weights)
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    num = torch.zeros(first.shape, dtype=dtype, device=first.device)
    den = torch.zeros_like(num)
    for t, f, w in zip(tensors, fishers, ws, strict=True):
        if f.shape != t.shape:
            raise ValueError(f"Fisher diagonal of shape {tuple(f.shape)} for a tensor of shape {tuple(t.shape)}")
        fw = f.to(device=first.device, dtype=dtype).clamp_min(eps) * w
        num += fw * t.to(dtype)
        den += fw
    return (num / den).to(first.dtype)


register(MergeMethod(
    name="fisher",
    also_in=("FusionBench",),
    function=fisher_merge,
    inputs={"fishers": "stats"},
    params=(
        Param("weight", float, 1.0, scope="model", help="scale of this model's Fisher"),
        Param("eps", float, 1e-8, low=0.0, help="floor of the Fisher diagonal"),
    ),
    summary="Per-parameter average weighted by each model's diagonal Fisher information.",
    paper="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (arXiv:2111.09832)",
    formula="θ = Σ_i w_i F_i ⊙ θ_i / Σ_i w_i F_i",
    base="ignored",
    needs_stats=True,
))
