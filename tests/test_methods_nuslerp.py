"""Golden tests for NuSLERP: weighted SLERP of two models, or of their task vectors around a base."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from mergelab.methods import get_method, nuslerp_merge, slerp_merge
from mergelab.methods.registry import TensorInputs

E1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
E2 = torch.tensor([0.0, 1.0], dtype=torch.float64)


def test_orthogonal_unit_vectors_follow_the_great_circle() -> None:
    # Ω = π/2: t = 0.5 → (sin π/4, sin π/4); weights (1, 3) → t = 0.75 → (sin π/8, sin 3π/8)
    s = math.sqrt(0.5)
    assert_close(nuslerp_merge([E1, E2], [1.0, 1.0]), torch.tensor([s, s], dtype=torch.float64))
    assert_close(nuslerp_merge([E1, E2], [1.0, 3.0]),
                 torch.tensor([math.sin(math.pi / 8), math.sin(3 * math.pi / 8)], dtype=torch.float64))


def test_with_a_base_the_task_vectors_are_interpolated() -> None:
    base = torch.tensor([5.0, -2.0], dtype=torch.float64)
    s = math.sqrt(0.5)
    assert_close(nuslerp_merge([base + 2 * E1, base + 2 * E2], [0.5, 0.5], base=base),
                 base + torch.tensor([2 * s, 2 * s], dtype=torch.float64))


def test_parallel_vectors_interpolate_linearly_and_zero_weights_give_the_midpoint() -> None:
    assert_close(nuslerp_merge([E1, 3 * E1], [1.0, 1.0]), 2 * E1)
    assert_close(nuslerp_merge([E1, E2], [1.0, -1.0]), nuslerp_merge([E1, E2], [1.0, 1.0]))  # Σw ≈ 0: t = 0.5


def test_one_angle_per_row_unless_flattened() -> None:
    # row 0: (2, 0) vs (0, 2), Ω = π/2 → (√2, √2); row 1: equal rows → unchanged
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    r = math.sqrt(2)
    assert_close(nuslerp_merge([a, b], [1.0, 1.0], flatten=False),
                 torch.tensor([[r, r], [0.0, 1.0]], dtype=torch.float64))
    assert not torch.allclose(nuslerp_merge([a, b], [1.0, 1.0]), nuslerp_merge([a, b], [1.0, 1.0], flatten=False))


def test_row_wise_takes_the_angle_per_column() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert_close(nuslerp_merge([a, b], [0.3, 0.6], flatten=False, row_wise=True),
                 nuslerp_merge([a.T, b.T], [0.3, 0.6], flatten=False).T)


def test_flattened_without_base_equals_slerp() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert_close(nuslerp_merge([a, b], [0.6, 0.4]), slerp_merge(0.4, a, b))


def test_exactly_two_models() -> None:
    with pytest.raises(ValueError, match="exactly two"):
        nuslerp_merge([E1], [1.0])
    m = get_method("nuslerp")
    assert (m.min_models, m.max_models, m.base) == (2, 2, "optional")
    x = TensorInputs(name="w", tensors=[E1, E2], model_params=[{"weight": 1.0}, {"weight": 3.0}],
                     params={"nuslerp_flatten": True, "nuslerp_row_wise": False}, base=None)
    assert_close(m.adapter(x), nuslerp_merge([E1, E2], [1.0, 3.0]))
