"""Golden tests for SCE (select by variance, calculate weights from energy, erase minority signs)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mergelab.methods import get_method, sce_merge
from mergelab.methods.registry import TensorInputs
from mergelab.methods.sce import sce_select_mask, sce_weights

BASE = torch.zeros(4, dtype=torch.float64)
D1 = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
D2 = torch.tensor([3.0, 2.0, -1.0, 1.5], dtype=torch.float64)


def test_no_selection_weights_by_energy_and_erases_minority_signs() -> None:
    # energies mean(δ²): 14.25/4 and 16.25/4 → η = 57/122, 65/122.  Σδ = [4, 0, 2, 2] ≥ 0: positive everywhere,
    # so δ1's −2 and δ2's −1 are erased.  entry 0: (57·1 + 65·3)/122; entry 1: 2; entry 2: 3;
    # entry 3: (57·0.5 + 65·1.5)/122
    assert_close(sce_weights(torch.stack([D1, D2])), torch.tensor([57 / 122, 65 / 122], dtype=torch.float64))
    expected = torch.tensor([252 / 122, 2.0, 3.0, 126 / 122], dtype=torch.float64)
    assert_close(sce_merge(BASE, [BASE + D1, BASE + D2]), expected)
    assert_close(sce_merge(BASE + 1, [BASE + 1 + D1, BASE + 1 + D2]), expected + 1)


def test_select_keeps_the_highest_variance_entries_for_every_model() -> None:
    # population variances across the two models: [1, 4, 4, 0.25]; k = int(4 · 0.5) = 2 → entries 1, 2.
    # Masked: δ1 = [0, −2, 3, 0], δ2 = [0, 2, −1, 0]; Σ = [0, 0, 2, 0] ≥ 0; η = (13/4, 5/4) / 4.5.
    # entry 1: only δ2 agrees → 2; entry 2: only δ1 → 3; entries 0 and 3: nothing left → 0 (divisor clamped)
    mask = sce_select_mask(torch.stack([D1, D2]), 0.5)
    assert mask.tolist() == [False, True, True, False]
    assert_close(sce_merge(BASE, [D1, D2], select_topk=0.5), torch.tensor([0.0, 2.0, 3.0, 0.0], dtype=torch.float64))


def test_select_counts_only_entries_that_vary() -> None:
    # entries 0 and 3 are equal in both models (variance 0): k = int(2 · 0.5) = 1 of the two that vary
    a = torch.tensor([1.0, 5.0, 2.0, 7.0])
    b = torch.tensor([1.0, -5.0, 3.0, 7.0])
    assert sce_select_mask(torch.stack([a, b]), 0.5).tolist() == [False, True, False, False]
    assert not sce_select_mask(torch.stack([a, b]), 0.0).any()
    assert sce_select_mask(torch.stack([a, b]), 1.0).all()


def test_tiny_task_vectors_get_uniform_weights_as_in_mergekit() -> None:
    # Σ mean(δ²) < 1e-6 → η = 1/N (mergekit's guard): entry 0 becomes the plain mean of the agreeing entries
    s = 1e-4
    out = sce_merge(BASE, [s * D1, s * D2])
    assert_close(sce_weights(torch.stack([s * D1, s * D2])), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert_close(out, s * torch.tensor([2.0, 2.0, 3.0, 1.0], dtype=torch.float64))


def test_one_model_is_its_own_task_vector_and_none_is_the_base() -> None:
    assert_close(sce_merge(BASE, [D1]), D1)
    assert_close(sce_merge(BASE + 2, []), BASE + 2)


def test_keeps_shape_and_dtype_and_computes_in_it() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g).to(torch.bfloat16)
    models = [(base.float() + 0.1 * torch.randn(5, 7, generator=g)).to(torch.bfloat16) for _ in range(3)]
    out = sce_merge(base, models, select_topk=0.4)
    assert out.shape == base.shape and out.dtype == torch.bfloat16


def test_selection_is_the_same_on_any_thread_count() -> None:
    # bf16 variances tie a lot; torch.topk must still pick the same entries whatever the thread count
    g = torch.Generator().manual_seed(1)
    base = torch.randn(600, 700, generator=g).to(torch.bfloat16)
    models = [(base.float() + 0.05 * torch.randn(600, 700, generator=g)).to(torch.bfloat16) for _ in range(3)]
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            outs.append(sce_merge(base, models, select_topk=0.3))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_adapter_and_registration() -> None:
    m = get_method("sce")
    assert m.base == "required" and not m.randomized and m.also_in == ("mergekit",)
    assert set(m.global_params) == {"select_topk", "int8_mask"} and not m.model_params
    x = TensorInputs(name="w", tensors=[D1, D2], model_params=[{}, {}],
                     params={"select_topk": 0.5, "int8_mask": False}, base=BASE)
    assert_close(m.adapter(x), sce_merge(BASE, [D1, D2], select_topk=0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_selection_on_cuda() -> None:
    # bf16 variances tie; the selection runs on the CPU, so the GPU keeps the same entries
    g = torch.Generator().manual_seed(2)
    base = torch.randn(64, 48, generator=g).to(torch.bfloat16)
    models = [(base.float() + 0.05 * torch.randn(64, 48, generator=g)).to(torch.bfloat16) for _ in range(3)]
    tvs = torch.stack([m - base for m in models])
    assert torch.equal(sce_select_mask(tvs.cuda(), 0.3).cpu(), sce_select_mask(tvs, 0.3))
