"""Per-layer diagnostics of the SVD-family merges: TSV's singular task interference and Iso's subspace
alignment ratio, for one weight matrix or for every matrix of a merge.

**Singular task interference** (Gargiulo et al., "Task Singular Vectors", CVPR 2025, arXiv:2412.00081).
With each task matrix cut to its top ``k`` singular triplets ``Δ_t ≈ U_t Σ_t V_tᵀ`` and the stacks
``U = [U_1 … U_T]``, ``V = [V_1 … V_T]``, ``Σ = diag(Σ_1 … Σ_T)``:
``STI = ‖(UᵀU − I) Σ (VᵀV − I)‖_1`` (entry-wise ℓ1 norm). It is 0 when the tasks' singular vectors are
mutually orthogonal on at least one side, and it grows with both the overlap of singular vectors and the
singular values on them; TSV-M's orthogonalisation makes it exactly 0. Two rank-1 tasks with
``u_1·u_2 = a``, ``v_1·v_2 = b`` give ``|ab| (σ_1 + σ_2)``. ``k`` defaults to TSV-M's ``⌊min(m, n)/T⌋``.
Because STI carries the scale of the singular values, :func:`layer_diagnostics` also reports it divided by
``Σ σ`` of the stacked triplets (ours, to compare layers of different scale; it can exceed 1).
The sign of a whole task vector matters (``−Δ_t`` flips ``U_t`` but not ``V_t``), the SVD's sign
convention does not (a pair ``(u_i, v_i)`` flipped together leaves the product unchanged). FusionBench 0.2.33's
``compute_task_singular_interference`` stacks the vectors along the wrong axis (``dim=0``); this follows
the paper's definition.

**Subspace alignment ratio** (Marczak et al., "No Task Left Behind", ICML 2025, arXiv:2502.04959, Eq. 5–6).
For a task matrix ``Δ_t`` and a merged task matrix ``Δ_M`` with left singular vectors ``U_M``:
``SAR(Δ_t, Δ_M) = ‖Π_k Δ_t‖_F / ‖Δ_t‖_F`` with ``Π_k = U_{M,k} U_{M,k}ᵀ`` and ``k`` the smallest rank whose
top-``k`` part of ``Δ_M`` keeps a ``captured`` share (0.95) of its Frobenius norm. SAR is in ``[0, 1]``:
1 when the task's columns lie in the merged matrix's dominant subspace, 0 when orthogonal to it. The paper
shows the mean over tasks (``SAR_avg``) tracks the merged model's accuracy, and that Iso-C raises it over
task arithmetic by flattening the spectrum (a flat spectrum's effective rank is the full rank).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mergelab.analysis.interference import matrix_names
from mergelab.methods.spectral import thin_svd
from mergelab.methods.tsv import tsv_rank

StateDict = Mapping[str, torch.Tensor]


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if matrix.dim() != 2:
        raise ValueError(f"task matrices must be 2-D, got shape {tuple(matrix.shape)}")
    return thin_svd(matrix.to(torch.float64))


def interference_of_factors(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> float:
    """``‖(UᵀU − I) diag(s) (VᵀV − I)‖_1`` for stacked singular vectors ``u`` (m × K), ``v`` (n × K)."""
    eye = torch.eye(s.numel(), dtype=u.dtype)
    return float(((u.T @ u - eye) @ torch.diag(s) @ (v.T @ v - eye)).abs().sum())


def _task_factors(deltas: Sequence[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stacked top-``k`` singular triplets of the task matrices: ``U`` (m × Tk), ``σ`` (Tk), ``V`` (n × Tk)."""
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = _svd(d)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    return torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1)


def singular_task_interference(deltas: Sequence[torch.Tensor], rank: int | None = None) -> float:
    """STI of the task matrices ``deltas`` (module docstring), each cut to ``rank`` triplets
    (default ``⌊min(m, n)/T⌋``)."""
    if not deltas:
        raise ValueError("need at least one task matrix")
    k = tsv_rank(deltas[0].shape, len(deltas)) if rank is None else rank
    return interference_of_factors(*_task_factors(deltas, k))


def captured_rank(s: torch.Tensor, captured: float = 0.95) -> int:
    """Smallest ``k`` with ``‖σ_{1..k}‖₂ ≥ captured · ‖σ‖₂`` (Iso's Eq. 6); 0 for a zero matrix."""
    if not 0 < captured <= 1:
        raise ValueError(f"captured must be in (0, 1], got {captured}")
    energy = (s.to(torch.float64) ** 2).cumsum(0)
    if energy.numel() == 0 or float(energy[-1]) == 0.0:
        return 0
    reached = energy >= (captured ** 2) * energy[-1] * (1 - 1e-12)
    return int(torch.nonzero(reached)[0]) + 1


def _projected_share(uk: torch.Tensor, task: torch.Tensor) -> float:
    """``‖U_k U_kᵀ Δ_t‖_F / ‖Δ_t‖_F`` for orthonormal columns ``uk``; 0 for a zero task or no columns."""
    t = task.to(torch.float64)
    norm = float(torch.linalg.matrix_norm(t))
    if norm == 0.0 or uk.shape[1] == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(uk @ (uk.T @ t))) / norm


def subspace_alignment_ratio(task: torch.Tensor, merged: torch.Tensor, *, captured: float = 0.95,
                             rank: int | None = None) -> float:
    """``‖U_k U_kᵀ Δ_t‖_F / ‖Δ_t‖_F`` with ``U_k`` the top-``k`` left singular vectors of ``merged``;
    ``k = rank`` or :func:`captured_rank` of ``merged``. A zero task matrix has SAR 0."""
    u, s, _ = _svd(merged)
    k = captured_rank(s, captured) if rank is None else rank
    return _projected_share(u[:, :k], task)


def _alignment_and_rank(tasks: Sequence[torch.Tensor], merged: torch.Tensor, captured: float) -> tuple[float, int]:
    """``SAR_avg`` of ``tasks`` against ``merged`` and the captured rank ``k`` it projects on, from one SVD."""
    u, s, _ = _svd(merged)
    k = captured_rank(s, captured)
    return sum(_projected_share(u[:, :k], t) for t in tasks) / len(tasks), k


def mean_alignment(tasks: Sequence[torch.Tensor], merged: torch.Tensor, *, captured: float = 0.95) -> float:
    """``SAR_avg``: the mean SAR of the task matrices against one merged matrix (one SVD)."""
    return _alignment_and_rank(tasks, merged, captured)[0]


@dataclass(frozen=True)
class LayerDiagnostics:
    """Both measures for one weight matrix of a merge."""

    name: str
    interference: float  # STI of the task matrices θ_t − θ_0
    relative_interference: float  # STI / Σ of the stacked singular values
    alignment_task_arithmetic: float  # SAR_avg against Σ_t (θ_t − θ_0)
    alignment_merged: float | None  # SAR_avg against θ_merged − θ_0 (None without a merged model)
    rank_task_arithmetic: int  # the k of SAR for Σ_t (θ_t − θ_0)
    rank_merged: int | None


def matrix_diagnostics(name: str, base: torch.Tensor, finetuned: Sequence[torch.Tensor],
                       merged: torch.Tensor | None = None, *, captured: float = 0.95,
                       rank: int | None = None) -> LayerDiagnostics:
    """STI and SAR_avg (module docstring) of one weight matrix: ``base`` and the ``finetuned`` models' versions
    of it, and optionally ``merged`` (any merge of them on ``base``) to compare with task arithmetic's sum."""
    b = base.to(torch.float64)
    deltas = [f.to(torch.float64) - b for f in finetuned]
    k = tsv_rank(b.shape, len(deltas)) if rank is None else rank
    # one SVD per task matrix, one of the sum, one of the merge: each serves every measure that needs it
    u, s, v = _task_factors(deltas, k)
    sti, scale = interference_of_factors(u, s, v), float(s.sum())
    ta_align, ta_rank = _alignment_and_rank(deltas, torch.stack(deltas).sum(0), captured)
    m_align = m_rank = None
    if merged is not None:
        m_align, m_rank = _alignment_and_rank(deltas, merged.to(torch.float64) - b, captured)
    return LayerDiagnostics(
        name=name, interference=sti, relative_interference=sti / scale if scale > 0 else 0.0,
        alignment_task_arithmetic=ta_align, alignment_merged=m_align, rank_task_arithmetic=ta_rank,
        rank_merged=m_rank)


def layer_diagnostics(base: StateDict, finetuned: Sequence[StateDict], merged: StateDict | None = None, *,
                      names: Sequence[str] | None = None, captured: float = 0.95,
                      rank: int | None = None) -> list[LayerDiagnostics]:
    """:func:`matrix_diagnostics` for every 2-D weight in ``names`` (default: the matrices that at least one
    model changes, :func:`~mergelab.analysis.interference.matrix_names`), in state-dict order."""
    chosen = list(names) if names is not None else matrix_names([base, *finetuned])
    return [matrix_diagnostics(name, base[name], [f[name] for f in finetuned],
                               merged[name] if merged is not None else None, captured=captured, rank=rank)
            for name in chosen]
