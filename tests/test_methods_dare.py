"""Golden and statistical tests for DARE (dare_linear, dare_ties): δ̃ = m ⊙ δ / p, m ~ Bernoulli(p)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from mergelab.merge.core import one_thread
from mergelab.methods import dare_merge, get_method, task_arithmetic_merge, ties_merge
from mergelab.methods.dare import dare_sparsifier
from mergelab.methods.registry import TensorInputs

G = torch.Generator().manual_seed(1234)
BASE = torch.randn(8, 16, generator=G, dtype=torch.float64)
MODELS = [BASE + torch.randn(8, 16, generator=G, dtype=torch.float64) for _ in range(3)]
W = [1.0, 0.5, 2.0]


@pytest.mark.parametrize("consensus", [None, "sum"])
def test_same_seed_same_result_different_seed_different(consensus: str | None) -> None:
    a = dare_merge(BASE, MODELS, W, [0.3, 0.3, 0.3], seed=7, consensus=consensus)
    b = dare_merge(BASE, MODELS, W, [0.3, 0.3, 0.3], seed=7, consensus=consensus)
    c = dare_merge(BASE, MODELS, W, [0.3, 0.3, 0.3], seed=8, consensus=consensus)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_models_get_independent_masks_for_one_seed() -> None:
    delta = torch.ones(1000, dtype=torch.float64)
    drop = dare_sparsifier([0.5, 0.5], seed=3)
    m0, m1 = drop(0, delta.clone()) != 0, drop(1, delta.clone()) != 0
    assert not torch.equal(m0, m1)
    # the sparsifier is a pure function of (seed, index): TIES' two passes see the same mask
    assert torch.equal(drop(0, delta.clone()) != 0, m0)


def test_kept_entries_rescaled_by_one_over_p_and_dropped_are_zero() -> None:
    delta = torch.arange(1.0, 201.0, dtype=torch.float64)
    out = dare_sparsifier([0.25], seed=11)(0, delta.clone())
    kept = out != 0
    assert 0 < int(kept.sum()) < 200
    assert_close(out[kept], delta[kept] / 0.25)
    out_raw = dare_sparsifier([0.25], seed=11, rescale=False)(0, delta.clone())
    assert torch.equal(out_raw != 0, kept)
    assert_close(out_raw[kept], delta[kept])


def test_density_one_equals_task_arithmetic() -> None:
    ones = [1.0, 1.0, 1.0]
    assert_close(dare_merge(BASE, MODELS, W, ones, seed=5, lambda_=0.7),
                 task_arithmetic_merge(BASE, MODELS, W, lambda_=0.7))
    assert_close(dare_merge(BASE, MODELS, W, ones, seed=5, normalize=True),
                 task_arithmetic_merge(BASE, MODELS, W, normalize=True))


def test_dare_ties_density_one_equals_ties_density_one() -> None:
    ones = [1.0, 1.0, 1.0]
    assert_close(dare_merge(BASE, MODELS, W, ones, seed=5, consensus="sum", normalize=True),
                 ties_merge(BASE, MODELS, W, ones))


def test_density_zero_gives_base() -> None:
    assert_close(dare_merge(BASE, MODELS, W, [0.0, 0.0, 0.0], seed=1), BASE)


def test_expectation_over_seeds_is_the_undropped_delta() -> None:
    # E[m δ / p] = δ. Over N seeds the mean has per-entry sd |δ| sqrt((1 - p) / (p N)); allow 4.5 sd
    # (probability of any of 8 entries failing by chance ≈ 8 · 7e-6).
    p, n = 0.3, 1000
    base = torch.zeros(8, dtype=torch.float64)
    delta = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.25, 4.0, -1.5, 2.5], dtype=torch.float64)
    total = torch.zeros_like(delta)
    for seed in range(n):
        total += dare_merge(base, [delta], [1.0], [p], seed=seed)
    mean = total / n
    sd = delta.abs() * math.sqrt((1 - p) / (p * n))
    assert bool(((mean - delta).abs() <= 4.5 * sd).all()), (mean, delta, sd)
    # and it is not trivially equal: single draws are far from δ
    single = dare_merge(base, [delta], [1.0], [p], seed=0)
    assert not torch.allclose(single, delta)


def test_rescale_l1_preserves_l1_norm() -> None:
    delta = MODELS[0] - BASE
    out = dare_sparsifier([0.2], seed=9, rescale_mode="l1")(0, delta.clone())
    kept = out != 0
    assert int(kept.sum()) < delta.numel()
    assert out.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-12)
    # one common factor on the kept entries: L1(δ) / L1(m ⊙ δ)
    factor = delta.abs().sum() / (delta * kept).abs().sum()
    assert_close(out[kept], delta[kept] * factor)


def test_unknown_rescale_mode_raises() -> None:
    with pytest.raises(ValueError, match="rescale_mode"):
        dare_merge(BASE, MODELS, W, [0.5] * 3, seed=0, rescale_mode="l2")


def test_rescale_l1_through_merge() -> None:
    base = torch.zeros(50, dtype=torch.float64)
    delta = torch.linspace(-2, 3, 50, dtype=torch.float64)
    out = dare_merge(base, [delta], [1.0], [0.4], seed=2, rescale_mode="l1")
    assert out.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-12)


def test_dare_ties_elects_on_rescaled_deltas() -> None:
    # identical task vectors never conflict; with independent masks each entry is the mean of the
    # rescaled kept values (δ / p) over the models that kept it (normalize, w = 1)
    base = torch.zeros(400, dtype=torch.float64)
    delta = torch.ones(400, dtype=torch.float64)
    p = 0.5
    out = dare_merge(base, [delta, delta], [1.0, 1.0], [p, p], seed=4, consensus="sum", normalize=True)
    drop = dare_sparsifier([p, p], seed=4)
    any_kept = (drop(0, delta.clone()) != 0) | (drop(1, delta.clone()) != 0)
    assert_close(out[any_kept], torch.full_like(out[any_kept], 1 / p))
    assert bool((out[~any_kept] == 0).all())


def test_adapters_use_engine_seed_and_consensus() -> None:
    params = {"lambda": 1.0, "normalize": False, "rescale": True, "rescale_mode": "density",
              "int8_mask": False}
    mp = [{"weight": w, "density": 0.4} for w in W]
    x = TensorInputs(name="w", tensors=MODELS, model_params=mp, params=params, base=BASE, seed=99)
    assert_close(get_method("dare_linear").adapter(x), dare_merge(BASE, MODELS, W, [0.4] * 3, seed=99))
    assert_close(get_method("dare_ties").adapter(x),
                 dare_merge(BASE, MODELS, W, [0.4] * 3, seed=99, consensus="sum"))
    assert get_method("dare_linear").randomized and get_method("dare_ties").randomized


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_seed_same_merge_on_cuda() -> None:
    # masks are drawn on the CPU, so the device must not change the result
    cpu = dare_merge(BASE, MODELS, W, [0.3] * 3, seed=7, consensus="sum")
    gpu = dare_merge(BASE.cuda(), [m.cuda() for m in MODELS], W, [0.3] * 3, seed=7, consensus="sum")
    assert_close(gpu.cpu(), cpu)


# --- the fused path (random masks, then the chunk-wise arithmetic) against the sparsifier's two passes ----

def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _two_pass(base: torch.Tensor, tuned: list[torch.Tensor], weights: list[float], densities: list[float],
              **kw: object) -> torch.Tensor:
    from mergelab.methods.task_vectors import generalized_task_arithmetic

    keys = ("consensus", "normalize", "lambda_", "dtype")
    sparsify = dare_sparsifier(densities, int(kw.pop("seed")), rescale=bool(kw.pop("rescale")),  # type: ignore[call-overload]
                               rescale_mode=str(kw.pop("rescale_mode")))
    assert set(kw) <= set(keys)
    return generalized_task_arithmetic(base, tuned, weights, sparsify=sparsify, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("models", [2, 3])
def test_fused_path_equals_the_sparsifier_two_passes_bit_for_bit(dtype: torch.dtype, models: int) -> None:
    # 70,001 entries: three chunks of the fused loop, the last one partial; exact and signed zeros; a
    # negative weight; densities that keep all (1), none (0) and a few (0.05)
    g = torch.Generator().manual_seed(models)
    base32 = torch.randn(70_001, generator=g) * 0.02
    tuned = [(base32 + torch.randn(70_001, generator=g) * 1e-3).to(dtype) for _ in range(models)]
    base = base32.to(dtype)
    tuned[0][::13] = base[::13]
    base[::29] = -0.0
    weights = [0.5, -0.3, 1.2][:models]
    for densities in ([0.3, 0.6, 0.05][:models], [1.0, 0.0, 0.5][:models]):
        for consensus, normalize, lambda_, rescale in (("sum", True, 1.0, True), ("sum", False, 0.7, True),
                                                        ("count", True, 1.0, True), ("sum", False, 1.0, False),
                                                        (None, False, 1.0, True), (None, True, 0.7, False)):
            for compute in ({dtype, None} if dtype != torch.float64 else {None}):
                kw = {"consensus": consensus, "normalize": normalize, "lambda_": lambda_, "dtype": compute,
                      "seed": 5, "rescale": rescale, "rescale_mode": "density"}
                with one_thread():  # as the engine merges (two threads on busy cores: ~40× slower)
                    fused = dare_merge(base, tuned, weights, densities, **kw)  # type: ignore[arg-type]
                    expected = _two_pass(base, tuned, weights, densities, **kw)
                assert torch.equal(_bits(fused), _bits(expected)), (densities, consensus, normalize, rescale, compute)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_path_keeps_the_formula_where_values_overflow_or_are_not_finite(dtype: torch.dtype) -> None:
    # huge task vectors (÷ p makes them overflow) and an inf / NaN entry take the float comparisons' path
    g = torch.Generator().manual_seed(9)
    base = (torch.randn(40_000, generator=g) * 0.02).to(dtype)
    tuned = [(base.float() + torch.randn(40_000, generator=g) * 1e-3).to(dtype) for _ in range(2)]
    tuned[0][:100] = torch.finfo(dtype).max / 2
    tuned[1][200] = float("inf")
    for values in (tuned, [tuned[0], torch.where(torch.arange(40_000) == 300, float("nan"), tuned[1]).to(dtype)]):
        kw = {"consensus": "sum", "normalize": True, "lambda_": 1.0, "dtype": dtype, "seed": 2, "rescale": True,
              "rescale_mode": "density"}
        with one_thread():
            fused = dare_merge(base, values, [1.0, 1.0], [0.3, 0.3], **kw)  # type: ignore[arg-type]
            expected = _two_pass(base, values, [1.0, 1.0], [0.3, 0.3], **kw)
        assert torch.equal(_bits(fused), _bits(expected))


@pytest.mark.parametrize("sizes", [[5, 5, 5, 2], [7, 3, 10, 1], [17]])
def test_coins_reserved_in_order_and_taken_in_any_order_are_one_whole_draw(sizes: list[int]) -> None:
    from mergelab.methods.dare import CarriedGenerators

    total = sum(sizes)
    whole = [torch.rand(total, generator=torch.Generator().manual_seed(seed)) for seed in (5, 6)]
    carried = CarriedGenerators([torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)], (total,),
                                [True, True])
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    reserved = [carried.for_piece("dare", a, n) for a, n in zip(offsets, sizes, strict=True)]
    got: dict[int, list[torch.Tensor]] = {}
    for piece, a, n in reversed(list(zip(reserved, offsets, sizes, strict=True))):  # merged last piece first
        got[a] = [coins((n,)) for coins in piece.take("dare", a, n)]
    for i in range(2):
        assert torch.equal(torch.cat([got[a][i] for a in offsets]), whole[i])


def test_coins_come_shaped_as_torch_rand_shapes_them_and_only_for_models_that_draw() -> None:
    from mergelab.methods.dare import CarriedGenerators

    idle = torch.Generator().manual_seed(2)
    state = idle.get_state()
    carried = CarriedGenerators([torch.Generator().manual_seed(1), idle], (24,), [True, False])
    first = carried.for_piece("della", 0, 12).take("della", 0, 12)
    second = carried.for_piece("della", 12, 12).take("della", 12, 12)
    reference = torch.Generator().manual_seed(1)
    assert torch.equal(first[0]((3, 4)), torch.rand((3, 4), generator=reference))
    assert torch.equal(second[0]((2, 6)), torch.rand((2, 6), generator=reference))
    assert torch.equal(idle.get_state(), state)  # a density of 0 or 1 draws nothing
    with pytest.raises(ValueError, match="draws no coins"):
        first[1]((12,))


def test_coins_are_given_only_to_the_piece_they_were_reserved_for() -> None:
    from mergelab.methods.dare import CarriedGenerators

    carried = CarriedGenerators([torch.Generator().manual_seed(1)], (10,), [True])
    piece = carried.for_piece("dare", 0, 4)
    with pytest.raises(ValueError, match="reserved for 4 entries at flat entry 0"):
        piece.take("dare", 4, 4)
    with pytest.raises(ValueError, match="in order"):
        carried.for_piece("dare", 5, 5)


def test_dare_ties_with_compiled_loops_draws_its_masks_without_computing_a_task_vector(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mergelab.kernels import dispatch
    from mergelab.methods import task_vectors

    dispatch.warm_up()
    if dispatch.loops() is None:
        pytest.skip("compiled loops off or numba missing")
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(50_000, generator=g) * 0.02).to(torch.bfloat16)
    tuned = [(base.float() + torch.randn(50_000, generator=g) * 1e-3).to(torch.bfloat16) for _ in range(2)]
    kw = {"consensus": "sum", "normalize": False, "lambda_": 1.0, "dtype": torch.bfloat16, "seed": 4,
          "rescale": True, "rescale_mode": "density"}
    with one_thread():
        expected = _two_pass(base, tuned, [0.5, 0.5], [0.3, 0.3], **kw)
        dare_merge(base, tuned, [0.5, 0.5], [0.3, 0.3], **kw)  # type: ignore[arg-type]  # the loop's first-use check

    def refused(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("a DARE mask needs only the tensor's shape")

    monkeypatch.setattr(task_vectors, "task_vector", refused)
    with one_thread():
        fused = dare_merge(base, tuned, [0.5, 0.5], [0.3, 0.3], **kw)  # type: ignore[arg-type]
    assert torch.equal(_bits(fused), _bits(expected))
