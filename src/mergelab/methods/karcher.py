"""Karcher mean: the Riemannian (geodesic) mean of the models' directions on the unit sphere, rescaled.

Karcher 1977, "Riemannian center of mass and mollifier smoothing" (Comm. Pure Appl. Math. 30(5)); for model
merging, Wang, Ye & Yin 2026, "Functionality-Oriented LLM Merging on the Fisher–Rao Manifold"
(arXiv:2603.04972), as implemented in mergekit. Each tensor is split into its norm and its direction; the
directions' weighted Karcher mean is found by fixed-point iteration (log map, average, exp map) and scaled by
the weighted mean norm. The weights are uniform; a base model, when given, is one more point (mergekit adds
it to the inputs). Computed in the config's ``dtype`` with norms in float32, as mergekit does (the same bits;
float32 without a ``dtype``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.methods.registry import MergeMethod, Param, register
from mergelab.methods.task_vectors import arithmetic_dtype


def karcher_mean(tensors: Sequence[torch.Tensor], alphas: Sequence[float], *, max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    """``(Σ_i α_i |θ_i|) · μ`` with ``μ`` the ``α``-weighted Karcher mean of ``θ_i/|θ_i|`` on the sphere.

    Start at the normalised weighted Euclidean mean (or the first direction if that is ~0); each step moves
    ``μ`` along ``v = Σ_i α_i θ_i/sin θ_i (u_i − cos θ_i μ)`` (``θ_i`` the angle to ``u_i``) by ``|v|`` on the
    sphere, until ``|v| < tol`` or ``max_iter`` steps. Tensors of norm ≤ ``tol`` take no part in the direction.
    """
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(t.to(dtype)) for t in tensors]
    units = [torch.zeros_like(t) if float(n) == 0.0 else (t / n).to(t.dtype)
             for t, n in zip(tensors, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return sum(t * 0 for t in tensors)  # type: ignore[return-value]
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    points = [units[i] for i in valid]
    mean = torch.zeros_like(points[0])
    for a, u in zip(weights, points, strict=True):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = points[0].clone() if float(mean_norm) < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, points, strict=True):
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if float(theta) < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - cos * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if float(tangent_norm) < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if float(unit_norm) > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return scale * mean


def karcher_merge(tensors: Sequence[torch.Tensor], *, base: torch.Tensor | None = None, max_iter: int = 10,
                  tol: float = 1e-5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Karcher mean of ``tensors`` (and ``base``, counted as one more point, as mergekit does) with uniform
    weights (see :func:`karcher_mean`), computed in ``dtype`` (the config's; float32 when None, float64 stays;
    norms in float32 as in mergekit), returned in the inputs' dtype."""
    if base is not None:
        tensors = [*tensors, base]
    if not tensors:
        raise ValueError("karcher needs at least one model")
    if len(tensors) == 1:
        return tensors[0]
    out_dtype = tensors[0].dtype
    dtype = arithmetic_dtype(tensors[0], dtype)
    points = [t.to(dtype) for t in tensors]
    return karcher_mean(points, [1.0 / len(points)] * len(points), max_iter=max_iter, tol=tol).to(out_dtype)


register(MergeMethod(
    name="karcher",
    function=karcher_merge,
    params=(
        Param("max_iter", int, 10, low=1, help="most fixed-point steps"),
        Param("tol", float, 1e-5, low=0.0, help="stop when the mean moves less; norms below it are ignored"),
    ),
    summary="Geodesic (Karcher) mean of the models' directions on the sphere, times their mean norm.",
    paper="Karcher 1977, Riemannian center of mass and mollifier smoothing (Comm. Pure Appl. Math.); "
          "Wang, Ye & Yin 2026, LLM Merging on the Fisher–Rao Manifold (arXiv:2603.04972)",
    formula="θ = (1/N Σ_i |θ_i|) μ,  μ = argmin_{|μ|=1} Σ_i arccos²<μ, θ_i/|θ_i|> (fixed-point iteration)",
    base="optional",
    min_models=1,
    also_in=("mergekit",),
))
