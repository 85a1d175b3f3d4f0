"""Golden tests for Multi-SLERP: normalised weighted mean direction times the weighted mean norm."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from mergelab.methods import get_method, karcher_merge, multislerp_merge
from mergelab.methods.registry import TensorInputs

E1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
E2 = torch.tensor([0.0, 1.0], dtype=torch.float64)


def test_weighted_mean_direction_times_weighted_mean_norm() -> None:
    # directions e1, e2 with weights 1/4, 3/4: μ = (1, 3)/√10; norms 2 and 4 → scale 0.25·2 + 0.75·4 = 3.5
    out = multislerp_merge([2 * E1, 4 * E2], [1.0, 3.0], eps=0.0)
    assert_close(out, 3.5 * torch.tensor([1.0, 3.0], dtype=torch.float64) / math.sqrt(10))


def test_the_tangent_step_vanishes_so_it_is_not_the_spherical_mean() -> None:
    # Karcher mean of (e1, e1, e2) on the circle sits at 30° (minimises 2φ² + (90° − φ)²); multislerp stays at
    # the normalised Euclidean mean, atan(1/2) = 26.57°
    points = [E1, E1, E2]
    ms = multislerp_merge(points, [1.0, 1.0, 1.0], eps=0.0)
    assert math.degrees(math.atan2(ms[1], ms[0])) == pytest.approx(math.degrees(math.atan(0.5)), abs=1e-9)
    k = karcher_merge(points)
    assert math.degrees(math.atan2(k[1], k[0])) == pytest.approx(30.0, abs=1e-3)


def test_with_a_base_the_task_vectors_are_merged() -> None:
    base = torch.tensor([1.0, 1.0], dtype=torch.float64)
    s = math.sqrt(0.5)
    assert_close(multislerp_merge([base + 2 * E1, base + 2 * E2], [1.0, 1.0], base=base, eps=0.0),
                 base + 2 * torch.tensor([s, s], dtype=torch.float64))


def test_one_model_is_returned_and_antipodal_pairs_mix_linearly() -> None:
    assert torch.equal(multislerp_merge([3 * E1], [1.0]), 3 * E1)
    assert_close(multislerp_merge([E1, -E1], [1.0, 1.0]), torch.zeros(2, dtype=torch.float64))


def test_cancelling_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="weighted mean of the unit tensors is zero"):
        multislerp_merge([E1, -E1, E2 - E2 + E1 * 0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="sum to zero"):
        multislerp_merge([E1, E2], [1.0, -1.0])


def test_registration_and_adapter() -> None:
    m = get_method("multislerp")
    assert m.base == "optional" and m.min_models == 1 and m.max_models is None
    x = TensorInputs(name="w", tensors=[2 * E1, 4 * E2], model_params=[{"weight": 1.0}, {"weight": 3.0}],
                     params={"normalize_weights": True, "eps": 1e-8}, base=None)
    assert_close(m.adapter(x), multislerp_merge([2 * E1, 4 * E2], [1.0, 3.0]))
