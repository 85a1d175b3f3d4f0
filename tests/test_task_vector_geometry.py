"""Task-vector norms and the shared-component fraction, on vectors whose answers are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mergelab.analysis.task_vector_geometry import task_vector_geometry


def test_orthogonal_task_vectors_of_equal_norm_share_one_over_t() -> None:
    base = {"w": torch.tensor([3.0, 4.0, 0.0, 0.0]), "steps": torch.tensor(7)}  # ‖θ0‖ = 5; ints ignored
    states = [{"w": base["w"] + torch.tensor([0.5, 0, 0, 0]), "steps": torch.tensor(1)},
              {"w": base["w"] + torch.tensor([0, 0.5, 0, 0]), "steps": torch.tensor(1)},
              {"w": base["w"] + torch.tensor([0, 0, 0.5, 0]), "steps": torch.tensor(1)}]
    g = task_vector_geometry(base, states)
    assert g.relative_norms == pytest.approx((0.1, 0.1, 0.1))
    assert g.shared_fraction == pytest.approx(1 / 3) and g.mean_cosine == pytest.approx(0.0)
    assert g.tasks == 3


def test_identical_task_vectors_share_everything_and_opposite_ones_nothing() -> None:
    base = {"a": torch.ones(2, 2), "b": torch.zeros(3)}
    tau = {"a": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([0.0, 2.0, 0.0])}
    same = [{k: base[k] + tau[k] for k in base}] * 2
    g = task_vector_geometry(base, same)
    assert g.shared_fraction == pytest.approx(1.0) and g.mean_cosine == pytest.approx(1.0)
    assert g.relative_norms[0] == pytest.approx(math.sqrt(5) / 2)  # ‖τ‖² = 1 + 4 over ‖θ0‖² = 4
    opposite = [{k: base[k] + tau[k] for k in base}, {k: base[k] - tau[k] for k in base}]
    assert task_vector_geometry(base, opposite).shared_fraction == pytest.approx(0.0)


def test_one_task_has_no_pairs_and_a_zero_base_is_an_error() -> None:
    g = task_vector_geometry({"w": torch.ones(2)}, [{"w": torch.tensor([2.0, 1.0])}])
    assert g.shared_fraction == pytest.approx(1.0) and math.isnan(g.mean_cosine)
    with pytest.raises(ValueError, match="all zero"):
        task_vector_geometry({"w": torch.zeros(2)}, [{"w": torch.ones(2)}])
    with pytest.raises(ValueError, match="at least one"):
        task_vector_geometry({"w": torch.ones(2)}, [])
