"""TIES-merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023 (arXiv:2306.01708).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from mergelab.methods.registry import MergeMethod, Param, TopKPass, register
from mergelab.methods.sparsify import TIE_ORDERS, TieOrder, TopK, magnitude_mask, threshold_mask, topk_of_keys
from mergelab.methods.task_vectors import Consensus, generalized_task_arithmetic, masked_by_rules, rules_of


def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
               densities: Sequence[float], *, lambda_: float = 1.0, normalize: bool = True,
               consensus: Consensus = "sum", thresholds: Sequence[float] | None = None,
               rescale: bool = False, dtype: torch.dtype | None = None,
               scope: Literal["tensor", "global"] | None = None, topk: Sequence[TopK] | None = None,
               offset: int = 0, tie_orders: Sequence[TieOrder] | None = None) -> torch.Tensor:
    """TIES on one tensor.

    1. trim: keep the ``densities[i]`` fraction of largest-magnitude entries of each task vector
       (or, for global scope, the entries at or above ``thresholds[i]``, computed over the whole model),
       scaled back to the task vector's L1 norm with ``rescale`` (mergekit's option);
    2. elect: per entry, the sign of ``Σ_i w_i δ̂_i`` (``consensus="sum"``, the paper) or of the sign count;
    3. disjoint merge: average (``normalize``) only the weighted entries that agree with the elected sign.

    ``tie_orders``: which magnitudes tied at model ``i``'s k-th rank its trim keeps
    (:data:`~mergelab.methods.sparsify.TieOrder`; None: ``"sort"``, mergekit's).

    ``dtype`` is the arithmetic dtype (float32 when None; see ``generalized_task_arithmetic``). ``scope``
    (the config's) says which trim applies: ``"tensor"`` ignores ``thresholds``, ``"global"`` requires them
    (silently falling back to per-tensor top-k would be another method); None: thresholds when given.

    ``topk`` (per-tensor scope): each model's top-k rule computed over the whole tensor by the engine,
    which then merges the tensor in flat pieces; ``offset`` is where this piece starts in the flat tensor.
    """
    if scope == "global" and thresholds is None:
        raise ValueError("ties with scope: global needs per-model magnitude thresholds computed over the "
                         "whole model, and none were given")
    if scope == "tensor":
        thresholds = None

    if topk is not None and (thresholds is not None or rescale):
        raise ValueError("ties: per-tensor top-k rules apply to scope: tensor without rescale only")

    orders: Sequence[TieOrder] = tie_orders or ["sort"] * len(tensors)
    if topk is None and thresholds is None and not rescale:  # a whole tensor: its rules, as a streamed one's
        topk = rules_of(base, tensors, dtype,
                        lambda i, keys: topk_of_keys(keys, densities[i], tie_order=orders[i], overwrite=True))
    if topk is not None:
        return masked_by_rules(base, tensors, weights, topk, offset, consensus=consensus, normalize=normalize,
                               lambda_=lambda_, dtype=dtype)

    def keep(i: int, delta: torch.Tensor) -> torch.Tensor:
        if thresholds is not None:
            return threshold_mask(delta, thresholds[i])
        return magnitude_mask(delta, densities[i], orders[i])

    return generalized_task_arithmetic(base, tensors, weights, keep=keep, rescale=rescale, consensus=consensus,
                                       normalize=normalize, lambda_=lambda_, dtype=dtype)


register(MergeMethod(
    name="ties",
    also_in=("mergekit", "FusionBench"),
    function=ties_merge,
    params=(
        Param("weight", float, 1.0, scope="model", help="scale of this model's task vector"),
        Param("density", float, 1.0, scope="model", low=0.0, high=1.0,
              help="fraction of largest-magnitude task-vector entries kept"),
        Param("lambda", float, 1.0, help="global scale of the merged task vector"),
        Param("normalize", bool, True, help="disjoint mean: divide by the weights that agree with the sign"),
        Param("consensus", str, "sum", choices=("sum", "count"), help="sign election rule"),
        Param("scope", str, "tensor", choices=("tensor", "global"),
              help="trim per tensor (mergekit) or with one magnitude threshold per model (paper)"),
        Param("rescale", bool, False, help="scale each trimmed task vector back to its L1 norm (mergekit)"),
        Param("int8_mask", bool, False, arg=None, help="accepted for mergekit compatibility; masks are boolean here"),
        Param("tie_order", str, "sort", scope="model", choices=TIE_ORDERS,
              help="magnitudes tied at the k-th rank: kept in torch's CPU sort order (mergekit's) or a stable "
                   "sort's (lowest index first; same on every device, no sort replayed)"),
    ),
    topk_pass=TopKPass(applies=lambda params: params["scope"] == "tensor" and not params["rescale"],
                       of_keys=lambda keys, p, positions: topk_of_keys(keys, p["density"], tie_order=p["tie_order"],
                                                                       overwrite=True, positions=positions),
                       of_delta=lambda delta, p: magnitude_mask(delta, p["density"], p["tie_order"])),
    compiled=True,
    summary="Trim each task vector to its top-k entries, elect a sign per entry, average those that agree.",
    paper="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
    formula="θ = θ_0 + λ Σ_i w_i [sgn(δ̂_i)=γ] δ̂_i / Σ_i w_i [sgn(δ̂_i)=γ],  γ = sgn Σ_i w_i δ̂_i",
))
