"""Model Breadcrumbs: sparsify task vectors by dropping both the largest outliers and the smallest entries.

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", ECCV 2024
(arXiv:2312.06795).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.methods.registry import MergeMethod, Param, TopKPass, register
from mergelab.methods.sparsify import TIE_ORDERS, TieOrder, TopK, band_of_keys, outlier_mask
from mergelab.methods.task_vectors import Consensus, generalized_task_arithmetic, masked_by_rules, rules_of


def breadcrumbs_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                      densities: Sequence[float], gammas: Sequence[float], *, lambda_: float = 1.0,
                      normalize: bool = False, consensus: Consensus | None = None, rescale: bool = False,
                      dtype: torch.dtype | None = None, topk: Sequence[TopK] | None = None,
                      offset: int = 0, tie_orders: Sequence[TieOrder] | None = None) -> torch.Tensor:
    """Keep the ``density`` fraction of each task vector after removing its top ``gamma`` fraction by
    magnitude (scaled back to its L1 norm with ``rescale``, as mergekit can), then task arithmetic (or
    TIES election with ``consensus``), computed in ``dtype`` (float32 when None).

    ``topk`` (without rescale): each model's two-sided rank rule (:func:`~mergelab.methods.sparsify.band_of_keys`)
    computed over the whole tensor by the engine, which then merges the tensor in flat pieces; ``offset`` is
    where this piece starts in the flat tensor. The rescale needs the L1 norms of each whole task vector
    before and after its mask (two more passes, summed in torch's order): with it the tensor merges whole.
    ``tie_orders``: which magnitudes tied at an edge of model ``i``'s band are kept
    (:data:`~mergelab.methods.sparsify.TieOrder`; None: ``"sort"``, mergekit's)."""
    if topk is not None and rescale:
        raise ValueError("breadcrumbs: per-tensor rank rules apply without rescale only")

    orders: Sequence[TieOrder] = tie_orders or ["sort"] * len(tensors)
    if topk is None and not rescale:  # a whole tensor: its rules, as a streamed one's
        topk = rules_of(base, tensors, dtype, lambda i, keys: band_of_keys(keys, densities[i], gammas[i],
                                                                           tie_order=orders[i], overwrite=True))
    if topk is not None:
        return masked_by_rules(base, tensors, weights, topk, offset, consensus=consensus, normalize=normalize,
                               lambda_=lambda_, dtype=dtype)

    def keep(i: int, delta: torch.Tensor) -> torch.Tensor:
        return outlier_mask(delta, densities[i], gammas[i], orders[i])

    return generalized_task_arithmetic(base, tensors, weights, keep=keep, rescale=rescale, consensus=consensus,
                                       normalize=normalize, lambda_=lambda_, dtype=dtype)


def _params() -> tuple[Param, ...]:
    return (
        Param("weight", float, 1.0, scope="model", help="scale of this model's task vector"),
        Param("density", float, 1.0, scope="model", low=0.0, high=1.0, help="fraction of entries kept"),
        Param("gamma", float, 0.01, scope="model", low=0.0, high=1.0,
              help="fraction of largest entries dropped"),
        Param("lambda", float, 1.0, help="global scale of the merged task vector"),
        Param("normalize", bool, False, help="divide by the (agreeing) weights"),
        Param("rescale", bool, False, help="scale each sparsified task vector back to its L1 norm (mergekit)"),
        Param("int8_mask", bool, False, arg=None, help="accepted for mergekit compatibility; masks are boolean here"),
        Param("tie_order", str, "sort", scope="model", choices=TIE_ORDERS,
              help="magnitudes tied at an edge of the band: kept in torch's CPU sort order (mergekit's) or a "
                   "stable sort's (lowest index first; same on every device, no sort replayed)"),
    )


_PAPER = "Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795)"
# each model's band of magnitude ranks, found over the whole task vector, then the tensor merged in pieces
_TOPK_PASS = TopKPass(applies=lambda params: not params["rescale"],
                      of_keys=lambda keys, p, positions: band_of_keys(keys, p["density"], p["gamma"],
                                                                      tie_order=p["tie_order"], overwrite=True,
                                                                      positions=positions),
                      of_delta=lambda delta, p: outlier_mask(delta, p["density"], p["gamma"], p["tie_order"]))
register(MergeMethod(
    name="breadcrumbs", function=breadcrumbs_merge, params=_params(),
    also_in=("mergekit",),
    summary="Drop the largest (γ) and smallest task-vector entries, keep a density fraction, sum.",
    paper=_PAPER, formula="θ = θ_0 + λ Σ_i w_i (m_i ⊙ δ_i),  m_i keeps ranks (γ, γ+density] by |δ_i|",
    topk_pass=_TOPK_PASS, compiled=True,
))
register(MergeMethod(
    name="breadcrumbs_ties", function=breadcrumbs_merge, params=_params(), fixed={"consensus": "sum"},
    also_in=("mergekit",),
    summary="Breadcrumbs sparsification followed by TIES sign election.",
    paper=_PAPER, topk_pass=_TOPK_PASS, compiled=True,
    formula="θ = θ_0 + λ Σ_i w_i [sgn(δ̂_i)=s] δ̂_i,  s = sgn Σ_i w_i δ̂_i,  δ̂_i = m_i ⊙ δ_i "
            "(Breadcrumbs mask; ÷ Σ_i w_i [sgn(δ̂_i)=s] with normalize)",
))
