"""Multi-SLERP: a weighted mean of any number of models on the hypersphere (barycentric SLERP).

Goddard 2025, "Multi-SLERP" (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea), as in mergekit
(arXiv:2403.13257); spherical averages after Buss & Fillmore 2001, "Spherical averages and applications to
spherical splines and interpolation" (ACM TOG 20(2)). The tensors (task vectors with a base) are projected on
the unit sphere, averaged in the tangent space at their normalised weighted Euclidean mean, mapped back with
the exponential map and scaled by the weighted mean of their norms. One step, no iteration (``karcher``
iterates). Computed in the config's ``dtype`` with mergekit's operations (the same bits; float32 without one).

Because the tangent space is taken at the weighted mean direction ``μ`` itself, the weighted tangent vectors sum
to ``m − <m, μ> μ = 0`` (``m = Σ w_i u_i = |m| μ``): the step is zero up to rounding, and the result is the
normalised weighted mean of the directions times the weighted mean norm — not the spherical (Karcher) mean,
which ``karcher`` computes. tests/test_methods_multislerp.py checks both facts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.methods.registry import MergeMethod, Param, register
from mergelab.methods.task_vectors import arithmetic_dtype


def multislerp_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
                     base: torch.Tensor | None = None, normalize_weights: bool = True,
                     eps: float = 1e-8, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``θ_0 + r̄ · exp_μ(Σ_i w_i log_μ(u_i))`` with ``u_i = δ_i/|δ_i|``, ``μ`` the normalised ``Σ w_i u_i``,
    ``r̄ = Σ w_i |δ_i|`` (``δ_i = θ_i − θ_0``, or ``θ_i`` without a base); ``log_μ`` is the tangent projection
    ``u − <u, μ> μ`` (mergekit's first-order one). One model is returned as is. Computed in ``dtype`` (the
    config's; float32 when None, float64 stays), returned in the inputs' dtype."""
    if len(tensors) != len(weights):
        raise ValueError(f"got {len(tensors)} tensors but {len(weights)} weights")
    if not tensors:
        raise ValueError("multislerp needs at least one model")
    if len(tensors) == 1:
        return tensors[0]
    out_dtype = tensors[0].dtype
    dtype = arithmetic_dtype(tensors[0], dtype)
    stacked = torch.stack([t.to(dtype) for t in tensors], dim=0)
    if base is not None:
        base = base.to(dtype)
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        if abs(sum(weights)) < 1e-12:
            raise ValueError("multislerp: the weights sum to zero; change them or set normalize_weights: false")
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] == 2:  # two antipodal directions: mergekit falls back to the linear mix
            out = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
            return (out + base if base is not None else out).to(out_dtype)
        raise ValueError("multislerp: the weighted mean of the unit tensors is zero (antipodal models whose "
                         "weights cancel); change the weights")
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangent * w.view(-1, 1)).sum(0)
    step_norm = torch.norm(step) + eps
    out = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return (out + base if base is not None else out).to(out_dtype)


register(MergeMethod(
    name="multislerp",
    function=multislerp_merge,
    params=(
        Param("weight", float, 1.0, scope="model", help="weight of this model in the spherical mean"),
        Param("normalize_weights", bool, True, help="divide the weights by their sum"),
        Param("eps", float, 1e-8, low=0.0, help="added to norms before dividing by them"),
    ),
    summary="Weighted spherical mean of any number of models (or task vectors), rescaled to their mean norm.",
    paper="Goddard 2025, Multi-SLERP (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea), in mergekit "
          "(arXiv:2403.13257); Buss & Fillmore 2001, Spherical averages (ACM TOG)",
    formula="θ = θ_0 + (Σ_i w_i |δ_i|) · (cos|v| μ + sin|v| v/|v|),  v = Σ_i w_i (u_i − <u_i, μ> μ),  "
            "u_i = δ_i/|δ_i|,  μ ∝ Σ_i w_i u_i",
    base="optional",
    min_models=1,
    also_in=("mergekit",),
))
