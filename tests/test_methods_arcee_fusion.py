"""Golden tests for Arcee Fusion: take θ_1's entries whose importance |Δ| · KL(row) passes Tukey's fence."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from mergelab.methods import arcee_fusion_merge, get_method
from mergelab.methods.arcee_fusion import fusion_importance, order_statistics
from mergelab.methods.registry import TensorInputs


def test_only_outlier_changes_are_taken() -> None:
    # one row: importance = |d| · KL (one positive number), so the fence is on |d|. n = 9, sorted |d|:
    # Q1 = #2 = 3, median = #4 = 5, Q3 = #6 = 7 → fence 5 + 1.5 · (7 − 3) = 11: only the 40 passes
    base = torch.zeros(9, dtype=torch.float64)
    d = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 40.0], dtype=torch.float64)
    out = arcee_fusion_merge(base, base + d)
    assert_close(out, torch.tensor([0.0] * 8 + [40.0], dtype=torch.float64))


def test_importance_is_change_times_the_rows_kl() -> None:
    # row 0 unchanged: KL 0. row 1: softmax(ln 3, 0) = (3/4, 1/4) against (1/2, 1/2): KL = ¾ ln 1.5 + ¼ ln 0.5
    base = torch.zeros(2, 2, dtype=torch.float64)
    ln3 = math.log(3.0)
    other = torch.tensor([[0.0, 0.0], [ln3, 0.0]], dtype=torch.float64)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    expected = torch.tensor([[0.0, 0.0], [ln3 * kl, 0.0]], dtype=torch.float64)
    assert_close(fusion_importance(base, other), expected, atol=1e-7, rtol=1e-6)  # softmax's +1e-8


def test_quartiles_are_exact_order_statistics_on_large_tensors_too() -> None:
    # mergekit samples 1e6 entries (unseeded) above that size; here they are exact and deterministic
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1_200_001, generator=g)
    n = x.numel()
    ordered = torch.sort(x).values
    expected = [ordered[int(q * (n - 1))] for q in (0.25, 0.5, 0.75)]
    assert [v.item() for v in order_statistics(x, (0.25, 0.5, 0.75))] == [v.item() for v in expected]
    half = x.to(torch.bfloat16)
    ordered_half = torch.sort(half).values
    got = order_statistics(half, (0.5,))[0]
    assert got.dtype == torch.bfloat16 and got == ordered_half[(n - 1) // 2]


def test_identical_models_give_the_base_and_dtype_is_kept() -> None:
    base = torch.randn(4, 5).to(torch.bfloat16)
    assert torch.equal(arcee_fusion_merge(base, base.clone()), base)
    other = base + 0.1
    assert arcee_fusion_merge(base, other).dtype == torch.bfloat16


def test_registration() -> None:
    m = get_method("arcee_fusion")
    assert (m.min_models, m.max_models, m.base, m.params) == (1, 1, "required", ())
    base, other = torch.zeros(9), torch.arange(9.0)
    x = TensorInputs(name="w", tensors=[other], model_params=[{}], params={}, base=base)
    assert torch.equal(m.adapter(x), arcee_fusion_merge(base, other))
