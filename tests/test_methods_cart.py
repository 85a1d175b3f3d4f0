"""Golden tests for CART: θ = θ_avg + λ Σ_t SVD_k(θ_t − θ_avg) on 2-D weights, θ_avg elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mergelab.methods import cart_merge, get_method
from mergelab.methods.cart import low_rank, rank_from_ratio
from mergelab.methods.registry import TensorInputs

G = torch.Generator().manual_seed(0)
MODELS = [torch.randn(5, 4, generator=G, dtype=torch.float64) for _ in range(3)]
AVG = sum(MODELS) / 3


def _diag(a: float, b: float) -> torch.Tensor:
    return torch.diag(torch.tensor([a, b], dtype=torch.float64))


@pytest.mark.parametrize("lam", [0.0, 1.0, 2.5, -3.0])
def test_full_rank_equals_average_for_any_lambda(lam: float) -> None:
    assert_close(cart_merge(MODELS, rank_ratio=1.0, lambda_=lam), AVG)


@pytest.mark.parametrize("lam", [1.0, 4.0])
def test_full_rank_equals_weighted_average_with_weights(lam: float) -> None:
    w = [1.0, 2.0, 5.0]
    weighted = (MODELS[0] + 2 * MODELS[1] + 5 * MODELS[2]) / 8
    assert_close(cart_merge(MODELS, rank_ratio=1.0, lambda_=lam, weights=w), weighted)


def test_centred_task_vectors_sum_to_zero() -> None:
    centred = [m - AVG for m in MODELS]
    assert_close(sum(centred), torch.zeros_like(AVG))
    # and so do their full-rank reconstructions
    assert_close(sum(low_rank(c, 4) for c in centred), torch.zeros_like(AVG))


def test_rank_ratio_zero_is_average() -> None:
    assert_close(cart_merge(MODELS, rank_ratio=0.0, lambda_=5.0), AVG)


def test_two_models_always_average() -> None:
    # τ2 = −τ1, so SVD_k(τ1) + SVD_k(τ2) = 0 at every rank
    assert_close(cart_merge(MODELS[:2], rank_ratio=0.25, lambda_=3.0), (MODELS[0] + MODELS[1]) / 2)


def test_rank_one_by_hand() -> None:
    # θ1 = diag(5, 1), θ2 = diag(2, 2), θ3 = diag(2, 4) → θ_avg = diag(3, 7/3)
    # τ1 = diag(2, −4/3) → rank 1 keeps the larger singular value: diag(2, 0)
    # τ2 = diag(−1, −1/3) → diag(−1, 0)
    # τ3 = diag(−1, 5/3)  → diag(0, 5/3)
    # Σ = diag(1, 5/3) → λ = 1: diag(4, 4); λ = 0.5: diag(3.5, 7/3 + 5/6 = 19/6)
    models = [_diag(5, 1), _diag(2, 2), _diag(2, 4)]
    assert rank_from_ratio((2, 2), 0.5) == 1
    assert_close(cart_merge(models, rank_ratio=0.5, lambda_=1.0), _diag(4, 4))
    assert_close(cart_merge(models, rank_ratio=0.5, lambda_=0.5), _diag(3.5, 19 / 6))


def test_rank_one_non_diagonal_matches_svd_reference() -> None:
    # rotate the diagonal example: U diag V^T keeps singular vectors, so the answer rotates with it
    c, s = 0.6, 0.8
    u = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    v = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    models = [u @ _diag(*d) @ v.T for d in [(5, 1), (2, 2), (2, 4)]]
    assert_close(cart_merge(models, rank_ratio=0.5, lambda_=1.0), u @ _diag(4, 4) @ v.T)


def test_low_rank_is_truncated_svd() -> None:
    m = torch.tensor([[3.0, 0.0], [0.0, -2.0], [0.0, 0.0]], dtype=torch.float64)
    assert_close(low_rank(m, 1), torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    assert_close(low_rank(m, 5), m)
    assert_close(low_rank(m, 0), torch.zeros_like(m))


@pytest.mark.parametrize(("shape", "ratio", "rank"),
                         [((10, 4), 0.5, 2), ((4, 10), 0.1, 1), ((8, 8), 0.0, 0), ((8, 8), 1.0, 8),
                          ((100, 30), 0.1, 3)])
def test_rank_from_ratio(shape: tuple[int, int], ratio: float, rank: int) -> None:
    assert rank_from_ratio(shape, ratio) == rank


def test_one_dimensional_tensors_get_average() -> None:
    vecs = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, -3.0]), torch.tensor([2.0, 1.0, 0.0])]
    assert_close(cart_merge(vecs, rank_ratio=0.5, lambda_=10.0), torch.tensor([2.0, 1.0, 0.0]))
    assert_close(cart_merge(vecs, weights=[1.0, 1.0, 2.0]), torch.tensor([2.0, 1.0, 0.0]))


def test_low_rank_this_false_gives_average() -> None:
    assert_close(cart_merge(MODELS, rank_ratio=0.25, lambda_=2.0, low_rank_this=False), AVG)
    # and it differs from the average when the low-rank term is on
    assert not torch.allclose(cart_merge(MODELS, rank_ratio=0.25, lambda_=2.0), AVG)


def test_weights_errors() -> None:
    with pytest.raises(ValueError, match="sum to zero"):
        cart_merge(MODELS[:2], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="3 tensors but 2 weights"):
        cart_merge(MODELS, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="at least one"):
        cart_merge([])


def _inputs(name: str, **params: object) -> TensorInputs:
    p = {"rank_ratio": 0.5, "lambda": 1.0, "include_base": False, "low_rank_filter": None, **params}
    return TensorInputs(name=name, tensors=[_diag(5, 1), _diag(2, 2), _diag(2, 4)],
                        model_params=[{"weight": 1.0}] * 3, params=p, base=_diag(0, 0))


def test_adapter_low_rank_filter_selects_tensors() -> None:
    m = get_method("cart")
    avg = _diag(3, 7 / 3)
    assert_close(m.adapter(_inputs("layers.0.attn.q_proj.weight")), _diag(4, 4))
    filt = "q_proj|k_proj"
    assert_close(m.adapter(_inputs("layers.0.attn.q_proj.weight", low_rank_filter=filt)), _diag(4, 4))
    assert_close(m.adapter(_inputs("layers.0.attn.k_proj.weight", low_rank_filter=filt)), _diag(4, 4))
    assert_close(m.adapter(_inputs("layers.0.mlp.up_proj.weight", low_rank_filter=filt)), avg)


def test_adapter_include_base_counts_base_as_a_model() -> None:
    m = get_method("cart")
    out = m.adapter(_inputs("w", include_base=True, rank_ratio=0.0))
    assert_close(out, (_diag(5, 1) + _diag(2, 2) + _diag(2, 4)) / 4)
