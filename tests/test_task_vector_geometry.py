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


def test_centring_lowers_interference_only_when_the_task_vectors_share_a_component() -> None:
    # The benchmark's surprise (docs/task_vectors.md): its task vectors are nearly orthogonal (shared fraction
    # 0.155 at T = 8, 1/T = 0.125) and centring raised I(k) at every rank. The mechanism: θ_t − θ_avg = τ_t − τ̄
    # puts the same −τ̄ into every centred matrix. Synthetic τ_t = a·S + P_t (rank-4 parts, 64 × 64, T = 8):
    # without a shared S centring raises I(k); with a large one it removes S and lowers I(k) several-fold.
    from mergelab.analysis.interference import interference_curves

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 64, generator=g)}
    shared = torch.randn(64, 4, generator=g) @ torch.randn(4, 64, generator=g) / 2
    parts = [torch.randn(64, 4, generator=g) @ torch.randn(4, 64, generator=g) / 2 for _ in range(8)]

    def centred_over_uncentred(a: float) -> tuple[float, float]:
        states = [{"w": base["w"] + 0.01 * (a * shared + p)} for p in parts]
        curve = {(p.centred, p.ratio): p.mean_interference_norm for p in interference_curves(states, base, [0.08])}
        return task_vector_geometry(base, states).shared_fraction, curve[(True, 0.08)] / curve[(False, 0.08)]

    orthogonal, (shared_fraction, ratio) = centred_over_uncentred(0.0), centred_over_uncentred(2.0)
    assert orthogonal[0] == pytest.approx(1 / 8, abs=0.02) and orthogonal[1] > 1.05
    assert shared_fraction > 0.75 and ratio < 0.5
