"""Weighted / uniform averaging of weights: model soup and SWA.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
increasing inference time", ICML 2022 (arXiv:2203.05482). Izmailov et al., "Averaging Weights Leads to
Wider Optima and Better Generalization" (SWA), UAI 2018 (arXiv:1803.05407).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.kernels.weighted_sums import linear_sum
from mergelab.methods.registry import MergeMethod, Param, register
from mergelab.methods.task_vectors import divide_as_the_cpu
from mergelab.methods.weighting import weight_sum


def linear_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *,
                 normalize: bool = True) -> torch.Tensor:
    """``Σ_i w_i θ_i / Σ_i w_i`` (or the plain weighted sum when ``normalize`` is false).

    Accumulates in float32 (float64 for float64 inputs) and returns the first input's dtype. With
    ``normalize``, weights that sum to zero (up to rounding) are an error.
    """
    if not tensors:
        raise ValueError("linear_merge needs at least one tensor")
    weights = [1.0] * len(tensors) if weights is None else list(weights)
    if len(weights) != len(tensors):
        raise ValueError(f"got {len(tensors)} tensors but {len(weights)} weights")
    if normalize:
        weight_sum(weights, "linear_merge")  # refuses weights that sum to zero before any arithmetic
    fused = linear_sum(tensors, weights, normalize, _linear_torch)
    return fused if fused is not None else _linear_torch(tensors, weights, normalize)


def _linear_torch(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """:func:`linear_merge`'s arithmetic in eager torch (the compiled loop gives the same bits)."""
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    out = torch.zeros(first.shape, dtype=dtype, device=first.device)
    for tensor, weight in zip(tensors, weights, strict=True):
        out.add_(tensor, alpha=weight)  # mixed-dtype add upcasts in the kernel: no temporary copy
    if normalize:
        divide_as_the_cpu(out, float(sum(weights)))
    return out.to(first.dtype)


register(MergeMethod(
    name="linear",
    also_in=("mergekit", "FusionBench"),
    function=linear_merge,
    params=(
        Param("weight", float, 1.0, scope="model", help="mixing weight of this model"),
        Param("normalize", bool, True, help="divide by the sum of weights"),
    ),
    summary="Weighted average of all models (uniform soup, SWA).",
    paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482); "
          "Izmailov et al. 2018, SWA (arXiv:1803.05407)",
    elementwise=True,
    propagates_nonfinite=True,
    compiled=True,
    formula="θ = Σ_i w_i θ_i / Σ_i w_i",
    base="ignored",
    aliases=("soup", "swa"),
))
