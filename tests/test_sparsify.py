"""Golden tests for the sparsification masks (TIES top-k, DARE Bernoulli, Breadcrumbs outliers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergelab.methods.sparsify import (
    bernoulli_mask,
    generator_for,
    magnitude_mask,
    outlier_mask,
    threshold_mask,
    topk_mask,
)


def _idx(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask.reshape(-1)).reshape(-1).tolist()


# --- topk_mask -------------------------------------------------------------------------------------------

def test_topk_distinct_values() -> None:
    mag = torch.tensor([0.3, 5.0, 0.1, 2.0, 4.0])
    assert _idx(topk_mask(mag, 2)) == [1, 4]
    assert _idx(topk_mask(mag, 3)) == [1, 3, 4]


def test_topk_exact_k_with_ties_at_the_threshold() -> None:
    # three entries tie at the threshold 2; k = 3 needs the 3 (index 4) and two of the 2s: torch's sort
    # (mergekit's choice) keeps the first two on a tensor this small
    mag = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0])
    mask = topk_mask(mag, 3)
    assert int(mask.sum()) == 3
    assert _idx(mask) == [1, 2, 4]


def test_topk_all_equal_keeps_first_k() -> None:
    mag = torch.full((2, 3), 7.0)
    mask = topk_mask(mag, 4)
    assert mask.shape == (2, 3)
    assert mask.tolist() == [[True, True, True], [True, False, False]]


def test_topk_ties_nested_for_increasing_k() -> None:
    mag = torch.tensor([1.0, 1.0, 1.0, 0.5, 1.0, 0.5])
    previous = torch.zeros(6, dtype=torch.bool)
    for k in range(7):
        mask = topk_mask(mag, k)
        assert int(mask.sum()) == k
        assert bool((previous & ~mask).sum() == 0), "top-(k-1) must be inside top-k"
        previous = mask
    assert _idx(topk_mask(mag, 5)) == [0, 1, 2, 3, 4]


def test_topk_edge_k() -> None:
    mag = torch.tensor([1.0, 2.0])
    assert topk_mask(mag, 0).sum() == 0
    assert topk_mask(mag, -1).sum() == 0
    assert topk_mask(mag, 2).all()
    assert topk_mask(mag, 10).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_topk_dtypes(dtype: torch.dtype) -> None:
    mag = torch.tensor([[0.5, 3.0], [2.0, 2.0]], dtype=dtype)
    assert topk_mask(mag, 2).tolist() == [[False, True], [True, False]]


# --- magnitude_mask --------------------------------------------------------------------------------------

DELTA10 = torch.tensor([0.1, -0.9, 0.5, 0.3, -1.0, 0.7, -0.2, 0.8, 0.4, -0.6])
# rank by |δ| (largest first): 4 (1.0), 1 (0.9), 7 (0.8), 5 (0.7), 9 (0.6), 2 (0.5), 8 (0.4), 3, 6, 0


def test_magnitude_mask_counts_and_sign_ignored() -> None:
    assert _idx(magnitude_mask(DELTA10, 0.3)) == [1, 4, 7]
    assert int(magnitude_mask(DELTA10, 0.55).sum()) == 5  # k = int(5.5)
    assert _idx(magnitude_mask(DELTA10, 0.01)) == [4]  # at least one entry when density > 0
    assert magnitude_mask(DELTA10, 0.0).sum() == 0
    assert magnitude_mask(DELTA10, 1.0).all()
    assert magnitude_mask(torch.zeros(0), 0.5).numel() == 0


def test_threshold_mask_inclusive() -> None:
    assert _idx(threshold_mask(DELTA10, 0.8)) == [1, 4, 7]
    assert _idx(threshold_mask(DELTA10, 0.95)) == [4]


# --- outlier_mask (Breadcrumbs) --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("density", "gamma", "kept"),
    [
        # target 5, drop 2 largest (4, 1) and 10-5-2 = 3 smallest (3, 6, 0)
        (0.5, 0.2, [2, 5, 7, 8, 9]),
        # target 3, drop the largest (4) and 6 smallest
        (0.3, 0.1, [1, 5, 7]),
        # gamma 0: plain top-3
        (0.3, 0.0, [1, 4, 7]),
        # target 9 + 2 outliers > 10: only 1 outlier can go (the largest), no small ones
        (0.9, 0.2, [0, 1, 2, 3, 5, 6, 7, 8, 9]),
        # target 2, gamma 0.5: drop 5 largest and 3 smallest → ranks 6, 7 (|δ| 0.5, 0.4)
        (0.2, 0.5, [2, 8]),
        (0.0, 0.2, []),
        (1.0, 0.2, list(range(10))),
    ],
)
def test_outlier_mask_which_are_kept(density: float, gamma: float, kept: list[int]) -> None:
    mask = outlier_mask(DELTA10, density, gamma)
    assert _idx(mask) == kept
    assert int(mask.sum()) == (10 if density >= 1 else int(density * 10))


def test_outlier_mask_shape_and_ties() -> None:
    delta = torch.ones(2, 5)
    mask = outlier_mask(delta, 0.4, 0.2)
    assert mask.shape == (2, 5)
    # all tie: ranks 4..7 of torch's ascending sort are kept, as in mergekit (the first indices on a
    # tensor this small)
    assert _idx(mask) == [4, 5, 6, 7]


# --- bernoulli_mask / generator_for ----------------------------------------------------------------------

def test_bernoulli_mask_reproducible_and_rate() -> None:
    shape = torch.Size([200, 50])
    a = bernoulli_mask(shape, 0.3, generator_for(5, 0))
    b = bernoulli_mask(shape, 0.3, generator_for(5, 0))
    assert torch.equal(a, b)
    assert not torch.equal(a, bernoulli_mask(shape, 0.3, generator_for(5, 1)))
    assert not torch.equal(a, bernoulli_mask(shape, 0.3, generator_for(6, 0)))
    # 10,000 draws: sd of the rate = sqrt(.3 * .7 / 1e4) = 0.0046; allow 5 sd
    assert abs(float(a.float().mean()) - 0.3) < 5 * (0.3 * 0.7 / 1e4) ** 0.5
    assert bernoulli_mask(shape, 1.0, generator_for(0, 0)).all()
    assert a.dtype == torch.bool


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_topk_mask_cuda_branch_matches_cpu() -> None:
    # CUDA takes the topk() threshold branch; straddling ties are still ordered by the CPU sort
    mag = torch.tensor([[1.0, 2.0, 2.0], [2.0, 3.0, 0.5]])
    for k in range(7):
        assert torch.equal(topk_mask(mag.cuda(), k).cpu(), topk_mask(mag, k))


def _argsort_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    # mergekit's top-k: the first k of torch.argsort of the float32 magnitudes (CPU), ties in its order
    flat = delta.abs().reshape(-1).float()
    k = max(1, int(density * flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.argsort(flat, descending=True)[:k]] = True
    return mask.reshape(delta.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("seed", range(4))
def test_magnitude_mask_from_bit_patterns_keeps_what_argsort_keeps_among_heavy_ties(dtype: torch.dtype,
                                                                                    seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = [3_001, 40_000, 70_001, 150_000][seed]
    delta = (torch.randn(n, generator=g) * 0.002).to(dtype)
    if dtype == torch.float32:  # float32 ties only where values repeat: round them to a few hundred levels
        delta = (delta * 2e4).round() / 2e4
    delta[::7] = 0.0
    delta[::11] = -0.0  # signed zeros tie with zeros
    for density in (0.01, 0.3, 0.5, 0.9):
        assert torch.equal(magnitude_mask(delta, density), _argsort_mask(delta, density)), density
    assert torch.equal(magnitude_mask(delta.reshape(-1, 1000 if n % 1000 == 0 else 1), 0.3),
                       _argsort_mask(delta, 0.3).reshape(-1, 1000 if n % 1000 == 0 else 1))


def test_magnitude_mask_with_nan_or_inf_falls_back_to_the_float_selection() -> None:
    delta = (torch.randn(5_000, generator=torch.Generator().manual_seed(1)) * 0.01).bfloat16()
    delta[3] = float("inf")
    assert torch.equal(magnitude_mask(delta, 0.3), _argsort_mask(delta, 0.3))
    delta[5] = float("nan")
    mask = magnitude_mask(delta, 0.3)
    assert int(mask.sum()) == 1_500 and bool(mask[3])


def test_topk_rule_applied_piece_by_piece_is_the_whole_mask() -> None:
    from mergelab.methods.sparsify import magnitude_keys, topk_of_keys

    g = torch.Generator().manual_seed(5)
    delta = (torch.randn(30_001, generator=g) * 0.002).bfloat16()  # a few hundred magnitudes: straddling ties
    for density in (0.0, 0.01, 0.3, 0.77, 1.0):
        rule = topk_of_keys(magnitude_keys(delta), density)
        assert rule is not None
        assert (rule.ties is not None) == (0 < density < 1)  # the straddling case is the one exercised
        pieces = [rule.apply(delta[a:a + 997], a) for a in range(0, delta.numel(), 997)]
        assert torch.equal(torch.cat(pieces), magnitude_mask(delta, density)), density


def test_band_rule_of_distinct_magnitudes_is_a_key_interval() -> None:
    from mergelab.methods.sparsify import band_of_keys, magnitude_keys

    delta = DELTA10.float()  # |δ| 0.1 … 1.0, distinct
    rule = band_of_keys(magnitude_keys(delta), 0.5, 0.2)  # ranks 3..7 ascending: |δ| 0.4 … 0.8
    assert rule is not None and rule.ties is None and rule.ceiling_ties is None
    assert rule.threshold == int(magnitude_keys(torch.tensor([0.4]))[0])
    assert rule.ceiling == int(magnitude_keys(torch.tensor([0.8]))[0])
    assert _idx(rule.apply(delta)) == [2, 5, 7, 8, 9]
    assert band_of_keys(magnitude_keys(delta), 0.0, 0.2) == band_of_keys(magnitude_keys(delta), 0.05, 0.2)
    assert _idx(band_of_keys(magnitude_keys(delta), 0.0, 0.2).apply(delta)) == []  # type: ignore[union-attr]
    assert _idx(band_of_keys(magnitude_keys(delta), 1.0, 0.2).apply(delta)) == list(range(10))  # type: ignore[union-attr]


def test_band_rule_of_all_equal_magnitudes_lists_the_sorts_choice_at_both_edges() -> None:
    from mergelab.methods.sparsify import band_of_keys, magnitude_keys

    delta = torch.ones(10)  # one key: both edges straddle it, the sort's ranks 4..7 are kept
    rule = band_of_keys(magnitude_keys(delta), 0.4, 0.2)
    assert rule is not None and rule.threshold == rule.ceiling
    assert rule.ties is not None and rule.ceiling_ties is not None
    assert rule.ties.tolist() == rule.ceiling_ties.tolist() == [4, 5, 6, 7]
    assert _idx(rule.apply(delta)) == [4, 5, 6, 7]
    pieces = [rule.apply(delta[a:a + 3], a) for a in range(0, 10, 3)]
    assert _idx(torch.cat(pieces)) == [4, 5, 6, 7]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("seed", range(4))
def test_band_rule_applied_piece_by_piece_is_the_whole_outlier_mask(dtype: torch.dtype, seed: int) -> None:
    # heavy ties (bf16/fp16 magnitudes, float32 rounded to a few hundred levels, signed zeros): the edges
    # straddle tied keys in many cases, and the rule must keep what torch's one ascending sort keeps
    from mergelab.methods.sparsify import band_of_keys, magnitude_keys

    g = torch.Generator().manual_seed(seed)
    # pieces of one entry on 401 entries: a call per entry on 3,001 took 5-6 s per dtype
    n, piece_sizes = [(401, (1, 37)), (3_001, (37, 1000)), (20_001, (37, 1000)), (50_001, (1000,))][seed]
    delta = (torch.randn(n, generator=g) * 0.002).to(dtype)
    if dtype == torch.float32:
        delta = (delta * 2e4).round() / 2e4
    delta[::7] = 0.0
    delta[::11] = -0.0
    straddled = 0
    for density in (0.0, 0.01, 0.3, 0.9, 0.99, 1.0):
        for gamma in (0.0, 0.01, 0.3, 1.0):
            whole = outlier_mask(delta, density, gamma)
            rule = band_of_keys(magnitude_keys(delta).clone(), density, gamma, overwrite=True)
            assert rule is not None
            straddled += rule.ties is not None or rule.ceiling_ties is not None
            for piece in piece_sizes:
                pieces = [rule.apply(delta[a:a + piece], a) for a in range(0, n, piece)]
                assert torch.equal(torch.cat(pieces), whole), (density, gamma, piece)
    assert straddled >= 5  # the sort replay is exercised, not only key intervals


def test_bernoulli_mask_compares_draws_with_the_float32_the_density_rounds_to_as_torch_does() -> None:
    # p lies a quarter of the way from a = float32(0.3) to the next float32 up, so it rounds down to a: a draw
    # equal to a is not below float32(p) (torch's `draws < p`), though it is below p itself
    a = float(np.float32(0.3))
    up = float(np.nextafter(np.float32(0.3), np.float32(1)))
    below = float(np.nextafter(np.float32(0.3), np.float32(0)))
    p = a + (up - a) / 4
    draws = torch.tensor([below, a, up, 0.0], dtype=torch.float32)
    mask = bernoulli_mask(draws.shape, p, lambda shape: draws.reshape(shape))
    assert mask.tolist() == [True, False, False, True]
    assert torch.equal(mask, draws < p)
    # a single entry (0-d) comes back a 0-d boolean tensor
    scalar = bernoulli_mask(torch.Size([]), 0.5, lambda shape: torch.tensor(0.25).reshape(shape))
    assert scalar.shape == () and scalar.dtype == torch.bool and bool(scalar)


# --- tie_order: stable -----------------------------------------------------------------------------------

def _stable_sort_mask(delta: torch.Tensor, start: int, stop: int, *, descending: bool) -> torch.Tensor:
    """The ranks ``[start, stop)`` of a stable sort of the float32 magnitudes: what ``tie_order: stable`` keeps."""
    order = torch.sort(delta.reshape(-1).float().abs(), descending=descending, stable=True).indices
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[order[start:stop]] = True
    return mask.reshape(delta.shape)


def test_stable_tie_order_keeps_the_lowest_indices_tied_at_the_kth_rank() -> None:
    # |δ| = 2 2 5 2 2 1: k = int(0.5 · 6) = 3 keeps the 5 and two of the four 2s, the first two by index
    delta = torch.tensor([2.0, -2.0, 5.0, 2.0, -2.0, 1.0])
    assert _idx(magnitude_mask(delta, 0.5, "stable")) == [0, 1, 2]
    assert _idx(magnitude_mask(delta.double(), 0.5, "stable")) == [0, 1, 2]  # float64: no keys, torch's path


def test_stable_tie_order_band_drops_the_lowest_indices_at_the_low_edge_and_keeps_them_at_the_high_edge() -> None:
    # |δ| = 1 1 1 1 2 2 2 2 3 3, density 0.4, gamma 0.1: ascending ranks [5, 9) of n = 10. The 2s hold ranks
    # 4-7 by index (index 4 below the band), the 3s ranks 8-9 (index 9 above it): kept 5, 6, 7 and 8
    delta = torch.tensor([1.0, -1.0, 1.0, 1.0, 2.0, -2.0, 2.0, 2.0, 3.0, -3.0])
    for x in (delta, delta.bfloat16(), delta.double()):
        assert _idx(outlier_mask(x, 0.4, 0.1, "stable")) == [5, 6, 7, 8], x.dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(3))
def test_stable_tie_order_keeps_a_stable_sorts_ranks_among_heavy_ties(dtype: torch.dtype, seed: int) -> None:
    from mergelab.methods.sparsify import _outlier_ranks

    g = torch.Generator().manual_seed(seed)
    n = [5_003, 40_000, 1_500_001][seed]  # the last past one block of the tied entries' scan
    delta = (torch.randn(n, generator=g) * 0.002).to(dtype)
    if dtype in (torch.float32, torch.float64):  # ties only where values repeat: round them to a few hundred levels
        delta = (delta * 2e4).round() / 2e4
    delta[::7] = 0.0
    for density, gamma in ((0.01, 0.0), (0.3, 0.01), (0.5, 0.2), (0.9, 0.05)):
        k = max(1, int(density * n))
        assert torch.equal(magnitude_mask(delta, density, "stable"),
                           _stable_sort_mask(delta, 0, k, descending=True)), density
        start, stop = _outlier_ranks(n, density, gamma)
        assert torch.equal(outlier_mask(delta, density, gamma, "stable"),
                           _stable_sort_mask(delta, start, stop, descending=False)), (density, gamma)


def test_stable_and_sort_tie_orders_keep_the_same_count_and_differ_only_among_tied_magnitudes() -> None:
    delta = (torch.randn(200_000, generator=torch.Generator().manual_seed(3)) * 0.002).bfloat16()
    stable, sort = magnitude_mask(delta, 0.3, "stable"), magnitude_mask(delta, 0.3)
    assert int(stable.sum()) == int(sort.sum()) == 60_000
    differ = stable != sort
    assert bool(differ.any())  # the sort's order is not the index order on a tensor this large
    threshold = delta.float().abs()[sort].min()
    assert bool((delta.float().abs()[differ] == threshold).all())


@pytest.mark.parametrize("two_sided", [False, True])
def test_stable_rules_applied_piece_by_piece_are_the_whole_mask(two_sided: bool) -> None:
    from mergelab.methods.sparsify import band_of_keys, magnitude_keys, topk_of_keys

    delta = (torch.randn(30_001, generator=torch.Generator().manual_seed(5)) * 0.002).bfloat16()
    for density in (0.01, 0.3, 0.77):
        keys = magnitude_keys(delta)
        rule = (band_of_keys(keys.clone(), density, 0.05, tie_order="stable") if two_sided
                else topk_of_keys(keys.clone(), density, tie_order="stable"))
        assert rule is not None and (rule.ties is not None or rule.ceiling_ties is not None)
        whole = outlier_mask(delta, density, 0.05, "stable") if two_sided else magnitude_mask(delta, density, "stable")
        pieces = [rule.apply(delta[a:a + 997], a) for a in range(0, delta.numel(), 997)]
        assert torch.equal(torch.cat(pieces), whole), density


def test_stable_band_inside_one_run_of_equal_magnitudes_keeps_the_middle_of_that_run() -> None:
    from mergelab.methods.sparsify import band_of_keys, magnitude_keys

    # 40 ones then 3 twos, density 0.3, gamma 0.1: n = 43, target 12, ascending ranks [27, 39), all ones, so both
    # edges are the key of 1.0 and the band is indices 27-38 of the run, listed at both edges
    delta = torch.tensor([1.0] * 40 + [2.0] * 3).bfloat16()
    keys = magnitude_keys(delta)
    rule = band_of_keys(keys.clone(), 0.3, 0.1, tie_order="stable")
    assert rule is not None and rule.threshold == rule.ceiling
    assert rule.ties.tolist() == rule.ceiling_ties.tolist() == list(range(27, 39))  # type: ignore[union-attr]
    assert _idx(rule.mask(keys)) == _idx(outlier_mask(delta, 0.3, 0.1, "stable")) == list(range(27, 39))
