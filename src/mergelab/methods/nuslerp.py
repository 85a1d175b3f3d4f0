"""NuSLERP: spherical interpolation of two models (or of their task vectors), row by row or whole-tensor.

mergekit's ``nuslerp`` (Goddard et al., mergekit, arXiv:2403.13257), SLERP as in Shoemake, "Animating rotation
with quaternion curves", SIGGRAPH 1985. Unlike ``slerp``, the two models are weighted (``t = w_1 / (w_0 + w_1)``),
a base model is optional — with one, the *task vectors* ``θ_i − θ_0`` are interpolated and added back to it —
and the angle can be taken per row (``nuslerp_flatten: false``; columns with ``nuslerp_row_wise``) instead of
over the whole tensor. Computed in the config's ``dtype`` with mergekit's operations (the same bits; float32
without one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.methods.registry import MergeMethod, Param, register
from mergelab.methods.task_vectors import arithmetic_dtype


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int = -1, flatten: bool = False,
            eps: float = 1e-8) -> torch.Tensor:
    """``(sin((1−t)Ω) v0 + sin(tΩ) v1) / sin Ω`` for each vector along ``dim`` (the whole tensor with
    ``flatten``), ``cos Ω = <v0/|v0|, v1/|v1|>``; LERP where the two are (anti)parallel (``1 − cos²Ω ≤ eps²``)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    del u0, u1
    parallel = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(parallel, 0, cos))
    sin_theta = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    out = torch.where(parallel, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, base: torch.Tensor | None = None,
                  row_wise: bool = False, flatten: bool = True, dtype: torch.dtype | None = None) -> torch.Tensor:
    """NuSLERP of exactly two models at ``t = w_1 / (w_0 + w_1)`` (0.5 when the weights sum to ~0); with a
    ``base``, ``θ_0 + nuslerp(t, θ_1 − θ_0, θ_2 − θ_0)``. Rows are the last dim, columns with ``row_wise``.
    Computed in ``dtype`` (the config's; float32 when None, float64 stays), returned in the inputs' dtype."""
    if len(tensors) != 2 or len(weights) != 2:
        raise ValueError(f"nuslerp merges exactly two models besides the base, got {len(tensors)}")
    out_dtype = tensors[0].dtype
    dtype = arithmetic_dtype(tensors[0], dtype)
    a, b = tensors[0].to(dtype), tensors[1].to(dtype)
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if row_wise else -1
    if base is None:
        return nuslerp(t, a, b, dim=dim, flatten=flatten).to(out_dtype)
    base = base.to(dtype)
    return (base + nuslerp(t, a - base, b - base, dim=dim, flatten=flatten)).to(out_dtype)


register(MergeMethod(
    name="nuslerp",
    function=nuslerp_merge,
    params=(
        Param("weight", float, 1.0, scope="model", help="relative weight: t = w_1 / (w_0 + w_1)"),
        Param("nuslerp_flatten", bool, True, arg="flatten",
              help="one angle over the whole tensor (else one per row)"),
        Param("nuslerp_row_wise", bool, False, arg="row_wise",
              help="without flatten: one angle per column instead of per row"),
    ),
    summary="Weighted SLERP of two models, or of their task vectors around an optional base, per tensor or row.",
    paper="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH); "
          "mergekit's NuSLERP, Goddard et al. 2024 (arXiv:2403.13257)",
    formula="θ = θ_0 + sin((1−t)Ω)/sin Ω · δ_1 + sin(tΩ)/sin Ω · δ_2,  t = w_2/(w_1+w_2),  "
            "cos Ω = <δ_1, δ_2>/(|δ_1||δ_2|)  (θ_0 = 0, δ_i = θ_i without a base)",
    base="optional",
    min_models=2,
    max_models=2,
    also_in=("mergekit",),
))
