"""NearSwap: take the other model's value where it is close to the base's, keep the base's where it is far.

alchemonaut 2024, the merge behind https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001 (no paper),
as implemented in mergekit (arXiv:2403.13257). Per entry, the other model's weight is ``t / |θ_1 − θ_0|``
clipped to [0, 1]: entries that differ by at most ``t`` are swapped in fully, larger differences less and less.
Element-wise, computed in the config's ``dtype`` with mergekit's operations (the same bits; float32 without one).
"""

from __future__ import annotations

import torch

from mergelab.methods.registry import MergeMethod, Param, register
from mergelab.methods.task_vectors import arithmetic_dtype


def nearswap_merge(base: torch.Tensor, other: torch.Tensor, t: float, *,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """``θ = w θ_1 + (1 − w) θ_0`` with ``w = clip(t / max(|θ_1 − θ_0|, 1e-6), 0, 1)`` entry by entry, computed
    in ``dtype`` (the config's; float32 when None, float64 stays), returned in the base's dtype."""
    out_dtype = base.dtype
    dtype = arithmetic_dtype(base, dtype)
    base, other = base.to(dtype), other.to(dtype)
    weight = (t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return (weight * other + (1 - weight) * base).to(out_dtype)


register(MergeMethod(
    name="nearswap",
    function=nearswap_merge,
    params=(Param("t", float, low=0.0, help="distance below which the other model's entry replaces the base's"),),
    summary="Per entry, move the base towards the other model by t / |θ_1 − θ_0| (fully where they are close).",
    paper="alchemonaut 2024, QuartetAnemoi-70B-t0.0001 model card "
          "(https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001), no paper; in mergekit (arXiv:2403.13257)",
    formula="θ = w θ_1 + (1 − w) θ_0,  w = clip(t / |θ_1 − θ_0|, 0, 1) entry-wise",
    min_models=1,
    max_models=1,
    elementwise=True,
    also_in=("mergekit",),
))
