"""Golden tests for the SVD-family merges: TSV-M, Iso-C and Iso-CTS, on matrices whose answer is known in
closed form (diagonal and orthogonal task vectors, shared directions, angles worked out by hand)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from mergelab import merge_state_dicts
from mergelab.methods import cart_merge, get_method, iso_c_merge, iso_cts_merge, tsv_merge
from mergelab.methods.iso_cts import iso_cts_split
from mergelab.methods.registry import TensorInputs
from mergelab.methods.spectral import numerical_rank, polar_factor, thin_svd
from mergelab.methods.tsv import tsv_rank

F64 = torch.float64


def _diag(*values: float) -> torch.Tensor:
    return torch.diag(torch.tensor(values, dtype=F64))


def _e(i: int, n: int = 4) -> torch.Tensor:
    v = torch.zeros(n, dtype=F64)
    v[i] = 1.0
    return v


def _outer(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.outer(u, v)


ZERO4 = torch.zeros(4, 4, dtype=F64)


# ---- shared helpers ---------------------------------------------------------------------------------------
def test_polar_factor_of_orthonormal_columns_is_itself() -> None:
    q, _ = torch.linalg.qr(torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=F64))
    assert_close(polar_factor(q), q)


def test_polar_factor_of_repeated_column_is_the_unique_partial_isometry() -> None:
    # [e1, e1] = (√2 e1) · ([1, 1]/√2)ᵀ: one non-zero singular value → e1 [1, 1]/√2
    got = polar_factor(torch.stack([_e(0, 3), _e(0, 3)], dim=1))
    assert_close(got, torch.stack([_e(0, 3), _e(0, 3)], dim=1) / math.sqrt(2))


def _lapack_gives_up(monkeypatch: pytest.MonkeyPatch, *dtypes: torch.dtype) -> list[torch.dtype]:
    """torch.linalg.svd raises LAPACK's 'failed to converge' on the given dtypes; returns the dtypes it was
    called with, in order."""
    svd, calls = torch.linalg.svd, []

    def failing(a: torch.Tensor, *args: object, **kwargs: object) -> torch.return_types.linalg_svd:
        calls.append(a.dtype)
        if a.dtype in dtypes:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 1)")
        return svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", failing)
    return calls


def test_thin_svd_retries_in_float64_where_lapack_gives_up_and_keeps_the_dtype(
        monkeypatch: pytest.MonkeyPatch) -> None:
    m = torch.tensor([[0.0, 2.0], [-3.0, 0.0], [0.0, 0.0]])
    calls = _lapack_gives_up(monkeypatch, torch.float32)
    u, s, vh = thin_svd(m)
    assert calls == [torch.float32, torch.float64]
    assert u.dtype == s.dtype == vh.dtype == torch.float32 and u.shape == (3, 2) and vh.shape == (2, 2)
    assert s.tolist() == [3.0, 2.0]
    assert_close((u * s) @ vh, m)


def test_thin_svd_falls_back_to_gesvd_when_float64_fails_too(monkeypatch: pytest.MonkeyPatch) -> None:
    m = torch.tensor([[0.0, 2.0], [-3.0, 0.0], [0.0, 0.0]])
    _lapack_gives_up(monkeypatch, torch.float32, torch.float64)
    u, s, vh = thin_svd(m)
    assert s.dtype == torch.float32 and s.tolist() == [3.0, 2.0]
    assert_close((u * s) @ vh, m)
    assert_close(u.T @ u, torch.eye(2))


def test_thin_svd_of_float64_goes_straight_to_gesvd_without_repeating_the_failed_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    m = torch.tensor([[0.0, 2.0], [-3.0, 0.0], [0.0, 0.0]], dtype=F64)
    calls = _lapack_gives_up(monkeypatch, torch.float64)
    u, s, vh = thin_svd(m)
    assert calls == [torch.float64]
    assert s.dtype == F64 and s.tolist() == [3.0, 2.0]
    assert_close((u * s) @ vh, m)


def test_thin_svd_of_a_matrix_lapack_decomposes_is_lapacks_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    m = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.linalg.svd(m, full_matrices=False)
    calls = _lapack_gives_up(monkeypatch)
    for got, want in zip(thin_svd(m), expected, strict=True):
        assert torch.equal(got, want)
    assert calls == [torch.float32]


@pytest.mark.parametrize("merge", [
    lambda b, ts: cart_merge(ts, rank_ratio=0.25, lambda_=2.0),
    lambda b, ts: tsv_merge(b, ts), lambda b, ts: iso_c_merge(b, ts), lambda b, ts: iso_cts_merge(b, ts)],
    ids=["cart", "tsv", "iso_c", "iso_cts"])
def test_svd_merges_give_their_result_when_lapack_gives_up_on_float32(monkeypatch: pytest.MonkeyPatch,
                                                                       merge: object) -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(12, 8, generator=gen)
    tensors = [base + 0.1 * torch.randn(12, 8, generator=gen) for _ in range(3)]
    expected = merge(base, tensors)  # type: ignore[operator]
    calls = _lapack_gives_up(monkeypatch, torch.float32)
    got = merge(base, tensors)  # type: ignore[operator]
    assert torch.float64 in calls and got.dtype == torch.float32
    assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_numerical_rank() -> None:
    assert numerical_rank(torch.tensor([4.0, 1.0, 0.0]), (3, 3)) == 2
    assert numerical_rank(torch.tensor([4.0, 1e-9]), (2, 2)) == 1  # below 2 · eps(float32) · 4
    assert numerical_rank(torch.zeros(3), (3, 3)) == 0


# ---- TSV-M ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "tasks", "ratio", "rank"),
                         [((4, 4), 2, None, 2), ((10, 6), 3, None, 2), ((3, 3), 8, None, 1),
                          ((8, 8), 2, 0.25, 2), ((100, 30), 4, 0.1, 3)])
def test_tsv_rank_is_full_rank_over_tasks(shape: tuple[int, int], tasks: int, ratio: float | None,
                                          rank: int) -> None:
    assert tsv_rank(shape, tasks, ratio) == rank


def test_tsv_orthogonal_tasks_sum_exactly() -> None:
    # disjoint diagonal supports: the stacked singular vectors are already orthonormal → plain sum
    taus = [_diag(3, 1, 0, 0), _diag(0, 0, 2, 5)]
    assert_close(tsv_merge(ZERO4, taus), _diag(3, 1, 2, 5))
    assert_close(tsv_merge(ZERO4, taus, lambda_=0.5), _diag(1.5, 0.5, 1, 2.5))
    assert_close(tsv_merge(ZERO4, taus, weights=[2.0, 1.0]), _diag(6, 2, 2, 5))


def test_tsv_keeps_the_top_k_triplets_of_each_task() -> None:
    # k = ⌊4/2⌋ = 2: τ1 loses its 0.5 and τ2 its 0.1; rank_ratio 0.25 → k = 1 keeps 3 e1e1ᵀ and 4 e3e3ᵀ
    taus = [_diag(3, 1, 0.5, 0), _diag(0.1, 0, 4, 2)]
    base = torch.ones(4, 4, dtype=F64)
    fts = [base + t for t in taus]
    assert_close(tsv_merge(base, fts), base + _diag(3, 1, 4, 2))
    assert_close(tsv_merge(base, fts, rank_ratio=0.25), base + _diag(3, 0, 4, 0))


def test_tsv_counts_a_direction_shared_by_all_tasks_once() -> None:
    # two identical rank-1 task vectors 4 e1 e2ᵀ: U = [e1, e1] → e1 [1, 1]/√2, likewise V, so
    # U⊥ diag(4, 4) V⊥ᵀ = 2 · (1/2) · 4 e1 e2ᵀ = 4 e1 e2ᵀ — one task vector, where task arithmetic gives 8
    tau = 4 * _outer(_e(0, 3), _e(1, 3))
    assert_close(tsv_merge(torch.zeros(3, 3, dtype=F64), [tau, tau]), tau)


def test_tsv_turns_a_nearly_shared_direction_into_orthogonal_ones_at_full_strength() -> None:
    # the flip side (the polar factor is discontinuous at duplicates; FusionBench's code does the same):
    # 4 e1 e2ᵀ and 4 u vᵀ with u, v within 1e-6 of e1, e2. Procrustes pushes both pairs of singular vectors
    # 90° apart, so the result has two singular values of 4 where the exactly shared case above has one
    zero = torch.zeros(4, 4, dtype=F64)
    delta = 1e-6
    u = (_e(0) + delta * _e(2)) / math.sqrt(1 + delta**2)
    v = (_e(1) + delta * _e(3)) / math.sqrt(1 + delta**2)
    got = tsv_merge(zero, [4 * _outer(_e(0), _e(1)), 4 * _outer(u, v)])
    assert_close(torch.linalg.svdvals(got), torch.tensor([4.0, 4.0, 0.0, 0.0], dtype=F64), atol=1e-6, rtol=0)


def test_tsv_rotates_two_oblique_directions_symmetrically_apart() -> None:
    # τ1 = 3 u1 e3ᵀ, τ2 = 2 u2 e4ᵀ with u1 = (1, 0), u2 at 60°: the closest orthonormal pair to [u1, u2]
    # keeps their bisector (30°) and sits ±45° around it, at −15° and 75°; V = [e3, e4] is orthonormal already
    def unit(deg: float) -> torch.Tensor:
        r = math.radians(deg)
        return torch.tensor([math.cos(r), math.sin(r), 0.0, 0.0], dtype=F64)

    taus = [3 * _outer(unit(0), _e(2)), 2 * _outer(unit(60), _e(3))]
    expected = 3 * _outer(unit(-15), _e(2)) + 2 * _outer(unit(75), _e(3))
    assert_close(tsv_merge(ZERO4, taus), expected)


def test_tsv_non_matrix_tensors_get_the_mean_task_vector() -> None:
    base = torch.tensor([1.0, 1.0])
    fts = [torch.tensor([2.0, 3.0]), torch.tensor([4.0, 5.0])]  # τ = (1, 2), (3, 4) → mean (2, 3)
    assert_close(tsv_merge(base, fts), torch.tensor([3.0, 4.0]))
    assert_close(tsv_merge(base, fts, lambda_=2.0), torch.tensor([5.0, 7.0]))


# ---- Iso-C ------------------------------------------------------------------------------------------------
def test_iso_c_flattens_the_spectrum_of_the_sum() -> None:
    # Σ τ = diag(3, 1): σ̄ = 2, U Vᵀ = I
    taus = [_diag(3, 0), _diag(0, 1)]
    zero = torch.zeros(2, 2, dtype=F64)
    assert_close(iso_c_merge(zero, taus), _diag(2, 2))
    assert_close(iso_c_merge(zero, taus, lambda_=1.5), _diag(3, 3))


def test_iso_c_keeps_the_singular_vectors_signs() -> None:
    # Σ τ = diag(3, −1) = I · diag(3, 1) · diag(1, −1): σ̄ = 2 → diag(2, −2)
    zero = torch.zeros(2, 2, dtype=F64)
    assert_close(iso_c_merge(zero, [_diag(3, 0), _diag(0, -1)]), _diag(2, -2))


def test_iso_c_rectangular_by_hand() -> None:
    # Σ τ = [[0, 4], [3, 0], [0, 0]]: σ = (4, 3), σ̄ = 3.5, U Vᵀ = [[0, 1], [1, 0], [0, 0]]
    total = torch.tensor([[0.0, 4.0], [3.0, 0.0], [0.0, 0.0]], dtype=F64)
    got = iso_c_merge(torch.zeros(3, 2, dtype=F64), [total / 2, total / 2])
    assert_close(got, 3.5 * torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]], dtype=F64))


def test_iso_c_leaves_the_null_space_of_a_rank_deficient_sum_out() -> None:
    # Σ τ = diag(4, 0): σ̄ = mean(4, 0) = 2 on the one defined direction; e2's singular vectors are arbitrary
    zero = torch.zeros(2, 2, dtype=F64)
    assert_close(iso_c_merge(zero, [_diag(1, 0), _diag(3, 0)]), _diag(2, 0))


def test_iso_c_result_has_a_flat_spectrum_and_the_sums_singular_vectors() -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(7, 5, generator=g, dtype=F64)
    fts = [base + torch.randn(7, 5, generator=g, dtype=F64) for _ in range(3)]
    delta = iso_c_merge(base, fts) - base
    s_sum = torch.linalg.svdvals(sum(f - base for f in fts))
    assert_close(torch.linalg.svdvals(delta), torch.full((5,), float(s_sum.mean()), dtype=F64))
    # same column space as the sum: projecting onto it changes nothing
    u = torch.linalg.svd(sum(f - base for f in fts), full_matrices=False)[0]
    assert_close(u @ (u.T @ delta), delta)


def test_iso_c_non_matrix_tensors_get_the_mean_task_vector() -> None:
    base = torch.zeros(3)
    fts = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])]
    assert_close(iso_c_merge(base, fts, lambda_=3.0), torch.tensor([6.0, 6.0, 6.0]))


# ---- Iso-CTS ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "tasks", "fraction", "split"),
                         [((4, 4), 2, 0.5, (2, 1)), ((10, 10), 8, 0.8, (10, 0)), ((10, 10), 8, 0.5, (2, 1)),
                          ((100, 64), 8, 0.8, (48, 2)), ((3, 3), 2, 0.0, (1, 1)), ((6, 6), 3, 1.0, (6, 0))])
def test_iso_cts_split_fills_the_rank(shape: tuple[int, int], tasks: int, fraction: float,
                                      split: tuple[int, int]) -> None:
    common, per_task = iso_cts_split(shape, tasks, fraction)
    assert (common, per_task) == split
    assert common + tasks * per_task == min(shape)


def test_iso_cts_adds_each_tasks_own_direction_outside_the_common_subspace() -> None:
    # τ1 = 5 e1e1ᵀ + e3e3ᵀ, τ2 = 4 e2e2ᵀ + e3e4ᵀ; fraction 0.5 → c = 2, s = 1.
    # common: e1, e2 (σ 5, 4); each task outside it: e3e3ᵀ and e3e4ᵀ (σ 1, 1).
    # U = [e1, e2, e3, e3] → [e1, e2, e3/√2, e3/√2]; V = I; σ̄ = (5 + 4 + 1 + 1)/4 = 2.75
    taus = [5 * _outer(_e(0), _e(0)) + _outer(_e(2), _e(2)), 4 * _outer(_e(1), _e(1)) + _outer(_e(2), _e(3))]
    direction = _diag(1, 1, 0, 0) + _outer(_e(2), _e(2) + _e(3)) / math.sqrt(2)
    assert_close(iso_cts_merge(ZERO4, taus, common_space_fraction=0.5), 2.75 * direction)
    # Iso-C on the same input: Σ τ has σ = (5, 4, √2, 0) and the same directions, σ̄ = (9 + √2)/4
    assert_close(iso_c_merge(ZERO4, taus), (9 + math.sqrt(2)) / 4 * direction)


@pytest.mark.parametrize("seed", [0, 1])
def test_iso_cts_with_the_whole_rank_common_is_iso_c(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(9, 6, generator=g, dtype=F64)
    fts = [base + torch.randn(9, 6, generator=g, dtype=F64) for _ in range(3)]
    assert_close(iso_cts_merge(base, fts, common_space_fraction=1.0), iso_c_merge(base, fts))
    assert not torch.allclose(iso_cts_merge(base, fts, common_space_fraction=0.5), iso_c_merge(base, fts))


def test_iso_cts_result_has_a_flat_spectrum() -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.zeros(12, 10, dtype=F64)
    fts = [torch.randn(12, 10, generator=g, dtype=F64) for _ in range(4)]
    s = torch.linalg.svdvals(iso_cts_merge(base, fts, lambda_=2.0))
    assert_close(s, torch.full_like(s, float(s[0])))


# ---- all three: dtypes, threads, the registry and the engine ----------------------------------------------
MERGES = {"tsv": tsv_merge, "iso_c": iso_c_merge, "iso_cts": iso_cts_merge}


@pytest.mark.parametrize("name", sorted(MERGES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32_and_rounded_once(name: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(16, 12, generator=g).to(dtype)
    fts = [(base.float() + 0.1 * torch.randn(16, 12, generator=g)).to(dtype) for _ in range(3)]
    got = MERGES[name](base, fts)
    assert got.dtype == dtype
    assert torch.equal(got, MERGES[name](base.float(), [f.float() for f in fts]).to(dtype))


@pytest.mark.parametrize("name", sorted(MERGES))
def test_same_bytes_on_one_and_two_threads_through_the_engine(name: str) -> None:
    # 256×128 float32: MKL's SVD takes a thread-dependent path there; called bare (no one_thread) all three
    # methods gave different bytes on 1 and 2 threads when this test was written
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(256, 128, generator=g)}
    fts = [{"w": base["w"] + 0.05 * torch.randn(256, 128, generator=g)} for _ in range(3)]
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(merge_state_dicts(fts, name, base=base)["w"])
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])
    assert torch.get_num_threads() == old


@pytest.mark.parametrize("name", sorted(MERGES))
def test_adapters_pass_weights_and_parameters(name: str) -> None:
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(6, 5, generator=g, dtype=F64), "b": torch.randn(5, generator=g, dtype=F64)}
    fts = [{k: v + torch.randn(v.shape, generator=g, dtype=F64) for k, v in base.items()} for _ in range(2)]
    got = merge_state_dicts(fts, name, base=base, weights=[0.5, 2.0], parameters={"lambda": 0.7})
    for key in base:
        assert_close(got[key], MERGES[name](base[key], [f[key] for f in fts], [0.5, 2.0], lambda_=0.7))


@pytest.mark.parametrize("name", sorted(MERGES))
def test_config_dtype_float64_computes_in_float64(name: str) -> None:
    g = torch.Generator().manual_seed(6)
    base = torch.randn(9, 7, generator=g)
    fts = [base + torch.randn(9, 7, generator=g) for _ in range(3)]
    m = get_method(name)
    params = {p.name: p.default for p in m.global_params.values()}
    x = TensorInputs(name="w", tensors=fts, model_params=[{"weight": 1.0}] * 3, params=params, base=base,
                     dtype=torch.float64)
    expected = MERGES[name](base.double(), [f.double() for f in fts]).float()
    assert torch.equal(m.adapter(x), expected)
    assert torch.equal(MERGES[name](base, fts, dtype=torch.float64), expected)


def test_registered_names_and_defaults() -> None:
    assert get_method("tsv_m") is get_method("tsv")
    assert get_method("tsv").param("rank_ratio").default is None  # type: ignore[union-attr]
    assert get_method("iso_cts").param("common_space_fraction").default == 0.8  # type: ignore[union-attr]
    for name in MERGES:
        assert get_method(name).base == "required"
        assert get_method(name).param("lambda").default == 1.0  # type: ignore[union-attr]
