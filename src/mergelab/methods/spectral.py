"""Shared linear algebra of the SVD-family merges (TSV-M, Iso-C, Iso-CTS): task vectors in a working dtype
and the orthogonal (polar) factor of a matrix.

Determinism: MKL's SVD takes a different blocked path for each thread count (measured here, torch 2.13 CPU:
a 256×128 float32 matrix gave different last bits on 1 and 2 threads, 64×64 did not). The engine runs every
non-element-wise method on one thread (:func:`mergelab.merge.core.one_thread`); call these functions inside
that context to get the same bytes outside the engine.

Sign and rotation conventions: every result here is built from products ``U f(Σ) Vᵀ`` (or ``P_U Σ P_Vᵀ`` with
polar factors), which do not change when a singular pair (u_i, v_i) flips sign together, nor when the
vectors of a repeated singular value rotate together; so no sign convention is imposed on the SVD.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(matrix, full_matrices=False)`` that does not give up where LAPACK does.

    torch's CPU SVD is LAPACK's divide and conquer (``gesdd``, MKL's here), which can stop with "failed to
    converge" on a matrix that is not even badly conditioned: it ended the text task-vector study after 67
    minutes (2026-12-01, seed 0, an SVD-family merge of the T = 3 scaling experiment: a 384 × 384 float32
    matrix with singular values 1.92 … 0.0013). That matrix failed on one thread and decomposed on two, in
    float64, and with scipy's float32 ``gesdd`` and ``gesvd``. The retry decomposes the matrix in float64 and
    rounds the factors to its dtype; where that fails too, scipy's ``gesvd`` (QR iterations: slower, but it
    converges where ``gesdd`` does not). Each path is deterministic, so the same matrix always gives the same
    bytes; a matrix the first call decomposes is untouched by the fallback.
    """
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        if matrix.dtype == torch.float64:  # the float64 retry would repeat the call that just failed
            return _gesvd(matrix)
    try:
        u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = _gesvd(matrix)
    return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def _gesvd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scipy's QR-iteration SVD in float64, on the matrix's device."""
    import scipy.linalg

    factors = scipy.linalg.svd(matrix.detach().to("cpu", torch.float64).numpy(), full_matrices=False,
                               lapack_driver="gesvd")
    u, s, vh = (torch.from_numpy(f).to(matrix.device) for f in factors)
    return u, s, vh


def working_dtype(*tensors: torch.Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """float64 if the config asks for it or any input is float64, else float32: LAPACK has no half-precision
    SVD, so float16/bfloat16 (and float8) inputs are decomposed in float32 and rounded once at the end."""
    if dtype == torch.float64 or any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float] | None,
                 dtype: torch.dtype) -> list[torch.Tensor]:
    """``w_t (θ_t − θ_0)`` in ``dtype`` for every model (``weights=None``: all 1)."""
    ws = [1.0] * len(tensors) if weights is None else [float(w) for w in weights]
    if len(ws) != len(tensors):
        raise ValueError(f"got {len(tensors)} tensors but {len(ws)} weights")
    if not tensors:
        raise ValueError("need at least one model besides the base")
    b = base.to(dtype)
    return [(t.to(dtype) - b).mul_(w) for t, w in zip(tensors, ws, strict=True)]


def numerical_rank(s: torch.Tensor, shape: Sequence[int]) -> int:
    """Singular values above ``max(m, n) · eps · σ_max`` (numpy's ``matrix_rank`` rule); ``s`` descending."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = max(shape) * torch.finfo(s.dtype).eps * float(s[0])
    return int((s > tol).sum())


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor ``U_r V_rᵀ`` of ``matrix = U Σ Vᵀ`` over its ``r`` non-zero singular values.

    For a matrix of full column (or row) rank it is the polar factor, the closest matrix with orthonormal
    columns (rows) — the Procrustes solution TSV-M and Iso-CTS use to decorrelate stacked singular vectors.
    Where the matrix is rank-deficient, the singular vectors of the zero singular values are arbitrary (LAPACK
    picks any basis), so they are left out: the result is then the unique partial isometry with the
    matrix's row and column spaces, and it does not depend on the LAPACK build.
    """
    u, s, vh = thin_svd(matrix)
    r = numerical_rank(s, matrix.shape)
    return u[:, :r] @ vh[:r]


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``rank`` singular triplets ``(U_k, σ_k, V_kᵀ)`` of a 2-D tensor, without those whose singular
    value is numerically zero: their vectors are arbitrary, and stacked with other tasks' vectors they
    would change the orthogonal factor (a rank-1 task vector with ``rank=2`` turned a hand-worked TSV-M
    example into a LAPACK-dependent one)."""
    u, s, vh = thin_svd(matrix)
    k = max(0, min(rank, numerical_rank(s, matrix.shape)))
    return u[:, :k], s[:k], vh[:k]


def merge_task_matrices(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float] | None,
                        merge_matrix: Callable[[list[torch.Tensor]], torch.Tensor], *, lambda_: float,
                        dtype: torch.dtype | None) -> torch.Tensor:
    """``θ_0 + λ merge_matrix([τ_1 … τ_T])`` on 2-D weights and ``θ_0 + λ (1/T) Σ_t τ_t`` on other tensors
    (the rule of the SVD-family papers' code), ``τ_t = w_t (θ_t − θ_0)`` in :func:`working_dtype`; the
    result has the base's dtype."""
    work = working_dtype(base, *tensors, dtype=dtype)
    taus = task_vectors(base, tensors, weights, work)
    merged = merge_matrix(taus) if base.dim() == 2 else torch.stack(taus).mean(0)
    return (base.to(work) + lambda_ * merged).to(base.dtype)
