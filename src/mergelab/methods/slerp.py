"""Spherical linear interpolation between two models, tensor by tensor.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; popularised for LLM merging by
mergekit. The angle is measured between the flattened, normalised tensors; the interpolation is applied to
the unnormalised tensors, as in mergekit. Near-parallel (|cos| > ``dot_threshold``) pairs fall back to
linear interpolation, where SLERP is numerically unstable and LERP is equal to first order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from mergelab.kernels import row_reductions as row_sums_compiled
from mergelab.kernels.weighted_sums import interpolation_sum
from mergelab.methods import row_sums
from mergelab.methods.registry import FlatSource, MergeMethod, Param, ScalarPass, VouchedScalars, register

_CHUNK = 1 << 20  # entries per chunk of the float32 work: bounded scratch for any tensor size


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _compiled_sums(x: torch.Tensor) -> row_sums_compiled.ChunkSums | None:
    """The compiled loop for a chunk's float32 norms and dot product (the same numbers as torch's on one
    thread, in one pass over the chunk instead of torch's conversions, divisions and reductions: 1.04 against
    7.79 ms for both passes over a 1 Mi-entry bfloat16 chunk, ``benchmarks/compiled_loops.py``), or None."""
    return row_sums_compiled.chunk_sums(x.dtype, row_sums.lanes_for(torch.float32))


def slerp_coefficients(t: float, source: FlatSource, *, dot_threshold: float = 0.9995,
                       eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole-tensor step of :func:`slerp_merge`: its coefficients ``(c0, c1)`` (``[1, 1]`` tensors),
    from the base ``v0`` and the other model ``v1`` read in flat chunks of ``_CHUNK`` entries, twice (the
    norms, then the dot product of the normalised chunks), in mergekit's order and precision."""
    coefficients: tuple[torch.Tensor, torch.Tensor] = slerp_scalars(
        t, source, dot_threshold=dot_threshold, eps=eps).value
    return coefficients


def slerp_scalars(t: float, source: FlatSource, *, dot_threshold: float = 0.9995,
                  eps: float = 1e-8) -> VouchedScalars:
    """:func:`slerp_coefficients`, vouching for the inputs where every chunk's norm is finite (the engine then
    skips the NaN/Inf scan of the inputs it kept)."""
    def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for v0, (v1,) in source.chunks(_CHUNK):
            assert v0 is not None  # slerp's v0 is the base
            yield v0.reshape(-1), v1.reshape(-1)

    def as_work(v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _work_dtype(v0)
        return v0.reshape(1, -1).to(dtype), v1.reshape(1, -1).to(dtype)

    # Each chunk's norm and dot product is kept as a Python number, and the stack of the chunks' [1, 1]
    # results is made at the end: small tensors allocated between two chunks' large buffers and kept pin
    # the heap there (the pass over a 32.8 M-entry tensor grew the RSS by 229 MiB).
    work = torch.float32
    parts_a, parts_b = [], []
    for v0, v1 in pairs():
        work = _work_dtype(v0)
        compiled = _compiled_sums(v0)
        norms = compiled.norms(v0, v1) if compiled is not None else None
        if norms is None:
            a, b = as_work(v0, v1)
            norms = (float(torch.linalg.vector_norm(a, dim=1, keepdim=True)),
                     float(torch.linalg.vector_norm(b, dim=1, keepdim=True)))
        parts_a.append(norms[0])
        parts_b.append(norms[1])

    def stacked(values: list[float]) -> torch.Tensor:  # torch.stack of the chunks' [1, 1] results
        return torch.tensor(values, dtype=work).reshape(-1, 1, 1)

    # the norm of the chunks' norms, normalised before the product (no overflow of a raw dot)
    norm_a = torch.linalg.vector_norm(stacked(parts_a), dim=0)
    norm_b = torch.linalg.vector_norm(stacked(parts_b), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)

    def chunk_dot(v0: torch.Tensor, v1: torch.Tensor) -> float:
        compiled = _compiled_sums(v0)
        dot = compiled.normalized_dot(v0, v1, float(norm_a), float(norm_b)) if compiled is not None else None
        if dot is None:  # the norms are made on the CPU from Python numbers; a GPU's chunk takes copies
            a, b = as_work(v0, v1)
            dot = float((a / norm_a.to(a.device) * (b / norm_b.to(b.device))).sum(dim=1, keepdim=True))
        return dot

    dot = stacked([chunk_dot(v0, v1) for v0, v1 in pairs()])
    dot = dot.sum(dim=0).clamp(-1, 1)
    t_ = torch.tensor([[t]], dtype=dot.dtype)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    c0 = torch.where(linear, 1 - t_, torch.sin((1 - t_) * theta) / sin_theta)
    c1 = torch.where(linear, t_, torch.sin(t_ * theta) / sin_theta)
    return VouchedScalars((c0, c1), inputs_finite=all(math.isfinite(x) for x in (*parts_a, *parts_b)))


def slerp_apply(coefficients: tuple[torch.Tensor, torch.Tensor], v0: torch.Tensor,
                v1: torch.Tensor) -> torch.Tensor:
    """The element-wise step of :func:`slerp_merge`: ``c0 · v0 + c1 · v1`` in the coefficients' dtype,
    rounded to ``v0``'s; any flat slice of the inputs gives that slice of the result. One compiled pass
    where it applies (0.16 against 7.05 ms per 1 Mi-entry bfloat16 piece), else torch's chunks."""
    # the coefficients are made on the CPU from Python numbers (slerp_scalars); a GPU's merge takes copies
    c0, c1 = (c.to(v0.device) for c in coefficients)
    fused = interpolation_sum(v0, v1, c0, c1, _interpolated)
    return fused if fused is not None else _interpolated(v0, v1, c0, c1)


def _interpolated(v0: torch.Tensor, v1: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    out = torch.empty_like(a)
    for s in range(0, a.shape[1], _CHUNK):
        out[:, s:s + _CHUNK] = c0 * a[:, s:s + _CHUNK].to(c0.dtype) + c1 * b[:, s:s + _CHUNK].to(c0.dtype)
    return out.reshape(v0.shape)


def slerp_merge(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = 0.9995,
                eps: float = 1e-8, scalars: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1`` with ``cos Ω = <v0/|v0|, v1/|v1|>``.

    The statistics and coefficients are float32 tensors (float64 for float64 inputs) computed chunk by
    chunk in mergekit's order (:func:`slerp_coefficients`), and the result is rounded to ``v0``'s dtype
    (:func:`slerp_apply`): in float16 and bfloat16 the coefficients' last bits decide the rounding of some
    entries, so computing them in float64 instead left 1-ulp differences from mergekit (measured on tiny
    Llama/GPT-2 folders). ``scalars``: the coefficients of the whole tensor, when ``v0`` and ``v1`` are
    flat pieces of it (the engine's streamed merge).
    """
    if v0.shape != v1.shape:
        raise ValueError(f"slerp_merge: shapes differ {tuple(v0.shape)} vs {tuple(v1.shape)}")
    if scalars is None:
        if v0.numel() == 0:
            return v0.clone()
        scalars = slerp_coefficients(t, FlatSource.of(v0, [v1]), dot_threshold=dot_threshold, eps=eps)
    return slerp_apply(scalars, v0, v1)


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
    scalar_pass=ScalarPass(slerp_scalars),
    compiled=True,
))
