"""Golden tests for I(k), R(k) (CART, arXiv:2412.12153) and the identities that tie them to CART."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from mergelab import merge_state_dicts
from mergelab.analysis.interference import (
    interference_curves,
    low_rank_sum,
    matrix_names,
    reconstruction_error,
    row_space_interference,
    spectrum,
    task_matrices,
)
from mergelab.methods import cart_merge
from mergelab.methods.cart import low_rank

G = torch.Generator().manual_seed(0)
WEIGHTS = [torch.randn(6, 5, generator=G, dtype=torch.float64) for _ in range(4)]
BASE = torch.randn(6, 5, generator=G, dtype=torch.float64)


def _unit(angle: float) -> torch.Tensor:
    return torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)


# ---- R(k) -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_reconstruction_error_is_discarded_energy(k: int) -> None:
    deltas = task_matrices(WEIGHTS, BASE)
    direct = sum(float(((d - low_rank(d, k)) ** 2).sum()) for d in deltas)
    tail = sum(float((torch.linalg.svdvals(d)[k:] ** 2).sum()) for d in deltas)
    assert reconstruction_error(deltas, k) == pytest.approx(direct, rel=1e-10)
    assert reconstruction_error(deltas, k) == pytest.approx(tail, rel=1e-10)


def test_reconstruction_error_endpoints_and_monotone() -> None:
    deltas = task_matrices(WEIGHTS)
    r = [reconstruction_error(deltas, k) for k in range(6)]
    assert r[0] == pytest.approx(sum(float((d ** 2).sum()) for d in deltas))
    assert r[5] == pytest.approx(0.0, abs=1e-20)
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(r))


def test_reconstruction_by_hand() -> None:
    # diag(3, 1) and diag(0, 2): singular values (3, 1) and (2, 0) → R(1) = 1² + 0² = 1, R(0) = 9 + 1 + 4
    deltas = [torch.diag(torch.tensor([3.0, 1.0])), torch.diag(torch.tensor([0.0, 2.0]))]
    assert reconstruction_error(deltas, 0) == pytest.approx(14.0)
    assert reconstruction_error(deltas, 1) == pytest.approx(1.0)


# ---- I(k) -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("angle", [0.0, 0.3, math.pi / 3, math.pi / 2])
def test_interference_rank_one_by_hand(angle: float) -> None:
    # Δ1 = 3 e1 e1ᵀ, Δ2 = 2 e2 vᵀ with v at `angle`: each ordered pair gives |σ̃ σ̃ v1·v2| = |cos angle|
    d1 = 3 * torch.outer(_unit(0.0), _unit(0.0))
    d2 = 2 * torch.outer(_unit(math.pi / 2), _unit(angle))
    assert row_space_interference([d1, d2], 1) == pytest.approx(2 * abs(math.cos(angle)), abs=1e-12)


def test_interference_rank_two_by_hand() -> None:
    # Δ1 = diag(3, 4): σ = (4, 3) → σ̃ = (0.8, 0.6), V = (e2, e1); Δ2 = diag(1, 0): σ̃ = (1, 0), v = e1
    # Σ̃1 V1ᵀ V2 Σ̃2 has one non-zero entry 0.6 · 1 · (e1·e1) → ‖·‖_F = 0.6, and I counts both orders
    d1 = torch.diag(torch.tensor([3.0, 4.0], dtype=torch.float64))
    d2 = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert row_space_interference([d1, d2], 2) == pytest.approx(1.2)
    assert row_space_interference([d1, d2], 1) == pytest.approx(0.0, abs=1e-12)  # top directions e2 ⟂ e1


def test_interference_zero_for_orthogonal_row_spaces() -> None:
    a = torch.zeros(3, 4, dtype=torch.float64)
    b = torch.zeros(3, 4, dtype=torch.float64)
    a[:, :2] = torch.randn(3, 2, generator=G, dtype=torch.float64)
    b[:, 2:] = torch.randn(3, 2, generator=G, dtype=torch.float64)
    for k in (1, 2, 3):
        assert row_space_interference([a, b], k) == pytest.approx(0.0, abs=1e-12)


def test_interference_maximal_for_identical_rank_one() -> None:
    d = torch.outer(torch.randn(5, generator=G, dtype=torch.float64), torch.randn(4, generator=G, dtype=torch.float64))
    t = 4
    assert row_space_interference([d * (i + 1) for i in range(t)], 1) == pytest.approx(t * (t - 1))


def test_interference_bounds_invariances_and_zero_matrix() -> None:
    deltas = task_matrices(WEIGHTS, BASE)
    t = len(deltas)
    for k in range(6):
        value = row_space_interference(deltas, k)
        assert 0.0 <= value <= t * (t - 1) + 1e-9
        # task order and positive rescaling of a task matrix do not matter (σ̃ is normalised)
        assert row_space_interference([deltas[2] * 7.0, deltas[0], deltas[3], deltas[1]], k) == pytest.approx(value)
    assert row_space_interference(deltas, 0) == 0.0
    assert row_space_interference([deltas[0], torch.zeros_like(deltas[0])], 3) == 0.0


def test_full_spectrum_normalisation_is_monotone_and_meets_top_k_at_full_rank() -> None:
    deltas = task_matrices(WEIGHTS, BASE)
    full = [row_space_interference(deltas, k, normalize="full") for k in range(6)]
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(full))
    assert full[5] == pytest.approx(row_space_interference(deltas, 5))
    # rank 1: the top-k term is |v1·v1'| and the full one scales it by σ1/‖σ‖ for both matrices
    s = [torch.linalg.svdvals(d) for d in deltas[:2]]
    ratio = float(s[0][0] / torch.linalg.vector_norm(s[0]) * s[1][0] / torch.linalg.vector_norm(s[1]))
    assert row_space_interference(deltas[:2], 1, normalize="full") == pytest.approx(
        ratio * row_space_interference(deltas[:2], 1))
    with pytest.raises(ValueError, match="normalize"):
        row_space_interference(deltas, 2, normalize="l1")  # type: ignore[arg-type]


def test_two_tasks_centred_share_their_row_space() -> None:
    # with T = 2, Δ̄2 = −Δ̄1: the pair term is ‖Σ̃²‖_F = sqrt(Σ σ̃⁴) at every k
    c1, c2 = task_matrices(WEIGHTS[:2])
    assert_close(c1, -c2)
    s = torch.linalg.svdvals(c1)
    for k in (1, 2, 4):
        st = s[:k] / torch.linalg.vector_norm(s[:k])
        assert row_space_interference([c1, c2], k) == pytest.approx(2 * float(torch.sqrt((st ** 4).sum())))


# ---- CART identities ---------------------------------------------------------------------------------------
def test_weight_averaging_is_task_arithmetic_with_lambda_one_over_t() -> None:
    # the paper's starting point: θ_avg = θ_0 + (1/T) Σ_t (θ_t − θ_0)
    states = [{"w": w} for w in WEIGHTS]
    avg = merge_state_dicts(states, "linear")
    ta = merge_state_dicts(states, "task_arithmetic", base={"w": BASE}, parameters={"lambda": 1 / len(WEIGHTS)})
    assert_close(avg["w"], ta["w"])
    assert_close(sum(task_matrices(WEIGHTS)), torch.zeros_like(BASE))  # centred task vectors sum to zero


@pytest.mark.parametrize("k", [1, 2, 4])
def test_cart_correction_is_minus_the_summed_residuals(k: int) -> None:
    # Σ_t Δ̄_t = 0 ⇒ Σ_t SVD_k(Δ̄_t) = −Σ_t (Δ̄_t − SVD_k(Δ̄_t)): CART's λ = 1 step undoes the residuals that R(k)
    # measures, so its size is bounded by Σ_t sqrt(R_t(k))
    centred = task_matrices(WEIGHTS)
    avg = torch.stack(WEIGHTS).mean(0)
    merged = cart_merge(WEIGHTS, rank_ratio=k / 5, lambda_=1.0)
    residuals = sum(c - low_rank(c, k) for c in centred)
    assert_close(merged - avg, -residuals)
    bound = sum(math.sqrt(reconstruction_error([c], k)) for c in centred)
    assert float(torch.linalg.matrix_norm(merged - avg)) <= bound + 1e-9
    assert_close(low_rank_sum([spectrum(c) for c in centred], k), merged - avg)


# ---- curves over a state dict ------------------------------------------------------------------------------
def test_interference_curves_aggregate_and_skip_frozen() -> None:
    base = {"a": BASE, "frozen": torch.ones(3, 3, dtype=torch.float64), "bias": torch.zeros(6, dtype=torch.float64)}
    states = [{"a": w, "frozen": base["frozen"].clone(), "bias": torch.randn(6, generator=G, dtype=torch.float64)}
              for w in WEIGHTS]
    assert matrix_names([base, *states]) == ["a"]
    many = {f"m{i}": BASE for i in range(10)}
    picked = interference_curves([{k: w for k in many} for w in WEIGHTS], many, [0.2], max_matrices=3)
    assert picked[0].matrices == 3
    points = interference_curves(states, base, [0.2, 1.0, 0.2])
    assert [(p.centred, p.ratio) for p in points] == [(False, 0.2), (False, 1.0), (True, 0.2), (True, 1.0)]
    t = len(states)
    for p in points:
        deltas = task_matrices(WEIGHTS, None if p.centred else BASE)
        k = 1 if p.ratio == 0.2 else 5
        assert p.matrices == 1
        assert p.mean_interference == pytest.approx(row_space_interference(deltas, k))
        assert p.mean_interference_norm == pytest.approx(p.mean_interference / (t * (t - 1)))
        assert p.mean_interference_full_norm == pytest.approx(
            row_space_interference(deltas, k, normalize="full") / (t * (t - 1)))
        assert p.mean_relative_error == pytest.approx(reconstruction_error(deltas, k) / reconstruction_error(deltas, 0))
        assert p.total_error == pytest.approx(reconstruction_error(deltas, k))
