"""TSV-M: Task Singular Vectors merging.

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025
(arXiv:2412.00081). Per weight matrix, each task vector is cut to its top ``k`` singular triplets
(``k = ⌊min(m, n)/T⌋`` by default, so the ``T`` tasks together fill the full rank); the stacked left
vectors ``U = [U_1 … U_T]`` and right vectors ``V = [V_1 … V_T]`` are each replaced by their closest matrix
with orthonormal columns (Procrustes: ``U⊥ = P Qᵀ`` from ``U = P S Qᵀ``), which removes the overlap between
tasks' singular vectors (their *singular task interference*, :mod:`mergelab.analysis.svd_diagnostics`);
the merged task matrix is ``U⊥ Σ V⊥ᵀ`` with ``Σ = diag(Σ_1 … Σ_T)``. Other tensors (biases, norms,
convolutions) get the mean of the task vectors, as in the authors' code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.methods.registry import MergeMethod, Param, register
from mergelab.methods.spectral import merge_task_matrices, polar_factor, truncated_svd


def tsv_rank(shape: Sequence[int], tasks: int, rank_ratio: float | None = None) -> int:
    """Singular triplets kept per task: ``⌊min(m, n)/T⌋`` (the paper's), or ``⌊rank_ratio · min(m, n)⌋``;
    at least 1 (the paper's rule gives 0, i.e. no update at all, when a matrix is narrower than ``T``)."""
    full = min(shape[0], shape[1])
    k = full // tasks if rank_ratio is None else int(rank_ratio * full + 1e-9)
    return max(1, min(full, k))


def tsv_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *,
              lambda_: float = 1.0, rank_ratio: float | None = None, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    """``θ_0 + λ U⊥ Σ V⊥ᵀ`` on 2-D weights (module docstring), ``θ_0 + λ (1/T) Σ_t w_t τ_t`` elsewhere.

    ``τ_t = w_t (θ_t − θ_0)``; ``U⊥``/``V⊥`` are the orthogonal factors of the stacked top-``k`` singular
    vectors (:func:`tsv_rank`). Computed in float32 (float64 for float64 inputs or ``dtype``); the
    result has the base's dtype.
    """
    def merge_matrix(taus: list[torch.Tensor]) -> torch.Tensor:
        k = tsv_rank(base.shape, len(taus), rank_ratio)
        parts = [truncated_svd(tau, k) for tau in taus]
        u = torch.cat([p[0] for p in parts], dim=1)  # m × Tk
        s = torch.cat([p[1] for p in parts])
        vh = torch.cat([p[2] for p in parts], dim=0)  # Tk × n
        return (polar_factor(u) * s) @ polar_factor(vh)

    return merge_task_matrices(base, tensors, weights, merge_matrix, lambda_=lambda_, dtype=dtype)


register(MergeMethod(
    name="tsv",
    aliases=("tsv_m",),
    function=tsv_merge,
    params=(
        Param("weight", float, 1.0, scope="model", help="scale of this model's task vector before its SVD"),
        Param("lambda", float, 1.0, help="scale of the merged task matrix (the paper uses 1.0 throughout)"),
        Param("rank_ratio", float, None, low=0.0, high=1.0,
              help="singular triplets kept per task as a fraction of min(m, n) (default 1/T, the paper's)"),
    ),
    summary="Each task vector cut to its top singular triplets, the stacked singular vectors "
            "orthogonalised (Procrustes), then summed.",
    paper="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging, "
          "CVPR (arXiv:2412.00081)",
    also_in=("FusionBench",),
    formula="θ = θ_0 + λ U⊥ Σ V⊥ᵀ, U⊥ = polar([U_1..U_T]), V⊥ = polar([V_1..V_T]), k = ⌊min(m,n)/T⌋ per task; "
            "θ_0 + λ mean τ_t on non-2-D tensors",
))
