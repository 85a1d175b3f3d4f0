"""Spherical linear interpolation between two models, tensor by tensor.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; popularised for LLM merging by
mergekit. The angle is measured between the flattened, normalised tensors; the interpolation is applied to
the unnormalised tensors, as in mergekit. Near-parallel (|cos| > ``dot_threshold``) pairs fall back to
linear interpolation, where SLERP is numerically unstable and LERP is equal to first order.
"""

from __future__ import annotations

import torch

from mergelab.methods.registry import MergeMethod, Param, register

_CHUNK = 1 << 20  # entries per chunk of the float32 work: bounded scratch for any tensor size


def slerp_merge(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = 0.9995,
                eps: float = 1e-8) -> torch.Tensor:
    """``sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1`` with ``cos Ω = <v0/|v0|, v1/|v1|>``.

    The statistics and coefficients are float32 tensors (float64 for float64 inputs) computed chunk by
    chunk in mergekit's order, and the result is rounded to ``v0``'s dtype: in float16 and bfloat16 the
    coefficients' last bits decide the rounding of some entries, so computing them in float64 instead
    left 1-ulp differences from mergekit (measured on tiny Llama/GPT-2 folders).
    """
    if v0.shape != v1.shape:
        raise ValueError(f"slerp_merge: shapes differ {tuple(v0.shape)} vs {tuple(v1.shape)}")
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    t_ = torch.tensor([[t]], dtype=dtype)
    n = a.shape[1]
    if n == 0:
        return v0.clone()
    starts = range(0, n, _CHUNK)

    def chunk(x: torch.Tensor, s: int) -> torch.Tensor:
        return x[:, s:s + _CHUNK].to(dtype)

    # the norm of the chunks' norms, normalised before the product (no overflow of a raw dot)
    norm_a = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(chunk(a, s), dim=1, keepdim=True) for s in starts]), dim=0)
    norm_b = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(chunk(b, s), dim=1, keepdim=True) for s in starts]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([(chunk(a, s) / norm_a * (chunk(b, s) / norm_b)).sum(dim=1, keepdim=True)
                       for s in starts]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    c0 = torch.where(linear, 1 - t_, torch.sin((1 - t_) * theta) / sin_theta)
    c1 = torch.where(linear, t_, torch.sin(t_ * theta) / sin_theta)
    out = torch.empty_like(a)
    for s in starts:
        out[:, s:s + _CHUNK] = c0 * chunk(a, s) + c1 * chunk(b, s)
    return out.reshape(v0.shape)


register(MergeMethod(
    name="slerp",
    also_in=("mergekit", "FusionBench"),
    function=slerp_merge,
    inputs={"v0": "base", "v1": "other"},
    params=(
        Param("t", float, help="interpolation factor: 0 gives the base model, 1 the other"),
        Param("dot_threshold", float, 0.9995, low=0.0, high=1.0,
              help="|cos Ω| above which LERP is used instead"),
    ),
    summary="Spherical interpolation between the base and exactly one other model.",
    paper="Shoemake 1985, Animating rotation with quaternion curves; mergekit (arXiv:2403.13257)",
    formula="θ = sin((1−t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1",
    min_models=1,
    max_models=1,
))
