"""Golden tests for the Karcher (Riemannian) mean of the models' directions, times their mean norm."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from mergelab.methods import get_method, karcher_merge
from mergelab.methods.karcher import karcher_mean
from mergelab.methods.registry import TensorInputs

E1 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
E2 = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
E3 = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)


def test_two_directions_meet_at_the_geodesic_midpoint_scaled_by_the_mean_norm() -> None:
    s = math.sqrt(0.5)
    assert_close(karcher_merge([2 * E1, 4 * E2]), 3 * torch.tensor([s, s, 0.0], dtype=torch.float64))


def test_symmetric_points_average_to_the_centre() -> None:
    assert_close(karcher_merge([E1, E2, E3]), torch.ones(3, dtype=torch.float64) / math.sqrt(3))


def test_asymmetric_points_reach_the_riemannian_not_the_euclidean_mean() -> None:
    # (e1, e1, e2): minimise 2φ² + (π/2 − φ)² → φ = π/6 (30°), not the Euclidean mean's atan(1/2) = 26.57°
    out = karcher_merge([E1, E1, E2], max_iter=50, tol=1e-12)
    assert_close(out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6), 0.0], dtype=torch.float64))
    # mergekit's default 10 steps with tol 1e-5 get there to ~1e-5
    assert math.degrees(math.atan2(karcher_merge([E1, E1, E2])[1], karcher_merge([E1, E1, E2])[0])) == \
        pytest.approx(30.0, abs=1e-3)


def test_weights_move_the_mean() -> None:
    # weights (2/3, 1/3) on (e1, e2): the same optimum as (e1, e1, e2); scale Σ α_i |θ_i| = 2/3 + 1/3 = 1
    out = karcher_mean([E1, E2], [2 / 3, 1 / 3], max_iter=50, tol=1e-12)
    assert_close(out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6), 0.0], dtype=torch.float64))


def test_zero_tensors_take_no_part_in_the_direction_and_all_zero_gives_zero() -> None:
    s = math.sqrt(0.5)
    # the zero tensor still counts in the mean norm (1/3 · (3 + 3 + 0) = 2)
    assert_close(karcher_merge([3 * E1, 3 * E2, 0 * E3]), 2 * torch.tensor([s, s, 0.0], dtype=torch.float64))
    assert torch.equal(karcher_merge([0 * E1, 0 * E2]), torch.zeros(3, dtype=torch.float64))


def test_one_model_is_returned_and_the_base_is_one_more_point() -> None:
    assert torch.equal(karcher_merge([2 * E1]), 2 * E1)
    m = get_method("karcher")
    assert m.base == "optional" and not m.model_params
    x = TensorInputs(name="w", tensors=[E1, E2], model_params=[{}, {}], params={"max_iter": 10, "tol": 1e-5},
                     base=E3)
    assert_close(m.adapter(x), karcher_merge([E1, E2, E3]))
    x.base = None
    assert_close(m.adapter(x), karcher_merge([E1, E2]))
