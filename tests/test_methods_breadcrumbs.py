"""Golden tests for Model Breadcrumbs: drop the top-γ outliers and the smallest entries, keep ``density``."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mergelab.methods import breadcrumbs_merge, get_method, task_arithmetic_merge
from mergelab.methods.registry import TensorInputs

# 10 entries with distinct magnitudes 0.1 … 1.0; by |δ|, largest first:
# index 4 (1.0), 1 (0.9), 7 (0.8), 5 (0.7), 9 (0.6), 2 (0.5), 8 (0.4), 3 (0.3), 6 (0.2), 0 (0.1)
DELTA = torch.tensor([0.1, -0.9, 0.5, 0.3, -1.0, 0.7, -0.2, 0.8, 0.4, -0.6], dtype=torch.float64)
BASE = torch.linspace(-1, 1, 10, dtype=torch.float64)


def _merged_delta(density: float, gamma: float) -> torch.Tensor:
    return breadcrumbs_merge(BASE, [BASE + DELTA], [1.0], [density], [gamma]) - BASE


def _only(indices: list[int]) -> torch.Tensor:
    out = torch.zeros_like(DELTA)
    out[indices] = DELTA[indices]
    return out


def test_density_half_gamma_fifth_drops_two_largest_and_three_smallest() -> None:
    # keep int(0.5·10) = 5, drop int(0.2·10) = 2 largest (|δ| 1.0, 0.9)
    # and 10 − 5 − 2 = 3 smallest (0.3, 0.2, 0.1)
    out = _merged_delta(0.5, 0.2)
    assert int((out != 0).sum()) == 5
    assert_close(out, _only([7, 5, 9, 2, 8]))
    assert out.abs().max().item() == pytest.approx(0.8)
    assert out[out != 0].abs().min().item() == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("density", "gamma", "kept"),
    [
        (0.3, 0.1, [1, 7, 5]),  # drop 1 largest, 6 smallest
        (0.3, 0.0, [4, 1, 7]),  # γ = 0: plain magnitude top-k
        (0.9, 0.2, [1, 7, 5, 9, 2, 8, 3, 6, 0]),  # 9 + 2 > 10: only the single largest can be dropped
        (0.1, 0.2, [7]),  # drop 2 largest, keep the next one
        (0.0, 0.2, []),
        (1.0, 0.5, list(range(10))),  # density 1: untouched, as in mergekit
    ],
)
def test_kept_entries(density: float, gamma: float, kept: list[int]) -> None:
    out = _merged_delta(density, gamma)
    assert_close(out, _only(kept))


def test_weights_lambda_and_two_models() -> None:
    # model 2 has δ reversed in order: same magnitudes at mirrored positions
    delta2 = DELTA.flip(0)
    out = breadcrumbs_merge(BASE, [BASE + DELTA, BASE + delta2], [1.0, 2.0], [0.5, 0.5], [0.2, 0.2],
                            lambda_=0.5)
    # model 2 keeps the mirrored indices 9 − i of [7, 5, 9, 2, 8] = [2, 4, 0, 7, 1]
    m2 = torch.zeros_like(DELTA)
    m2[[2, 4, 0, 7, 1]] = delta2[[2, 4, 0, 7, 1]]
    assert_close(out, BASE + 0.5 * (_only([7, 5, 9, 2, 8]) + 2 * m2))


def test_density_one_is_task_arithmetic() -> None:
    models = [BASE + DELTA, BASE - 2 * DELTA]
    assert_close(breadcrumbs_merge(BASE, models, [1.0, 0.5], [1.0, 1.0], [0.1, 0.1]),
                 task_arithmetic_merge(BASE, models, [1.0, 0.5]))


def test_breadcrumbs_ties_elects_sign() -> None:
    # model 1 = δ, model 2 = −2δ, both kept at the same 5 indices (masks by |δ| are identical);
    # elected sign of 1·δ − 2·δ = −δ → only model 2 agrees: normalized w2·(−2δ) / w2 = −2δ, and the
    # unnormalized sum of agreeing entries is the same −2δ since w2 = 1
    models = [BASE + DELTA, BASE - 2 * DELTA]
    out = breadcrumbs_merge(BASE, models, [1.0, 1.0], [0.5, 0.5], [0.2, 0.2], consensus="sum", normalize=True)
    assert_close(out, BASE - 2 * _only([7, 5, 9, 2, 8]))
    out = get_method("breadcrumbs_ties").adapter(TensorInputs(
        name="w", tensors=models, model_params=[{"weight": 1.0, "density": 0.5, "gamma": 0.2, "tie_order": "sort"}] * 2,
        params={"lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False}, base=BASE))
    assert_close(out, BASE - 2 * _only([7, 5, 9, 2, 8]))


def test_adapter_default_gamma_matches_mergekit() -> None:
    m = get_method("breadcrumbs")
    param = m.param("gamma")
    assert param is not None and param.default == 0.01 and param.scope == "model"
    x = TensorInputs(name="w", tensors=[BASE + DELTA],
                     model_params=[{"weight": 1.0, "density": 0.5, "gamma": 0.2, "tie_order": "sort"}],
                     params={"lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False}, base=BASE)
    assert_close(m.adapter(x), BASE + _only([7, 5, 9, 2, 8]))


def test_rescale_restores_each_sparsified_task_vector_l1_norm() -> None:
    # density 0.5, gamma 0.2 keeps |δ| 0.8, 0.7, 0.6, 0.5, 0.4 (sum 3.0) of ‖δ‖₁ = 5.5 → × 5.5/3
    out = breadcrumbs_merge(BASE, [BASE + DELTA], [1.0], [0.5], [0.2], rescale=True) - BASE
    assert_close(out, _only([7, 5, 9, 2, 8]) * (5.5 / 3.0))
