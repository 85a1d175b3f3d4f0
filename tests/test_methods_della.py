"""Golden and statistical tests for DELLA (della, della_linear): MagPrune keep probabilities from magnitude
ranks, seeded coins, rescaling by 1/p_j (paper) or to the L1 norm (mergekit)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from mergelab.kernels import dispatch
from mergelab.methods import dare_merge, della_merge, get_method
from mergelab.methods.della import della_sparsifier, magprune_probabilities, rank_probabilities, vouched_della_merge
from mergelab.methods.registry import TensorInputs
from mergelab.methods.sparsify import drop_work_dtype

G = torch.Generator().manual_seed(77)
BASE = torch.randn(8, 16, generator=G, dtype=torch.float64)
MODELS = [BASE + torch.randn(8, 16, generator=G, dtype=torch.float64) for _ in range(3)]
W = [1.0, 0.5, 2.0]


def test_keep_probability_rises_linearly_with_magnitude_rank_within_each_row() -> None:
    # row 0: |δ| ranks 0.1→0, 0.4→3, 0.2→1, 0.3→2; row 1: 5→3, 1→0, 3→2, 2→1.  p = 0.4 + 0.2 · r / 3
    delta = torch.tensor([[0.1, -0.4, 0.2, 0.3], [5.0, 1.0, -3.0, 2.0]])
    p = magprune_probabilities(delta, density=0.5, epsilon=0.1)
    expected = torch.tensor([[0.4, 0.6, 0.4 + 0.2 / 3, 0.4 + 0.4 / 3],
                             [0.6, 0.4, 0.4 + 0.4 / 3, 0.4 + 0.2 / 3]])
    assert p.dtype == torch.float32
    assert_close(p, expected)
    assert_close(p.mean(dim=1), torch.tensor([0.5, 0.5]))  # mean keep probability = density


def test_one_dimensional_tensor_is_one_row_and_single_entries_get_density() -> None:
    p = magprune_probabilities(torch.tensor([3.0, -1.0, 2.0]), density=0.6, epsilon=0.2)
    assert_close(p, torch.tensor([0.8, 0.4, 0.6]))
    assert_close(magprune_probabilities(torch.tensor([[2.0], [5.0]]), 0.6, 0.2), torch.tensor([[0.6], [0.6]]))
    # dims beyond the second are separate rows too (mergekit ranks along dim 1): here every rank is over 2
    p3 = magprune_probabilities(torch.tensor([[[1.0, 9.0], [2.0, 0.5]]]), 0.5, 0.1)
    assert_close(p3, torch.tensor([[[0.4, 0.6], [0.6, 0.4]]]))


def test_equal_magnitudes_take_distinct_ranks_in_argsorts_order() -> None:
    # as mergekit: tied magnitudes still get ranks 0, 1, 2 (probabilities 0.3, 0.5, 0.7), in torch.argsort's order
    delta = torch.tensor([1.0, -1.0, 1.0])
    p = magprune_probabilities(delta, 0.5, 0.2)
    assert sorted(p.tolist()) == pytest.approx([0.3, 0.5, 0.7])
    order = torch.argsort(delta.abs().reshape(1, -1), dim=1)
    assert_close(p, 0.3 + 0.2 * order.argsort(dim=1).reshape(-1).float())


def test_probabilities_computed_in_mergekits_dtype() -> None:
    # float16 deltas: float32 (mergekit upcasts); bfloat16: bfloat16, where ranks above 256 round
    assert magprune_probabilities(torch.randn(4, 8).half(), 0.5, 0.1).dtype == torch.float32
    p = magprune_probabilities(torch.randn(1000).bfloat16(), 0.5, 0.1)
    assert p.dtype == torch.bfloat16 and len(set(p.tolist())) < 1000


@pytest.mark.parametrize("work", [torch.bfloat16, torch.float32])
def test_probabilities_looked_up_by_rank_are_mergekits_formula_over_the_whole_tensor(work: torch.dtype) -> None:
    # mergekit: r = ranks + 1 in the working dtype, (r − min) / (max − min) per row, then (d − ε) + 2ε · that;
    # rows of 1000 entries, so bfloat16 ranks above 256 round and several ranks share one probability
    g = torch.Generator().manual_seed(3)
    ranks = torch.stack([torch.randperm(1000, generator=g) for _ in range(4)])
    r = ranks.to(work) + 1
    lowest, highest = r.min(dim=1, keepdim=True).values, r.max(dim=1, keepdim=True).values
    expected = (0.3 - 0.1) + ((r - lowest) / (highest - lowest)).clamp(0, 1) * 2 * 0.1
    table = rank_probabilities(1000, 0.3, 0.1, work)
    assert table.dtype == work and torch.equal(table[ranks], expected)
    assert (len(set(table.tolist())) < 200) == (work == torch.bfloat16)


def test_kept_entries_divided_by_their_own_keep_probability() -> None:
    delta = torch.linspace(-3, 3, 200, dtype=torch.float64)
    p = magprune_probabilities(delta, 0.5, 0.3).double()
    out = della_sparsifier([0.5], [0.3], seed=11)(0, delta.clone())
    kept = out != 0
    assert 0 < int(kept.sum()) < 200
    assert_close(out[kept], delta[kept] / p[kept])
    raw = della_sparsifier([0.5], [0.3], seed=11, rescale=False)(0, delta.clone())
    assert torch.equal(raw != 0, kept)
    assert_close(raw[kept], delta[kept])


def test_rescale_l1_keeps_the_l1_norm() -> None:
    delta = MODELS[0] - BASE
    out = della_sparsifier([0.3], [0.1], seed=3, rescale_mode="l1")(0, delta.clone())
    kept = out != 0
    factor = delta.abs().sum() / (delta * kept).abs().sum()
    assert_close(out[kept], delta[kept] * factor)
    assert out.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-12)


@pytest.mark.parametrize(("consensus", "normalize"), [(None, False), ("sum", True)])
def test_epsilon_zero_is_dare_with_the_same_seed(consensus: str | None, normalize: bool) -> None:
    # all keep probabilities equal density: the same coins (u < p) and the same 1/p as DARE (in float32, where
    # DELLA's per-entry probabilities live, the same bits)
    dens = [0.3, 0.6, 0.9]
    base, models = BASE.float(), [m.float() for m in MODELS]
    ours = della_merge(base, models, W, dens, [0.0] * 3, seed=5, consensus=consensus,  # type: ignore[arg-type]
                       normalize=normalize)
    assert torch.equal(ours, dare_merge(base, models, W, dens, seed=5, consensus=consensus,  # type: ignore[arg-type]
                                        normalize=normalize))


def test_density_one_and_zero() -> None:
    ones = della_merge(BASE, MODELS, W, [1.0] * 3, [0.15] * 3, seed=1, consensus=None, normalize=False)
    assert_close(ones, BASE + sum(w * (m - BASE) for w, m in zip(W, MODELS, strict=True)))
    assert_close(della_merge(BASE, MODELS, W, [0.0] * 3, [0.15] * 3, seed=1), BASE)


def test_keep_frequency_and_expectation_follow_the_ranks() -> None:
    # Over N seeds: the smallest entry is kept with p = 0.2, the largest with p = 0.8 (binomial sd ≤ 0.016 at
    # N = 1000; allow 4.5 sd), and E[δ̃] = δ (sd of the mean |δ| sqrt((1−p)/(pN)); 4.5 sd).
    n, density, eps = 1000, 0.5, 0.3
    delta = torch.tensor([0.1, -0.5, 1.0, -2.0, 4.0], dtype=torch.float64)
    p = magprune_probabilities(delta, density, eps).double()
    kept_count = torch.zeros(5, dtype=torch.float64)
    total = torch.zeros(5, dtype=torch.float64)
    for seed in range(n):
        out = della_sparsifier([density], [eps], seed=seed)(0, delta.clone())
        kept_count += out != 0
        total += out
    freq = kept_count / n
    assert bool(((freq - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt()).all()), (freq, p)
    assert freq[0] < 0.3 and freq[4] > 0.7
    sd = delta.abs() * ((1 - p) / (p * n)).sqrt()
    assert bool(((total / n - delta).abs() <= 4.5 * sd).all())


def test_same_seed_same_bytes_other_seed_other_mask() -> None:
    a = della_merge(BASE, MODELS, W, [0.4] * 3, [0.2] * 3, seed=7)
    assert torch.equal(a, della_merge(BASE, MODELS, W, [0.4] * 3, [0.2] * 3, seed=7))
    assert not torch.allclose(a, della_merge(BASE, MODELS, W, [0.4] * 3, [0.2] * 3, seed=8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("bad", [None, "nan in a model", "-inf in the base", "inf in a model, dropped"])
def test_della_vouches_for_its_inputs_only_where_its_one_pass_saw_every_task_vector_entry_finite(
        dtype: torch.dtype, bad: str | None) -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(40, 64, generator=g).to(dtype)
    models = [(base.float() + 0.1 * torch.randn(40, 64, generator=g)).to(dtype) for _ in range(2)]
    densities, epsilons = [0.05, 0.3], [0.04, 0.1]  # model 0 keeps about one entry in twenty
    if bad == "nan in a model":
        models[1][3, 7] = float("nan")
    elif bad == "-inf in the base":
        base[0, 0] = -float("inf")
    elif bad == "inf in a model, dropped":
        models[0][5, 5] = float("inf")
    got = vouched_della_merge(base, models, [1.0, 1.0], densities, epsilons, seed=3)
    plain = della_merge(base, models, [1.0, 1.0], densities, epsilons, seed=3)
    assert torch.equal(got.merged.view(torch.uint8), plain.view(torch.uint8))  # the same bytes, vouched or not
    loops = dispatch.loops() is not None and dtype != torch.float16  # no float16 one-pass loop
    assert got.inputs_finite is (bad is None and loops)
    if bad == "inf in a model, dropped":  # the reason a scan is needed at all: the result does not show it
        assert loops <= bool(torch.isfinite(got.merged).all())


def test_same_bytes_on_any_thread_count() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 500, generator=g)
    models = [base + 0.1 * torch.randn(300, 500, generator=g) for _ in range(2)]
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            outs.append(della_merge(base, models, [1.0, 1.0], [0.3, 0.3], [0.2, 0.2], seed=3))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize(("density", "epsilon"), [(0.9, 0.15), (0.1, 0.1), (0.5, 0.5)])
def test_probabilities_outside_zero_one_are_refused_with_the_fix(density: float, epsilon: float) -> None:
    with pytest.raises(ValueError, match=r"density ± epsilon must lie inside \(0, 1\).*use an epsilon below"):
        della_merge(BASE, MODELS, W, [density] * 3, [epsilon] * 3, seed=0)


def test_unknown_rescale_mode_raises() -> None:
    with pytest.raises(ValueError, match="rescale_mode"):
        della_merge(BASE, MODELS, W, [0.5] * 3, [0.1] * 3, seed=0, rescale_mode="l2")


def test_adapters_use_engine_seed_consensus_and_mergekit_defaults() -> None:
    della, linear = get_method("della"), get_method("della_linear")
    assert della.param("normalize").default is True and linear.param("normalize").default is False  # type: ignore[union-attr]
    assert della.param("epsilon").default == 0.15 and della.param("epsilon").scope == "model"  # type: ignore[union-attr]
    assert della.randomized and linear.randomized and "mergekit" in della.also_in
    params = {"lambda": 1.0, "normalize": True, "rescale": True, "rescale_mode": "density", "int8_mask": False}
    mp = [{"weight": w, "density": 0.4, "epsilon": 0.1, "tie_order": "sort"} for w in W]
    x = TensorInputs(name="w", tensors=MODELS, model_params=mp, params=params, base=BASE, seed=99)
    assert_close(della.adapter(x), della_merge(BASE, MODELS, W, [0.4] * 3, [0.1] * 3, seed=99))
    x.params = {**params, "normalize": False}
    assert_close(linear.adapter(x), della_merge(BASE, MODELS, W, [0.4] * 3, [0.1] * 3, seed=99, consensus=None,
                                                normalize=False))


def test_memory_of_the_sparsifier_is_a_few_tensors() -> None:
    # the sparsifier works in place on the caller's copy: the result is that tensor
    delta = torch.randn(64, 64, dtype=torch.float64)
    out = della_sparsifier([0.5], [0.2], seed=1)(0, delta)
    assert out.data_ptr() == delta.data_ptr()
    assert math.isfinite(float(out.abs().sum()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_seed_same_merge_on_cuda() -> None:
    # coins drawn and ties ranked on the CPU: the device changes only reduction rounding
    cpu = della_merge(BASE, MODELS, W, [0.4] * 3, [0.2] * 3, seed=7)
    gpu = della_merge(BASE.cuda(), [m.cuda() for m in MODELS], W, [0.4] * 3, [0.2] * 3, seed=7)
    assert_close(gpu.cpu(), cpu)


# --- tie_order: stable -----------------------------------------------------------------------------------

def test_stable_tie_order_ranks_equal_magnitudes_by_index() -> None:
    from mergelab.methods.della import stable_rank_values

    # |δ| = 2 1 2 1: the 1s take ranks 0 and 1 in index order, then the 2s ranks 2 and 3
    ranks = stable_rank_values(torch.tensor([[2.0, 1.0, 2.0, 1.0]]).bfloat16(), torch.arange(4.0))
    assert ranks.tolist() == [[2.0, 0.0, 3.0, 1.0]]
    # density 0.5, ε 0.1, n = 4: p(rank r) = 0.4 + 0.2 r / 3
    p = magprune_probabilities(torch.tensor([[2.0, -1.0, -2.0, 1.0]]), 0.5, 0.1, "stable")
    assert_close(p, torch.tensor([[0.4 + 0.4 / 3, 0.4, 0.6, 0.4 + 0.2 / 3]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64, 1024), (300, 300), (5, 7, 3), (300,)])
def test_stable_ranks_are_a_stable_argsorts_on_every_path(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    from mergelab.methods.della import stable_rank_values

    g = torch.Generator().manual_seed(len(shape))
    delta = ((torch.randn(shape, generator=g) * 20).round() / 20).to(dtype)  # a few dozen magnitudes: heavy ties
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    order = torch.argsort(rows.abs().float(), dim=1, stable=True)
    expected = torch.empty_like(order).scatter_(1, order, torch.arange(rows.shape[1]).view(1, -1, *[1] * (
        order.dim() - 2)).expand_as(order))
    assert torch.equal(stable_rank_values(rows.abs(), torch.arange(rows.shape[1]).double()), expected.double())
    table = rank_probabilities(rows.shape[1], 0.4, 0.2, torch.float32)
    assert torch.equal(magprune_probabilities(delta.float(), 0.4, 0.2, "stable"),
                       table[expected].reshape(delta.shape))
    # in the delta's own dtype: 2-D bfloat16 and float16 ranks come from the compiled radix sort of the bits
    assert dispatch.warm_up()
    work = drop_work_dtype(dtype)
    table = rank_probabilities(rows.shape[1], 0.4, 0.2, work)
    assert torch.equal(magprune_probabilities(delta, 0.4, 0.2, "stable"), table[expected].reshape(delta.shape))
    if len(shape) == 2 and dtype in (torch.bfloat16, torch.float16):
        assert dispatch.verdicts()[("stable row ranks", dtype)]


def test_stable_and_sort_tie_orders_differ_only_where_magnitudes_tie() -> None:
    delta = (torch.randn(32, 1024, generator=torch.Generator().manual_seed(2)) * 0.002).bfloat16()
    stable, sort = (magprune_probabilities(delta, 0.3, 0.1, order) for order in ("stable", "sort"))
    differ = stable != sort
    assert bool(differ.any())
    magnitudes = delta.float().abs()
    for row in range(32):  # each differing entry shares its magnitude with another entry of its row
        for j in torch.nonzero(differ[row]).reshape(-1).tolist():
            assert int((magnitudes[row] == magnitudes[row, j]).sum()) > 1
