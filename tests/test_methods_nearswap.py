"""Golden tests for NearSwap: w = clip(t / |θ_1 − θ_0|, 0, 1) per entry."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from mergelab.methods import get_method, nearswap_merge
from mergelab.methods.registry import TensorInputs


def test_close_entries_are_swapped_far_ones_barely_move() -> None:
    # |d| = (0.1, 1.0, 0.5), t = 0.2 → w = (1, 0.2, 0.4) → θ = w θ_1 + (1 − w) θ_0
    base = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    other = torch.tensor([0.1, 1.0, 0.5], dtype=torch.float64)
    assert_close(nearswap_merge(base, other, 0.2), torch.tensor([0.1, 0.2, 0.8], dtype=torch.float64))


def test_equal_entries_stay_and_t_zero_is_the_base() -> None:
    base = torch.tensor([1.0, 2.0])
    assert torch.equal(nearswap_merge(base, base.clone(), 0.3), base)
    assert torch.equal(nearswap_merge(base, torch.tensor([5.0, -1.0]), 0.0), base)


def test_elementwise_registration() -> None:
    m = get_method("nearswap")
    assert m.elementwise and (m.min_models, m.max_models, m.base) == (1, 1, "required")
    assert m.param("t") is not None and m.param("t").required  # type: ignore[union-attr]
    base, other = torch.zeros(3), torch.tensor([0.1, 1.0, -0.5])
    x = TensorInputs(name="w", tensors=[other], model_params=[{}], params={"t": 0.2}, base=base)
    assert_close(m.adapter(x), nearswap_merge(base, other, 0.2))
    # element-wise: merging a slice gives that slice of the merge
    assert_close(nearswap_merge(base[1:], other[1:], 0.2), nearswap_merge(base, other, 0.2)[1:])
