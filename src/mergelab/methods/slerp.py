"""Spherical linear interpolation between two models, tensor by tensor.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; popularised for LLM merging by
mergekit. The angle is measured between the flattened, normalised tensors; the interpolation is applied to
the unnormalised tensors, as in mergekit. Near-parallel (|cos| > ``dot_threshold``) pairs fall back to
linear interpolation, where SLERP is numerically unstable and LERP is equal to first order.
"""

from __future__ import annotations

import math

import torch

from mergelab.methods.registry import MergeMethod, Param, TensorInputs, register


def slerp_merge(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = 0.9995,
                eps: float = 1e-8) -> torch.Tensor:
    """``sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1`` with ``cos Ω = <v0/|v0|, v1/|v1|>``."""
    if v0.shape != v1.shape:
        raise ValueError(f"slerp_merge: shapes differ {tuple(v0.shape)} vs {tuple(v1.shape)}")
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    # a is our own copy (the result is built in it); b may alias v1 and is only read
    a = v0.to(dtype, copy=True, memory_format=torch.contiguous_format)
    b = v1.to(dtype)
    norm_a = float(torch.linalg.vector_norm(a))
    norm_b = float(torch.linalg.vector_norm(b))
    norm_a = norm_a if norm_a > eps else 1.0
    norm_b = norm_b if norm_b > eps else 1.0
    # <a/|a|, b/|b|> without materialising the normalised tensors (memory: two tensors, not five)
    dot = min(1.0, max(-1.0, float(torch.dot(a.reshape(-1), b.reshape(-1))) / (norm_a * norm_b))) \
        if a.numel() else 1.0
    if abs(dot) > dot_threshold:
        c0, c1 = 1 - t, t
    else:
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        c0, c1 = math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta
    out = a.mul_(c0).add_(b, alpha=c1)
    return out.to(v0.dtype)


def _adapter(x: TensorInputs) -> torch.Tensor:
    assert x.base is not None and len(x.tensors) == 1
    return slerp_merge(x.params["t"], x.base, x.tensors[0], dot_threshold=x.params["dot_threshold"])


register(MergeMethod(
    name="slerp",
    also_in=("mergekit", "FusionBench"),
    adapter=_adapter,
    function=slerp_merge,
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
