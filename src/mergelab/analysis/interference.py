"""Row-space interference I(k) and reconstruction error R(k) of (centred) task matrices.

Choi et al., "Revisiting Weight Averaging for Model Merging" (CART, arXiv:2412.12153), Sec. 3 and
Fig. 2–3. For one weight matrix (PyTorch layout ``[out, in]``) and ``T`` tasks, a *task matrix* is either

- uncentred (task arithmetic): ``Δ_t = θ_t − θ_0`` (fine-tuned minus pretrained), or
- centred (weight averaging / CART): ``Δ̄_t = θ_t − θ_avg`` with ``θ_avg = (1/T) Σ_s θ_s``, so ``Σ_t Δ̄_t = 0``.

With the SVD ``Δ_t = U_t Σ_t V_tᵀ`` (singular values in decreasing order) and ``k ≥ 1``:

- ``V_t^{(k)} ∈ R^{in×k}``: the top-``k`` right singular vectors (the row space, i.e. the input directions
  the task's update reads);
- ``Σ̃_t^{(k)} = diag(σ_{t,1..k}) / ‖σ_{t,1..k}‖₂``: the top-``k`` singular values normalised to unit ℓ2 norm
  (so the measure compares directions, not magnitudes);

**Row-space interference** ``I(k) = Σ_{i=1}^T Σ_{j≠i} ‖ Σ̃_i^{(k)} (V_i^{(k)})ᵀ V_j^{(k)} Σ̃_j^{(k)} ‖_F``
(the paper writes ``‖(Σ̃_i Ṽ_i)ᵀ(Σ̃_j Ṽ_j)‖_F`` with ``Ṽ`` holding the singular vectors as rows). Each
term lies in ``[0, 1]``: 0 when the two row spaces are orthogonal, 1 when both are the same rank-1
direction; so ``0 ≤ I(k) ≤ T(T−1)``. ``I(0) = 0``. A task matrix that is exactly zero contributes 0.

Normalisation (``normalize=``): ``"top_k"`` (default) divides by ``‖σ_{t,1..k}‖₂`` as written in the
restatement of the paper's definition we could read; ``"full"`` divides by ``‖σ_t‖₂`` over the whole
spectrum, which makes ``I(k)`` non-decreasing in ``k`` (each term is the Frobenius norm of a growing
sub-block of one fixed matrix) — the behaviour the paper reports ("I(k) increases gradually"). Both agree
at full rank.

**Reconstruction error** ``R(k) = Σ_{t=1}^T ‖Δ_t − SVD_k(Δ_t)‖_F² = Σ_t Σ_{i>k} σ_{t,i}²`` (Eckart–Young),
with ``SVD_k`` the best rank-``k`` approximation; ``R(0) = Σ_t ‖Δ_t‖_F²`` and ``R(min(m, n)) = 0``. The
*relative* error ``R(k) / R(0)`` makes layers and centred/uncentred task matrices comparable.

A network has many matrices: :func:`interference_curves` evaluates both measures per 2-D weight at a
rank *ratio* ``k = rank_from_ratio((m, n), ratio)`` (the same rule CART uses) and averages over matrices.
Everything here is a pure function of tensors; one SVD per (matrix, task) serves every ``k``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from mergelab.methods.cart import rank_from_ratio
from mergelab.methods.spectral import thin_svd
from mergelab.types import StateDict


@dataclass(frozen=True)
class Spectrum:
    """Thin SVD of one task matrix, ``delta = u @ diag(s) @ vh``, in float64."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    @property
    def full_rank(self) -> int:
        return int(self.s.numel())


def spectrum(delta: torch.Tensor) -> Spectrum:
    if delta.dim() != 2:
        raise ValueError(f"task matrices must be 2-D, got shape {tuple(delta.shape)}")
    u, s, vh = thin_svd(delta.to(torch.float64))
    return Spectrum(u, s, vh)


def task_matrices(weights: Sequence[torch.Tensor], reference: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``θ_t − reference``; with ``reference=None`` the centred ``θ_t − θ_avg`` (uniform average)."""
    if not weights:
        raise ValueError("need at least one task's weights")
    ws = [w.to(torch.float64) for w in weights]
    ref = torch.stack(ws).mean(0) if reference is None else reference.to(torch.float64)
    return [w - ref for w in ws]


Normalize = Literal["top_k", "full"]


def _normalised_top(s: torch.Tensor, k: int, normalize: Normalize) -> torch.Tensor:
    if normalize not in ("top_k", "full"):
        raise ValueError(f"normalize must be 'top_k' or 'full', got {normalize!r}")
    top = s[:k]
    norm = torch.linalg.vector_norm(top if normalize == "top_k" else s)
    return top / norm if norm > 0 else torch.zeros_like(top)


def interference_from_spectra(spectra: Sequence[Spectrum], k: int, *, normalize: Normalize = "top_k") -> float:
    """``I(k)`` (module docstring) from precomputed SVDs; ``k`` is capped at each matrix's full rank."""
    if k <= 0 or len(spectra) < 2:
        return 0.0
    kk = min(k, min(sp.full_rank for sp in spectra))
    scaled = [_normalised_top(sp.s, kk, normalize)[:, None] * sp.vh[:kk] for sp in spectra]  # Σ̃ Vᵀ: k × in
    total = 0.0
    for i in range(len(scaled)):
        for j in range(i + 1, len(scaled)):
            # ‖A_i A_jᵀ‖_F = ‖A_j A_iᵀ‖_F, so every unordered pair counts twice
            total += 2.0 * float(torch.linalg.matrix_norm(scaled[i] @ scaled[j].T))
    return total


def reconstruction_from_spectra(spectra: Sequence[Spectrum], k: int) -> float:
    """``R(k) = Σ_t Σ_{i>k} σ_{t,i}²`` from precomputed SVDs."""
    k = max(0, k)
    return float(sum((sp.s[k:] ** 2).sum() for sp in spectra))


def row_space_interference(deltas: Sequence[torch.Tensor], k: int, *, normalize: Normalize = "top_k") -> float:
    """``I(k) = Σ_{i≠j} ‖Σ̃_i V_iᵀ V_j Σ̃_j‖_F`` over the task matrices ``deltas`` (module docstring)."""
    return interference_from_spectra([spectrum(d) for d in deltas], k, normalize=normalize)


def reconstruction_error(deltas: Sequence[torch.Tensor], k: int) -> float:
    """``R(k) = Σ_t ‖Δ_t − SVD_k(Δ_t)‖_F²`` over the task matrices ``deltas``."""
    return reconstruction_from_spectra([spectrum(d) for d in deltas], k)


def low_rank_sum(spectra: Sequence[Spectrum], k: int) -> torch.Tensor:
    """``Σ_t SVD_k(Δ_t)`` from precomputed SVDs (CART's correction before λ), in float64."""
    first = spectra[0]
    out = torch.zeros(first.u.shape[0], first.vh.shape[1], dtype=torch.float64)
    if k <= 0:
        return out
    for sp in spectra:
        kk = min(k, sp.full_rank)
        out += (sp.u[:, :kk] * sp.s[:kk]) @ sp.vh[:kk]
    return out


def matrix_names(states: Sequence[StateDict], *, min_change: float = 0.0) -> list[str]:
    """Names of floating 2-D tensors that at least one state changes by more than ``min_change`` (max abs)
    relative to the first state — frozen matrices (e.g. embeddings) have no task vector to measure."""
    first = states[0]
    names = []
    for name, t in first.items():
        if not t.is_floating_point() or t.dim() != 2:
            continue
        if any(float((s[name].double() - t.double()).abs().max()) > min_change for s in states[1:]):
            names.append(name)
    return names


@dataclass(frozen=True)
class CurvePoint:
    """Both measures at one rank ratio, averaged over matrices (``mean_*``) and summed (``total_*``)."""

    centred: bool
    ratio: float
    mean_interference: float  # mean over matrices of I_l(k_l)
    mean_interference_norm: float  # mean over matrices of I_l(k_l) / (T(T−1)), in [0, 1]
    mean_interference_full_norm: float  # the same with whole-spectrum normalisation (non-decreasing in k)
    mean_relative_error: float  # mean over matrices of R_l(k_l) / R_l(0)
    total_error: float  # Σ_l R_l(k_l)
    matrices: int


def interference_curves(states: Sequence[StateDict], base: StateDict, ratios: Iterable[float], *,
                        names: Sequence[str] | None = None, max_matrices: int | None = None) -> list[CurvePoint]:
    """I(k) and R(k) per rank ratio for uncentred (``θ_t − base``) and centred (``θ_t − θ_avg``) task
    matrices of every 2-D weight in ``names`` (default: :func:`matrix_names` of ``[base, *states]``);
    ``max_matrices`` keeps that many, evenly spaced through the network (fewer SVDs for quick runs)."""
    ratio_list = sorted(set(float(r) for r in ratios))
    chosen = list(names) if names is not None else matrix_names([base, *states])
    if max_matrices is not None and len(chosen) > max_matrices:
        step = len(chosen) / max_matrices
        chosen = [chosen[int(i * step)] for i in range(max_matrices)]
    t = len(states)
    pairs = max(1, t * (t - 1))
    acc: dict[tuple[bool, float], list[tuple[float, float, float, float]]] = {}
    for name in chosen:
        weights = [s[name] for s in states]
        for centred in (False, True):
            deltas = task_matrices(weights, None if centred else base[name])
            spectra = [spectrum(d) for d in deltas]
            r0 = reconstruction_from_spectra(spectra, 0)
            for ratio in ratio_list:
                k = rank_from_ratio(weights[0].shape, ratio)
                i_k = interference_from_spectra(spectra, k)
                i_full = interference_from_spectra(spectra, k, normalize="full")
                r_k = reconstruction_from_spectra(spectra, k)
                acc.setdefault((centred, ratio), []).append((i_k, r_k / r0 if r0 > 0 else 0.0, r_k, i_full))
    points = []
    for (centred, ratio), vals in sorted(acc.items()):
        n = len(vals)
        points.append(CurvePoint(
            centred=centred, ratio=ratio,
            mean_interference=sum(v[0] for v in vals) / n,
            mean_interference_norm=sum(v[0] for v in vals) / n / pairs,
            mean_interference_full_norm=sum(v[3] for v in vals) / n / pairs,
            mean_relative_error=sum(v[1] for v in vals) / n,
            total_error=sum(v[2] for v in vals), matrices=n,
        ))
    return points
