"""Iso-C: isotropic merging in the common subspace.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
ICML 2025 (arXiv:2502.04959). Task arithmetic's summed task matrix ``Δ = Σ_t τ_t`` has a few dominant
singular directions, and tasks whose updates live in the weaker ones are drowned out. Iso-C keeps the
singular vectors of ``Δ`` and replaces its spectrum by a flat one at the mean singular value, so every
direction of the common subspace counts equally: ``Δ_iso = σ̄ U Vᵀ``. Other tensors get the mean of the task
vectors, as in the authors' code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.methods.registry import MergeMethod, Param, register
from mergelab.methods.spectral import merge_task_matrices, numerical_rank, thin_svd

ISO_LAMBDA = Param("lambda", float, 1.0,
                   help="scale α of the flattened task matrix (the paper picks it on validation data)")
ISO_PAPER = ("Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
             "Subspaces, ICML (arXiv:2502.04959)")


def iso_c_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *,
                lambda_: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``θ_0 + λ σ̄ U Vᵀ`` with ``Σ_t w_t (θ_t − θ_0) = U diag(σ) Vᵀ`` and ``σ̄ = mean(σ)`` over all
    ``min(m, n)`` singular values on 2-D weights; ``θ_0 + λ (1/T) Σ_t w_t (θ_t − θ_0)`` elsewhere.

    Directions with a zero singular value (a rank-deficient sum) have no defined singular vectors and are
    left out (:func:`~mergelab.methods.spectral.polar_factor`); full-rank sums, the case of real fine-tunes,
    are exactly the paper's formula. Computed in float32 (float64 for float64 inputs or ``dtype``).
    """
    def merge_matrix(taus: list[torch.Tensor]) -> torch.Tensor:
        u, s, vh = thin_svd(torch.stack(taus).sum(0))
        r = numerical_rank(s, base.shape)
        return s.mean() * (u[:, :r] @ vh[:r])

    return merge_task_matrices(base, tensors, weights, merge_matrix, lambda_=lambda_, dtype=dtype)


register(MergeMethod(
    name="iso_c",
    function=iso_c_merge,
    params=(
        Param("weight", float, 1.0, scope="model", help="scale of this model's task vector in the sum"),
        ISO_LAMBDA,
    ),
    summary="Task arithmetic's summed task matrix with its singular values replaced by their mean "
            "(a flat spectrum).",
    paper=ISO_PAPER,
    also_in=("FusionBench",),
    formula="θ = θ_0 + λ σ̄ U Vᵀ, U diag(σ) Vᵀ = Σ_t w_t τ_t, σ̄ = mean σ; θ_0 + λ mean τ_t on non-2-D tensors",
))
