"""SCE: select the entries where the task vectors disagree most, calculate weights from their energy, erase
minority signs, average.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024 (arXiv:2408.07990), section "SCE".

1. **Select**: keep the ``select_topk`` fraction of entries (counted among those with non-zero variance) with
   the largest variance of ``δ_i`` across the models; the same entries for every model.
2. **Calculate**: model ``i`` gets the weight ``η_i = mean(δ̂_i²) / Σ_j mean(δ̂_j²)``.
3. **Erase**: per entry, drop the ``δ̂_i`` whose sign differs from that of ``Σ_i δ̂_i`` (TIES' election).
4. ``θ = θ_0 + Σ_i η_i c_i δ̂_i / Σ_i η_i c_i`` with ``c_i`` the agreement mask.

Computed in the config's ``dtype`` with mergekit's operations (float32 without one), with mergekit's
guards: uniform weights when ``Σ_j mean(δ̂_j²) < 1e-6`` and a divisor clamped at 1e-6, and mergekit's
selection (``torch.topk``), so that ties in half precision pick the same entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.methods.registry import MergeMethod, Param, register
from mergelab.methods.task_vectors import arithmetic_dtype


def sce_select_mask(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask (shape of one task vector) of the ``int(fraction · #nonzero-variance)`` entries whose
    variance across the stacked ``task_vectors`` (population variance, over dim 0) is largest."""
    shape = task_vectors.shape[1:]
    if fraction >= 1:
        return torch.ones(shape, dtype=torch.bool, device=task_vectors.device)
    if fraction <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=task_vectors.device)
    var = torch.var(task_vectors, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * fraction)
    mask = torch.zeros(var.numel(), dtype=torch.bool)
    if k > 0:
        # torch.topk, as mergekit: in float16/bfloat16 many variances tie at the cut (2 of 60 entries in a
        # bf16 test tensor), and only the same selection rule picks the same entries. Taken on the CPU whatever
        # the device (CUDA's topk orders ties differently), where it picks the same ones on any thread count
        # (tests/test_methods_sce.py).
        mask[torch.topk(var.abs().reshape(-1).cpu(), k).indices] = True
    return mask.reshape(shape).to(var.device)


def sce_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """``mean(δ_i²) / Σ_j mean(δ_j²)`` per model (uniform when the sum is below 1e-6, as in mergekit)."""
    energy = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = float(torch.sum(energy))
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def sce_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, select_topk: float = 1.0,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """SCE on one tensor: ``θ_0 + Σ_i η_i c_i δ̂_i / Σ_i η_i c_i`` (see the module docstring), computed in
    ``dtype`` (the config's; float32 when None, float64 stays) and returned in the base's dtype."""
    if not tensors:
        return base.clone()
    out_dtype = base.dtype
    dtype = arithmetic_dtype(base, dtype)
    base = base.to(dtype)
    task_vectors = torch.stack([t.to(dtype) - base for t in tensors], dim=0)
    if select_topk < 1:
        task_vectors.mul_(sce_select_mask(task_vectors, select_topk))
    # TIES' election on the unweighted sum; a zero entry never agrees
    positive = task_vectors.sum(dim=0) >= 0
    agree = torch.where(positive, task_vectors > 0, task_vectors < 0)
    del positive
    weights = sce_weights(task_vectors).reshape(-1, *([1] * base.dim()))
    erased = agree * weights
    del agree
    merged = (task_vectors * erased).sum(dim=0)
    return (base + merged / erased.sum(dim=0).clamp(min=1e-6)).to(out_dtype)


register(MergeMethod(
    name="sce",
    function=sce_merge,
    params=(
        Param("select_topk", float, 1.0, low=0.0, high=1.0,
              help="fraction of entries kept: those whose task vectors vary most across the models"),
        Param("int8_mask", bool, False, arg=None, help="accepted for mergekit compatibility; masks are boolean here"),
    ),
    summary="Keep high-variance entries, weight each model by its task vector's energy, erase minority signs.",
    paper="Wan et al. 2024, FuseChat (SCE) (arXiv:2408.07990)",
    formula="θ = θ_0 + Σ_i η_i c_i δ̂_i / Σ_i η_i c_i,  δ̂_i = m ⊙ δ_i (top-k variance across i),  "
            "η_i ∝ mean(δ̂_i²),  c_i = [sgn δ̂_i = sgn Σ_j δ̂_j]",
    also_in=("mergekit",),
))
