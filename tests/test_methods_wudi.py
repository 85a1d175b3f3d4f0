"""WUDI-Merging: golden cases worked out by hand, the loss decreasing from the sum, FusionBench conformance,
and an end-to-end merge through the engine."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.testing import assert_close

from mergelab.methods import get_method, wudi_merge
from mergelab.methods.wudi import wudi_exact_task_matrix, wudi_loss, wudi_task_matrix

F64 = torch.float64


def test_one_task_is_kept_exactly_since_its_gradient_is_zero() -> None:
    base = torch.zeros(3, 4, dtype=F64)
    ft = torch.arange(12, dtype=F64).reshape(3, 4) / 7
    assert torch.equal(wudi_merge(base, [ft]), ft)


def test_task_vectors_with_disjoint_row_spaces_give_their_sum() -> None:
    # τ_1 lives in input columns {0, 1}, τ_2 in {2}: (τ_1 + τ_2 − τ_1) τ_1ᵀ = τ_2 τ_1ᵀ = 0, so the sum is a zero
    # of the loss, where Adam does not move.
    t1 = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.5, 0.0]], dtype=F64)
    t2 = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, -2.0]], dtype=F64)
    base = torch.ones(2, 3, dtype=F64)
    assert wudi_loss(t1 + t2, [t1, t2]) == 0
    assert torch.equal(wudi_merge(base, [base + t1, base + t2], steps=50, lr=1e-2), base + t1 + t2)


def test_loss_of_a_hand_worked_pair() -> None:
    # τ_1 = [1, 0], τ_2 = [1, 1]: at the sum [2, 1], ((2,1)·(1,0) − 1)²/1 + ((2,1)·(1,1) − 2)²/2 = 1 + 1/2.
    # The optimum [1, 1] meets τ_m τ_iᵀ = τ_i τ_iᵀ for both tasks: loss 0.
    t1, t2 = torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([[1.0, 1.0]], dtype=F64)
    assert wudi_loss(t1 + t2, [t1, t2]).item() == pytest.approx(1.5)
    assert wudi_loss(torch.tensor([[1.0, 1.0]], dtype=F64), [t1, t2]).item() == 0


def test_enough_adam_steps_reach_the_hand_worked_optimum() -> None:
    t1, t2 = torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([[1.0, 1.0]], dtype=F64)
    assert_close(wudi_task_matrix([t1, t2], steps=3000, lr=1e-2), torch.tensor([[1.0, 1.0]], dtype=F64),
                 atol=1e-6, rtol=0)


def test_zero_steps_is_task_arithmetic_on_matrices_and_the_mean_elsewhere() -> None:
    g = torch.Generator().manual_seed(0)
    base, a, b = (torch.randn(5, 4, generator=g, dtype=F64) for _ in range(3))
    assert_close(wudi_merge(base, [a, b], steps=0), a + b - base)
    vb, va, vv = (torch.randn(6, generator=g, dtype=F64) for _ in range(3))
    assert_close(wudi_merge(vb, [va, vv], steps=300), (va + vv) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_never_increases_from_the_sum_at_the_paper_settings(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    taus = [0.01 * torch.randn(12, 8, generator=g, dtype=F64) for _ in range(4)]
    start = wudi_loss(torch.stack(taus).sum(0), taus)
    losses = [wudi_loss(wudi_task_matrix(taus, steps=s), taus).item() for s in (0, 50, 150, 300)]
    assert losses[0] == pytest.approx(start.item())
    assert all(later <= earlier for earlier, later in itertools.pairwise(losses))
    assert losses[-1] < losses[0]


def test_weights_scale_the_task_vectors_and_a_zero_task_vector_is_ignored() -> None:
    g = torch.Generator().manual_seed(3)
    base, a, b = (torch.randn(4, 6, generator=g) for _ in range(3))
    expected = wudi_merge(base, [base + 2 * (a - base), b])
    assert_close(wudi_merge(base, [a, b], [2.0, 1.0]), expected)
    assert torch.isfinite(wudi_merge(base, [a, base, b])).all()
    assert_close(wudi_merge(base, [a, base, b]), wudi_merge(base, [a, b]))


def test_registered_with_fusionbenchs_defaults() -> None:
    method = get_method("wudi")
    defaults = {p.name: p.default for p in method.params}
    assert defaults["steps"] == 300 and defaults["lr"] == 1e-5 and defaults["lambda"] == 1.0
    assert "arXiv:2503.08099" in method.paper


def test_exact_solver_gives_the_hand_worked_optimum() -> None:
    # τ_1 = [1, 0], τ_2 = [1, 1]: A = [[1.5, .5], [.5, .5]], C = [2, 1]; τ_m A = C has the one solution [1, 1].
    t1, t2 = torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([[1.0, 1.0]], dtype=F64)
    assert_close(wudi_exact_task_matrix([t1, t2]), torch.tensor([[1.0, 1.0]], dtype=F64), atol=1e-12, rtol=0)


def test_exact_solver_keeps_one_task_and_sums_disjoint_row_spaces_although_the_gram_is_singular() -> None:
    # Both grams here are singular (rank 2 of 4 input columns; rank 3 of 3 only jointly in the second case):
    # the pseudo-inverse loses nothing of the task vectors' rows.
    tau = torch.tensor([[1.0, 2.0, 0.0, 0.0], [-1.0, 0.5, 0.0, 0.0]], dtype=F64)
    assert_close(wudi_exact_task_matrix([tau]), tau, atol=1e-12, rtol=0)
    t1 = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.5, 0.0]], dtype=F64)
    t2 = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, -2.0]], dtype=F64)
    assert_close(wudi_exact_task_matrix([t1, t2]), t1 + t2, atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_solver_is_where_adam_ends_and_below_the_default_steps(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    taus = [0.01 * torch.randn(6, 5, generator=g, dtype=F64) for _ in range(3)]
    exact = wudi_exact_task_matrix(taus)
    assert wudi_loss(exact, taus) < wudi_loss(wudi_task_matrix(taus), taus)
    # Adam ends within about lr · 0.01 of the minimiser (entries ~1e-2): 1e-5 is 0.1 % of them
    assert_close(wudi_task_matrix(taus, steps=20000, lr=1e-4), exact, atol=1e-5, rtol=0)


def test_exact_solver_is_chosen_by_parameter_and_an_unknown_solver_is_refused() -> None:
    g = torch.Generator().manual_seed(4)
    base, a, b = (torch.randn(4, 3, generator=g, dtype=F64) for _ in range(3))
    expected = base + 0.5 * wudi_exact_task_matrix([a - base, b - base])
    assert_close(wudi_merge(base, [a, b], lambda_=0.5, solver="exact"), expected)
    vb, va, vv = (torch.randn(3, generator=g, dtype=F64) for _ in range(3))
    assert_close(wudi_merge(vb, [va, vv], solver="exact"), (va + vv) / 2)
    with pytest.raises(ValueError, match="solver must be one of"):
        wudi_merge(base, [a, b], solver="newton")
    assert dict((p.name, p.choices) for p in get_method("wudi").params)["solver"] == ("adam", "exact")


@pytest.mark.slow
@pytest.mark.parametrize(("tasks", "seed"), [(2, 0), (3, 1), (8, 2)])
def test_wudi_matches_fusionbench(tasks: int, seed: int) -> None:
    fb = pytest.importorskip("fusion_bench.method.wudi")
    g = torch.Generator().manual_seed(seed)
    shapes = {"attn.weight": (24, 16), "mlp.weight": (10, 30), "norm.weight": (16,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(tasks)]
    ref = fb.wudi_merging([{k: f[k] - base[k] for k in base} for f in fts], accelerator="cpu")
    for k in base:
        got = wudi_merge(base[k], [f[k] for f in fts]) - base[k]
        # float32, autograd's loss gradient there against the precomputed one here: rounding-level apart
        # (measured ≤ 2.1e-7 on the moves of ~3e-3 that 300 steps make).
        assert_close(got, ref[k].detach(), atol=2e-6, rtol=1e-5)
