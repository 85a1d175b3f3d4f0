"""Golden tests for ``linear_merge``: θ = Σ_i w_i θ_i / Σ_i w_i."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mergelab.methods import get_method, linear_merge
from mergelab.methods.registry import TensorInputs


def _t(*rows: list[float] | float) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


A = _t([1.0, 2.0], [3.0, 4.0])
B = _t([5.0, -2.0], [0.0, 8.0])
C = _t([-1.0, 0.0], [9.0, 1.0])


def test_uniform_average_by_hand() -> None:
    # (A + B + C) / 3 = [[5, 0], [12, 13]] / 3
    expected = _t([5 / 3, 0.0], [4.0, 13 / 3])
    assert_close(linear_merge([A, B, C]), expected)


def test_weighted_average_by_hand() -> None:
    # weights 1, 3: (1*A + 3*B) / 4 = [[16, -4], [3, 28]] / 4
    expected = _t([4.0, -1.0], [0.75, 7.0])
    assert_close(linear_merge([A, B], [1.0, 3.0]), expected)


def test_weights_are_scale_invariant_when_normalized() -> None:
    assert_close(linear_merge([A, B, C], [1.0, 2.0, 5.0]), linear_merge([A, B, C], [10.0, 20.0, 50.0]))


def test_normalize_false_gives_weighted_sum() -> None:
    # 2*A - 0.5*B = [[2 - 2.5, 4 + 1], [6 - 0, 8 - 4]]
    expected = _t([-0.5, 5.0], [6.0, 4.0])
    assert_close(linear_merge([A, B], [2.0, -0.5], normalize=False), expected)


def test_negative_weights_normalized() -> None:
    # (2A - B) / 1 = [[-3, 6], [6, 0]]
    assert_close(linear_merge([A, B], [2.0, -1.0]), _t([-3.0, 6.0], [6.0, 0.0]))


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.0, 0.0], [0.1, 0.2, -0.3]])
def test_zero_weight_sum_raises(weights: list[float]) -> None:
    # 0.1 + 0.2 - 0.3 is 5.6e-17 in floating point, not 0: it must raise too, not divide by ~0
    tensors = [A, B, C][: len(weights)]
    with pytest.raises(ValueError, match="sum to zero"):
        linear_merge(tensors, weights)


def test_zero_weight_sum_allowed_without_normalize() -> None:
    assert_close(linear_merge([A, B], [1.0, -1.0], normalize=False), A - B)


def test_tiny_but_consistent_weights_still_average() -> None:
    assert_close(linear_merge([A, B], [1e-9, 1e-9]), (A + B) / 2)


def test_single_model_is_identity() -> None:
    assert_close(linear_merge([B], [0.3]), B)


def test_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        linear_merge([])
    with pytest.raises(ValueError, match="2 tensors but 1 weights"):
        linear_merge([A, B], [1.0])


def test_dtype_preserved_and_accumulated_in_float32() -> None:
    a = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    b = torch.tensor([2.0, 4.0], dtype=torch.bfloat16)
    out = linear_merge([a, b], [1.0, 2.0])
    assert out.dtype == torch.bfloat16
    assert_close(out, torch.tensor([5 / 3, 10 / 3], dtype=torch.bfloat16))


def test_adapter_reads_per_model_weight_and_normalize() -> None:
    m = get_method("linear")
    x = TensorInputs(name="w", tensors=[A, B], model_params=[{"weight": 1.0}, {"weight": 3.0}],
                     params={"normalize": False})
    assert_close(m.adapter(x), A + 3 * B)
    assert get_method("soup") is m and get_method("swa") is m
    assert m.base == "ignored"
