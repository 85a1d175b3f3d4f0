"""Golden tests for ``task_arithmetic_merge``: θ = θ_0 + λ Σ_i w_i (θ_i − θ_0)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mergelab.kernels import dispatch
from mergelab.methods import get_method, task_arithmetic_merge
from mergelab.methods.registry import TensorInputs
from mergelab.methods.task_vectors import generalized_task_arithmetic, merge_task_vectors, task_vector

BASE = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=torch.float64)
D1 = torch.tensor([[2.0, 0.0], [-1.0, 4.0]], dtype=torch.float64)
D2 = torch.tensor([[-1.0, 3.0], [1.0, 0.5]], dtype=torch.float64)
T1, T2 = BASE + D1, BASE + D2


def test_sum_of_task_vectors_by_hand() -> None:
    # w = (1, 2): δ = D1 + 2 D2 = [[0, 6], [1, 5]]
    expected = BASE + torch.tensor([[0.0, 6.0], [1.0, 5.0]], dtype=torch.float64)
    assert_close(task_arithmetic_merge(BASE, [T1, T2], [1.0, 2.0]), expected)


def test_lambda_scales_the_sum() -> None:
    # λ = 0.5, w = (1, 2): base + 0.5 [[0, 6], [1, 5]]
    expected = torch.tensor([[1.0, 2.0], [1.0, 4.5]], dtype=torch.float64)
    assert_close(task_arithmetic_merge(BASE, [T1, T2], [1.0, 2.0], lambda_=0.5), expected)


def test_normalize_divides_by_weight_sum() -> None:
    # w = (1, 3), normalize: (D1 + 3 D2) / 4 = [[-1, 9], [2, 5.5]] / 4
    expected = BASE + torch.tensor([[-0.25, 2.25], [0.5, 1.375]], dtype=torch.float64)
    assert_close(task_arithmetic_merge(BASE, [T1, T2], [1.0, 3.0], normalize=True), expected)
    # normalize then λ
    assert_close(task_arithmetic_merge(BASE, [T1, T2], [1.0, 3.0], normalize=True, lambda_=2.0),
                 BASE + 2 * (expected - BASE))


def test_normalize_with_zero_weight_sum_is_refused_like_linear() -> None:
    # One rule for every normalised sum (methods/weighting.py). mergekit silently skips the division when
    # |Σ w| < 1e-8, which returns the unnormalised sum: a different merge than the config asks for.
    with pytest.raises(ValueError, match="sum to zero"):
        task_arithmetic_merge(BASE, [T1, T2], [1.0, -1.0], normalize=True)
    with pytest.raises(ValueError, match="sum to zero"):
        task_arithmetic_merge(BASE, [T1, T2, T1], [0.1, 0.2, -0.3], normalize=True)  # 5.6e-17, not 0


def test_normalize_with_one_tiny_weight_divides_by_it() -> None:
    # w δ / w = δ: a tiny weight is a legitimate divisor (the old absolute threshold skipped it)
    assert_close(task_arithmetic_merge(BASE, [T1], [1e-9], normalize=True), T1)


def test_negative_weight_subtracts_task_vector() -> None:
    assert_close(task_arithmetic_merge(BASE, [T1], [-1.0]), BASE - D1)


def test_same_model_twice_normalized_is_that_model() -> None:
    assert_close(task_arithmetic_merge(BASE, [T1, T1], [0.3, 0.7], normalize=True), T1)


def test_no_models_returns_base_copy() -> None:
    out = generalized_task_arithmetic(BASE, [], [])
    assert_close(out, BASE)
    assert out.data_ptr() != BASE.data_ptr()


def test_inputs_not_modified() -> None:
    t1, base = T1.clone(), BASE.clone()
    task_arithmetic_merge(base, [t1], [3.0], lambda_=2.0)
    assert torch.equal(t1, T1) and torch.equal(base, BASE)


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="2 tensors but 1 weights"):
        task_arithmetic_merge(BASE, [T1, T2], [1.0])


def test_half_precision_computed_in_float32() -> None:
    base = torch.full((4,), 1000.0, dtype=torch.float16)
    t = base + torch.tensor([0.5, -0.5, 1.0, 0.0], dtype=torch.float16)
    out = task_arithmetic_merge(base, [t, t], [0.5, 0.5])
    assert out.dtype == torch.float16
    assert_close(out, t)


def test_adapter() -> None:
    m = get_method("task_arithmetic")
    x = TensorInputs(name="w", tensors=[T1, T2], model_params=[{"weight": 1.0}, {"weight": 2.0}],
                     params={"lambda": 0.5, "normalize": False}, base=BASE)
    assert_close(m.adapter(x), task_arithmetic_merge(BASE, [T1, T2], [1.0, 2.0], lambda_=0.5))


def test_task_vectors_given_already_sparsified_are_merged_onto_the_base() -> None:
    # TIES on δ1 = (0.5, −1), δ2 = (0.25, 1), w = (1, 1): entry 0 elects + and averages (0.5 + 0.25) / 2; entry
    # 1's votes cancel and 0 counts as +, so only δ2 agrees: 1 / 1. Without a consensus: the sum (0.75, 0).
    base = torch.tensor([1.0, 2.0])
    deltas = [torch.tensor([0.5, -1.0]), torch.tensor([0.25, 1.0])]
    assert merge_task_vectors(base, deltas, [1.0, 1.0], consensus="sum", normalize=True).tolist() == [1.375, 3.0]
    assert merge_task_vectors(base, deltas, [1.0, 1.0]).tolist() == [1.75, 2.0]
    assert merge_task_vectors(base, [], []).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="base's shape"):
        merge_task_vectors(base, [torch.tensor([0.5, -1.0, 0.0])], [1.0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_a_task_vector_is_a_fresh_tensor_of_the_differences_each_rounded_once_to_its_dtype(
        dtype: torch.dtype, layout: str) -> None:
    # bfloat16 models in bfloat16 take one subtraction into a new tensor; the others convert chunk by chunk:
    # either way each difference is the float32 one rounded once, and the result is the caller's to modify
    g = torch.Generator().manual_seed(4)
    tensor, base = ((torch.randn(300, 70, generator=g) * s).bfloat16() for s in (1.0, 0.5))
    if layout == "transposed":
        tensor, base = tensor.t(), base.t()
    before = tensor.clone(), base.clone()
    delta = task_vector(tensor, base, dtype)
    assert delta.dtype == dtype and delta.is_contiguous() and delta.shape == tensor.shape
    assert torch.equal(delta, (tensor.float() - base.float()).to(dtype))
    delta.fill_(7.0)
    assert torch.equal(tensor, before[0]) and torch.equal(base, before[1])

@pytest.mark.parametrize("loaded", [True, False], ids=["loops", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("consensus", "normalize", "lambda_"),
                         [("sum", True, 1.0), ("count", False, 0.7), (None, True, -1.3), (None, False, 1.0)])
def test_given_task_vectors_merge_to_the_bits_of_a_sparsifier_that_returns_them(
        monkeypatch: pytest.MonkeyPatch, loaded: bool, dtype: torch.dtype, consensus: str | None, normalize: bool,
        lambda_: float) -> None:
    # what DELLA relies on: handing its sparsified task vectors over as models of a base of −0 changes no bit,
    # signed zeros in the base and in the task vectors included (a negative λ turns +0 results into −0)
    if loaded:
        assert dispatch.warm_up()
    else:
        monkeypatch.setattr(dispatch, "_loaded", [None])
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(4099, generator=g) * 0.02).to(dtype)
    base[:3] = torch.tensor([0.0, -0.0, -0.0])
    deltas = [((torch.randn(4099, generator=g) * 0.003) * (torch.rand(4099, generator=g) < 0.4)).to(dtype)
              for _ in range(3)]
    deltas[0][::7] = -0.0
    weights = [0.5, 0.75, -0.3]
    ours = merge_task_vectors(base, deltas, weights, consensus=consensus, normalize=normalize,  # type: ignore[arg-type]
                              lambda_=lambda_, dtype=dtype)
    formula = generalized_task_arithmetic(base, [base] * 3, weights, sparsify=lambda i, _: deltas[i].clone(),
                                          consensus=consensus, normalize=normalize,  # type: ignore[arg-type]
                                          lambda_=lambda_, dtype=dtype)
    as_int = torch.int32 if dtype == torch.float32 else torch.int16
    assert ours.dtype == formula.dtype == dtype
    assert torch.equal(ours.view(as_int), formula.view(as_int))
