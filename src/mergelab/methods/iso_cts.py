"""Iso-CTS: isotropic merging in the common and task-specific subspaces.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
ICML 2025 (arXiv:2502.04959). Iso-C (:mod:`mergelab.methods.iso_c`) keeps all singular directions of the
summed task matrix, including weak ones that mostly carry interference. Iso-CTS keeps only the top ``c``
directions of the sum (the *common subspace*, ``c ≈ common_space_fraction · min(m, n)``) and fills the
remaining ``min(m, n) − c`` with ``s = (min(m, n) − c)/T`` directions per task: the top singular directions
of each task vector after its projection onto the common left subspace is removed. The stacked singular
vectors are orthogonalised (Procrustes, as in TSV-M) and the spectrum is flattened at the mean of the
stacked singular values. Other tensors get the mean of the task vectors, as in the authors' code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.methods.iso_c import ISO_LAMBDA, ISO_PAPER
from mergelab.methods.registry import MergeMethod, Param, register
from mergelab.methods.spectral import merge_task_matrices, polar_factor, truncated_svd


def iso_cts_split(shape: Sequence[int], tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """``(c, s)``: common directions and directions per task, ``c + T s = min(m, n)``.

    As in the authors' code: ``c = ⌊fraction · r⌋``, then ``s = round((r − c)/T)`` and ``c = r − T s`` so
    the task-specific part divides evenly; ``s`` is lowered where rounding up would overfill the rank.
    """
    full = min(shape[0], shape[1])
    common = int(full * common_space_fraction)
    per_task = round((full - common) / tasks)
    if per_task * tasks > full:
        per_task = full // tasks
    return full - per_task * tasks, per_task


def iso_cts_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
                  *, lambda_: float = 1.0, common_space_fraction: float = 0.8,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """``θ_0 + λ σ̄ U⊥ V⊥ᵀ`` on 2-D weights (module docstring), ``θ_0 + λ (1/T) Σ_t w_t τ_t`` elsewhere.

    ``U = [U_c, U_1 … U_T]``: the top-``c`` left singular vectors of ``Σ_t τ_t`` and the top-``s`` ones of
    each ``(I − U_c U_cᵀ) τ_t`` (likewise ``V``; :func:`iso_cts_split`); ``U⊥``, ``V⊥`` their orthogonal
    factors, ``σ̄`` the mean of the ``c + T s`` stacked singular values. With ``common_space_fraction=1``
    this is Iso-C. Computed in float32 (float64 for float64 inputs or ``dtype``).
    """
    def merge_matrix(taus: list[torch.Tensor]) -> torch.Tensor:
        common, per_task = iso_cts_split(base.shape, len(taus), common_space_fraction)
        u_c, s_c, vh_c = truncated_svd(torch.stack(taus).sum(0), common)
        us, ss, vhs = [u_c], [s_c], [vh_c]
        for tau in taus if per_task > 0 else []:
            u_t, s_t, vh_t = truncated_svd(tau - u_c @ (u_c.T @ tau), per_task)
            us.append(u_t)
            ss.append(s_t)
            vhs.append(vh_t)
        # over all c + T s slots, as in the paper: numerically zero triplets that truncated_svd leaves out
        # (a task without s directions outside the common subspace) count as zeros
        sigma_mean = torch.cat(ss).sum() / max(1, common + per_task * len(taus))
        return sigma_mean * (polar_factor(torch.cat(us, dim=1)) @ polar_factor(torch.cat(vhs, dim=0)))

    return merge_task_matrices(base, tensors, weights, merge_matrix, lambda_=lambda_, dtype=dtype)


register(MergeMethod(
    name="iso_cts",
    function=iso_cts_merge,
    params=(
        Param("weight", float, 1.0, scope="model", help="scale of this model's task vector"),
        ISO_LAMBDA,
        Param("common_space_fraction", float, 0.8, low=0.0, high=1.0,
              help="share of min(m, n) given to the common subspace of the summed task matrix (paper: 0.8)"),
    ),
    summary="Iso-C in the top singular subspace of the summed task matrix plus each task's own top "
            "directions outside it, orthogonalised, with a flat spectrum.",
    paper=ISO_PAPER,
    also_in=("FusionBench",),
    formula="θ = θ_0 + λ σ̄ U⊥ V⊥ᵀ, U = [top-c of Σ τ_t, top-s of (I − U_c U_cᵀ) τ_t per task], "
            "σ̄ = mean of the stacked σ; θ_0 + λ mean τ_t on non-2-D tensors",
))
