"""Golden tests for TIES: trim (top-k per model), elect sign, disjoint mean."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mergelab.merge.core import one_thread
from mergelab.methods import get_method, ties_merge
from mergelab.methods.registry import TensorInputs
from mergelab.methods.task_vectors import generalized_task_arithmetic


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


BASE = torch.arange(12, dtype=torch.float64).reshape(3, 4) / 10

# Three task vectors of shape 3×4, magnitudes distinct around each model's threshold.
D1 = _t([[4.0, -1.0, 2.0, 0.5], [-3.0, 1.0, -0.2, 5.0], [0.1, -6.0, 0.3, 2.5]])
D2 = _t([[-2.0, 3.0, 1.0, -4.0], [1.0, 0.5, -2.5, 0.2], [5.0, 0.1, -1.5, 0.3]])
D3 = _t([[1.0, -2.0, -3.0, 0.1], [-4.0, 2.2, 0.3, -0.4], [1.2, -0.5, 6.0, 0.2]])
MODELS = [BASE + D1, BASE + D2, BASE + D3]

# 1. Trim, density 0.5 → k = 6 of 12 per model:
#    |D1| top 6: 6, 5, 4, 3, 2.5, 2     |D2| top 6: 5, 4, 3, 2.5, 2, 1.5     |D3| top 6: 6, 4, 3, 2.2, 2, 1.2
T1 = _t([[4.0, 0.0, 2.0, 0.0], [-3.0, 0.0, 0.0, 5.0], [0.0, -6.0, 0.0, 2.5]])
T2 = _t([[-2.0, 3.0, 0.0, -4.0], [0.0, 0.0, -2.5, 0.0], [5.0, 0.0, -1.5, 0.0]])
T3 = _t([[0.0, -2.0, -3.0, 0.0], [-4.0, 2.2, 0.0, 0.0], [1.2, 0.0, 6.0, 0.0]])
# 2. Elect (w = 1): sign of T1 + T2 + T3 =
#    [[ 2,  1, -1, -4],        → [[+, +, -, -],
#     [-7, 2.2, -2.5, 5],         [-, +, -, +],
#     [6.2, -6, 4.5, 2.5]]        [+, -, +, +]]
# 3. Disjoint mean of the agreeing trimmed entries:
#    (0,0) 4 (T1 only)   (0,1) 3 (T2)   (0,2) -3 (T3)   (0,3) -4 (T2)
#    (1,0) (-3-4)/2      (1,1) 2.2      (1,2) -2.5      (1,3) 5
#    (2,0) (5+1.2)/2     (2,1) -6       (2,2) 6 (T3; T2's -1.5 disagrees)   (2,3) 2.5
MERGED_DELTA = _t([[4.0, 3.0, -3.0, -4.0], [-3.5, 2.2, -2.5, 5.0], [3.1, -6.0, 6.0, 2.5]])
# Without normalize: the sum of agreeing entries, differs only where two models agree.
SUMMED_DELTA = _t([[4.0, 3.0, -3.0, -4.0], [-7.0, 2.2, -2.5, 5.0], [6.2, -6.0, 6.0, 2.5]])


def test_trim_elect_disjoint_mean_by_hand() -> None:
    out = ties_merge(BASE, MODELS, [1.0, 1.0, 1.0], [0.5, 0.5, 0.5])
    assert_close(out, BASE + MERGED_DELTA)


def test_trim_step_matches_hand_masks() -> None:
    # each model alone, density 0.5, normalize: the merged delta is its trimmed task vector
    for model, trimmed in zip(MODELS, [T1, T2, T3], strict=True):
        assert_close(ties_merge(BASE, [model], [1.0], [0.5]), BASE + trimmed)


def test_without_normalize_sums_agreeing_entries() -> None:
    out = ties_merge(BASE, MODELS, [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], normalize=False)
    assert_close(out, BASE + SUMMED_DELTA)


def test_lambda_scales_merged_delta() -> None:
    out = ties_merge(BASE, MODELS, [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], lambda_=0.5)
    assert_close(out, BASE + 0.5 * MERGED_DELTA)


def test_consensus_count_by_hand() -> None:
    # count of signs of the trimmed vectors: only (0,2) changes: signs +1 (T1), 0, -1 (T3) → 0 → "+"
    # (ties go to +, as in mergekit), so T1's 2 is kept instead of T3's -3.
    # (2,2): T2 -1, T3 +1 → 0 → + → 6 (same as sum).
    expected = MERGED_DELTA.clone()
    expected[0, 2] = 2.0
    out = ties_merge(BASE, MODELS, [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], consensus="count")
    assert_close(out, BASE + expected)


def test_count_and_sum_disagree_when_one_large_delta_outvotes_two_small() -> None:
    # δ = -5, +1, +1: sum -3 → "-" keeps -5; count +1 → "+" averages (1 + 1) / 2
    base = torch.zeros(1, dtype=torch.float64)
    models = [torch.tensor([v], dtype=torch.float64) for v in (-5.0, 1.0, 1.0)]
    ones = [1.0, 1.0, 1.0]
    expected_sum = torch.tensor([-5.0], dtype=torch.float64)
    expected_count = torch.tensor([1.0], dtype=torch.float64)
    assert_close(ties_merge(base, models, ones, ones, consensus="sum"), expected_sum)
    assert_close(ties_merge(base, models, ones, ones, consensus="count"), expected_count)


def test_weights_enter_election_and_disjoint_mean() -> None:
    # w = (1, 3, 1). Entry (0,0): 4 - 3*2 + 0 = -2 → "-": only T2 agrees → 3*(-2) / 3 = -2.
    # Entry (2,0): 0 + 3*5 + 1.2 = 16.2 → "+": (15 + 1.2) / (3 + 1) = 4.05.
    # Entry (0,2): 2 + 0 - 3 = -1 → "-" → -3 / 1.
    # Entry (2,2): 0 - 4.5 + 6 = 1.5 → "+" → 6.
    out = ties_merge(BASE, MODELS, [1.0, 3.0, 1.0], [0.5, 0.5, 0.5]) - BASE
    assert out[0, 0].item() == pytest.approx(-2.0)
    assert out[2, 0].item() == pytest.approx(4.05)
    assert out[0, 2].item() == pytest.approx(-3.0)
    assert out[2, 2].item() == pytest.approx(6.0)


def test_per_model_densities() -> None:
    # model 1 keeps 1 entry (-6), model 2 keeps everything: the (2,1) entry: -6 + 0.1 → "-" → -6;
    # (0,0): 0 + (-2) → "-" → -2; (1,3): 0 + 0.2 → 0.2
    out = ties_merge(BASE, MODELS[:2], [1.0, 1.0], [1 / 12, 1.0]) - BASE
    expected = D2.clone()
    expected[2, 1] = -6.0
    assert_close(out, expected)


def test_density_one_is_sign_consensus_disjoint_mean() -> None:
    # no trimming. δ1 = [1, -2, 3, 0], δ2 = [-3, 1, 1, 2]:
    # sums -2, -1, 4, 2 → signs -, -, +, + → [-3 (δ2), -2 (δ1), (3+1)/2, 2 (δ2; δ1 is 0, no sign)]
    base = torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=torch.float64)
    d1 = torch.tensor([1.0, -2.0, 3.0, 0.0], dtype=torch.float64)
    d2 = torch.tensor([-3.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    out = ties_merge(base, [base + d1, base + d2], [1.0, 1.0], [1.0, 1.0])
    assert_close(out, base + torch.tensor([-3.0, -2.0, 2.0, 2.0], dtype=torch.float64))


def test_agreeing_models_average_like_task_arithmetic_normalized() -> None:
    # all deltas positive → no conflicts → TIES(density 1) = weighted mean of deltas
    base = torch.zeros(2, 3, dtype=torch.float64)
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    b = 3 * a
    assert_close(ties_merge(base, [a, b], [1.0, 3.0], [1.0, 1.0]), (a + 3 * b) / 4)


def test_global_scope_thresholds_replace_density() -> None:
    # thresholds at each model's 6th largest |δ| reproduce the density-0.5 masks (|δ| ≥ threshold)
    out = ties_merge(BASE, MODELS, [1.0, 1.0, 1.0], [0.1, 0.1, 0.1], thresholds=[2.0, 1.5, 1.2])
    assert_close(out, BASE + MERGED_DELTA)
    # a higher threshold (4.5) for model 1 keeps only its 5 and -6, dropping 4, 2, -3 and 2.5:
    # (0,0): 0 - 2 + 0 → "-" → -2 ; (1,0): 0 + 0 - 4 → -4 ; (0,2): 0 + 0 - 3 → -3 (unchanged);
    # (2,3): nobody is left (0.3 < 1.5, 0.2 < 1.2) → 0
    expected = MERGED_DELTA.clone()
    expected[0, 0] = -2.0
    expected[1, 0] = -4.0
    expected[2, 3] = 0.0
    out = ties_merge(BASE, MODELS, [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], thresholds=[4.5, 1.5, 1.2])
    assert_close(out, BASE + expected)


def _inputs(scope: str, thresholds: list[float] | None) -> TensorInputs:
    return TensorInputs(
        name="model.layers.0.mlp.weight", tensors=MODELS,
        model_params=[{"weight": 1.0, "density": 0.5, "tie_order": "sort"}] * 3,
        params={"lambda": 1.0, "normalize": True, "consensus": "sum", "scope": scope, "rescale": False,
                "int8_mask": False},
        base=BASE, thresholds=thresholds,
    )


def test_adapter_scope() -> None:
    m = get_method("ties")
    assert_close(m.adapter(_inputs("tensor", None)), BASE + MERGED_DELTA)
    # tensor scope ignores thresholds the engine may pass
    assert_close(m.adapter(_inputs("tensor", [100.0, 100.0, 100.0])), BASE + MERGED_DELTA)
    # global scope uses them: thresholds above every |δ| keep nothing → base
    assert_close(m.adapter(_inputs("global", [100.0, 100.0, 100.0])), BASE)


def test_adapter_global_scope_without_thresholds_raises() -> None:
    # silently falling back to per-tensor top-k would be a different method
    with pytest.raises(ValueError, match="thresholds"):
        get_method("ties").adapter(_inputs("global", None))


def test_zero_task_vectors_give_base() -> None:
    out = ties_merge(BASE, [BASE.clone(), BASE.clone()], [1.0, 1.0], [0.5, 0.5])
    assert_close(out, BASE)


def test_matches_independent_stacked_reference() -> None:
    # a straightforward stacked implementation (as in mergekit) on random tensors with random weights
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 7, generator=g)
    models = [base + torch.randn(6, 7, generator=g) for _ in range(4)]
    weights, densities = [0.5, 1.0, 2.0, 0.7], [0.2, 0.5, 0.9, 0.35]
    deltas = []
    for m, w, d in zip(models, weights, densities, strict=True):
        delta = m - base
        k = max(1, int(d * delta.numel()))
        keep = torch.zeros(delta.numel(), dtype=torch.bool)
        keep[delta.abs().reshape(-1).argsort(descending=True)[:k]] = True
        deltas.append(delta * keep.reshape(delta.shape) * w)
    stacked = torch.stack(deltas)
    w = torch.tensor(weights).reshape(-1, 1, 1)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == sign
    expected = base + 0.8 * (stacked * agree).sum(0) / (w * agree).sum(0).clamp_min(1e-30).where(
        (w * agree).sum(0) != 0, torch.ones(()))
    assert_close(ties_merge(base, models, weights, densities, lambda_=0.8), expected)


def test_rescale_restores_each_trimmed_task_vector_l1_norm() -> None:
    # one model, density 0.5: D = [4, -1, 0.5, 2] keeps 4 and 2; ‖D‖₁ = 7.5, ‖kept‖₁ = 6 → × 1.25
    base = torch.zeros(4, dtype=torch.float64)
    delta = _t([[4.0, -1.0, 0.5, 2.0]])[0]
    out = ties_merge(base, [delta], [1.0], [0.5], rescale=True)
    assert_close(out, torch.tensor([5.0, 0.0, 0.0, 2.5], dtype=torch.float64))
    assert_close(ties_merge(base, [delta], [1.0], [0.5]), torch.tensor([4.0, 0.0, 0.0, 2.0],
                                                                       dtype=torch.float64))


# --- the fused path (masks, then chunk-wise bit-pattern arithmetic) against the two-pass formula ---------

def _tied_models(dtype: torch.dtype, n: int, models: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Fine-tunes whose task vectors take few distinct magnitudes (ties straddle every top-k boundary),
    with exact zeros (fine-tune == base) and signed zeros."""
    g = torch.Generator().manual_seed(seed)
    base32 = torch.randn(n, generator=g) * 0.02
    tuned = []
    for _ in range(models):
        step = (torch.randn(n, generator=g) * 0.002 * 2e3).round() / 2e3  # ~10 magnitude levels
        tuned.append((base32 + step).to(dtype))
    base = base32.to(dtype)
    tuned[0][::13] = base[::13]
    base[::29] = -0.0
    tuned[-1][::29] = 0.0
    return base, tuned


def _two_pass(base: torch.Tensor, tuned: list[torch.Tensor], weights: list[float], densities: list[float],
              dtype: torch.dtype | None, **kw: object) -> torch.Tensor:
    from mergelab.methods.sparsify import magnitude_mask
    from mergelab.methods.task_vectors import generalized_task_arithmetic

    def trim(i: int, delta: torch.Tensor) -> torch.Tensor:
        return delta.masked_fill_(~magnitude_mask(delta, densities[i]), 0)
    return generalized_task_arithmetic(base, tuned, weights, sparsify=trim, dtype=dtype, **kw)  # type: ignore[arg-type]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("models", [2, 3])
def test_fused_path_equals_the_two_pass_formula_bit_for_bit(dtype: torch.dtype, models: int) -> None:
    # 140,001 entries: three chunks of the fused loop, the last one partial
    base, tuned = _tied_models(dtype, 140_001, models, seed=models)
    weights, densities = [0.5, -0.3, 1.2][:models], [0.3, 0.5, 0.1][:models]
    for consensus, normalize, lambda_ in (("sum", True, 1.0), ("sum", False, 0.7), ("count", True, 0.7),
                                          ("count", False, 1.0)):
        for compute in (dtype, None):  # None: float32 arithmetic (the float path for half inputs)
            kw = {"consensus": consensus, "normalize": normalize, "lambda_": lambda_}
            with one_thread():  # as the engine merges (two threads on busy cores took ~20× longer)
                fused = ties_merge(base, tuned, weights, densities, dtype=compute, **kw)  # type: ignore[arg-type]
                expected = _two_pass(base, tuned, weights, densities, compute, **kw)
            assert torch.equal(_bits(fused), _bits(expected)), (consensus, normalize, lambda_, compute)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_path_keeps_the_formula_where_values_overflow_or_are_not_finite(dtype: torch.dtype) -> None:
    # huge task vectors (the sums overflow) and an inf / NaN entry take the float comparisons' path
    base, tuned = _tied_models(dtype, 70_000, 2, seed=9)
    big = torch.finfo(dtype).max / 2
    tuned[0][:100] = big
    tuned[1][:100] = big
    tuned[1][200] = float("inf")
    for values in (tuned, [tuned[0], torch.where(torch.arange(70_000) == 300, float("nan"), tuned[1]).to(dtype)]):
        with one_thread():
            fused = ties_merge(base, values, [1.0, 1.0], [0.3, 0.3], dtype=dtype)
            expected = _two_pass(base, values, [1.0, 1.0], [0.3, 0.3], dtype, consensus="sum", normalize=True)
        assert torch.equal(_bits(fused), _bits(expected))


def test_fused_path_matches_mergekit_argsort_masks_in_bfloat16() -> None:
    # the whole TIES formula as mergekit computes it: argsort top-k, bf16 arithmetic, float32 sums
    base, tuned = _tied_models(torch.bfloat16, 20_000, 2, seed=4)
    weights, densities = [0.5, 0.5], [0.3, 0.3]
    wds = []
    for t, w, d in zip(tuned, weights, densities, strict=True):
        delta = t - base
        keep = torch.zeros(delta.numel(), dtype=torch.bool)
        keep[delta.abs().float().argsort(descending=True)[:int(d * delta.numel())]] = True
        wds.append(delta * keep * torch.tensor(w, dtype=torch.bfloat16))
    stacked = torch.stack(wds)
    sign = stacked.sum(0, dtype=torch.float32).bfloat16() >= 0
    agree = torch.where(sign, stacked > 0, stacked < 0)
    total = (stacked * agree).sum(0, dtype=torch.float32).bfloat16()
    div = (torch.tensor(weights).reshape(-1, 1) * agree).sum(0).bfloat16()
    expected = total / torch.where(div == 0, torch.ones((), dtype=torch.bfloat16), div) + base
    fused = ties_merge(base, tuned, weights, densities, dtype=torch.bfloat16)
    assert torch.equal(_bits(fused), _bits(expected))


def test_generalized_task_arithmetic_refuses_rescale_without_a_keep_mask() -> None:
    base = torch.zeros(4)
    with pytest.raises(ValueError, match="rescale applies to a keep mask"):
        generalized_task_arithmetic(base, [base + 1], [1.0], rescale=True)
