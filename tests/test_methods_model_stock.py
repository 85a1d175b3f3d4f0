"""Golden tests for Model Stock: θ = t θ_avg + (1 − t) θ_0, t = N cos φ / (1 + (N − 1) cos φ)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from mergelab.methods import get_method, model_stock_merge
from mergelab.methods.registry import TensorInputs

BASE = torch.tensor([1.0, 1.0], dtype=torch.float64)


def test_two_models_at_sixty_degrees() -> None:
    # δ1 = (2, 0), δ2 = (1, √3): both length 2, cos φ = 1/2 → t = 2·½ / (1 + ½) = 2/3.
    # θ_avg = base + (1.5, √3/2); θ = base + t (θ_avg − base) = (1 + 1, 1 + √3/3)
    m1 = BASE + torch.tensor([2.0, 0.0], dtype=torch.float64)
    m2 = BASE + torch.tensor([1.0, math.sqrt(3)], dtype=torch.float64)
    out = model_stock_merge(BASE, [m1, m2])
    assert_close(out, torch.tensor([2.0, 1.0 + math.sqrt(3) / 3], dtype=torch.float64))


@pytest.mark.parametrize("angle_deg", [0.0, 30.0, 90.0, 120.0])
def test_ratio_formula_for_two_models(angle_deg: float) -> None:
    phi = math.radians(angle_deg)
    cos = math.cos(phi)
    t = 2 * cos / (1 + cos)
    d1 = torch.tensor([3.0, 0.0], dtype=torch.float64)
    d2 = 0.5 * torch.tensor([math.cos(phi), math.sin(phi)], dtype=torch.float64)  # length does not matter
    out = model_stock_merge(BASE, [BASE + d1, BASE + d2])
    assert_close(out, BASE + t * (d1 + d2) / 2)


def test_orthogonal_gives_base_and_identical_gives_average() -> None:
    d = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert_close(model_stock_merge(BASE, [BASE + d, BASE + 3 * d]), BASE + 2 * d)  # cos 1 → t = 1
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])
    assert_close(model_stock_merge(BASE, [BASE + e1, BASE + e2]), BASE)  # cos 0 → t = 0


def test_three_models_mean_pairwise_cosine() -> None:
    # δ = e1, e1, e2: cosines 1, 0, 0 → mean 1/3 → t = 3·⅓ / (1 + 2·⅓) = 0.6;
    # θ = base + 0.6 · (2 e1 + e2)/3 = base + (0.4, 0.2)
    base = torch.zeros(2, dtype=torch.float64)
    e1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    e2 = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert_close(model_stock_merge(base, [e1, e1, e2]), torch.tensor([0.4, 0.2], dtype=torch.float64))


def test_filter_wise_one_ratio_per_row() -> None:
    # row 0: δ1 = (2, 0), δ2 = (1, √3) → t = 2/3 → base + (1, √3/3)
    # row 1: δ1 = δ2 = (0, 4) → t = 1 → base + (0, 4)
    # row 2: δ1 = (1, 0), δ2 = (0, 1) → t = 0 → base
    base = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    d1 = torch.tensor([[2.0, 0.0], [0.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    d2 = torch.tensor([[1.0, math.sqrt(3)], [0.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    expected = base + torch.tensor([[1.0, math.sqrt(3) / 3], [0.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    assert_close(model_stock_merge(base, [base + d1, base + d2], filter_wise=True), expected)
    # tensor-wise: one cosine over all 6 entries: <d1, d2> = 2 + 16 + 0 = 18, |d1|² = 21, |d2|² = 21
    cos = 18 / 21
    t = 2 * cos / (1 + cos)
    assert_close(model_stock_merge(base, [base + d1, base + d2]), base + t * (d1 + d2) / 2)


def test_filter_wise_on_1d_and_4d() -> None:
    base = torch.zeros(2, dtype=torch.float64)
    a = torch.tensor([2.0, 0.0], dtype=torch.float64)
    b = torch.tensor([1.0, math.sqrt(3)], dtype=torch.float64)
    assert_close(model_stock_merge(base, [a, b], filter_wise=True), model_stock_merge(base, [a, b]))
    # conv weight (out, in, kh, kw): rows are output channels
    g = torch.Generator().manual_seed(0)
    base4 = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    m = [base4 + torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64) for _ in range(2)]
    out = model_stock_merge(base4, m, filter_wise=True)
    for row in range(3):
        assert_close(out[row], model_stock_merge(base4[row], [m[0][row], m[1][row]]))


def test_needs_two_models() -> None:
    with pytest.raises(ValueError, match="at least two"):
        model_stock_merge(BASE, [BASE + 1])


def test_adapter() -> None:
    m = get_method("model_stock")
    a, b = BASE + torch.tensor([2.0, 0.0]), BASE + torch.tensor([1.0, math.sqrt(3)])
    x = TensorInputs(name="w", tensors=[a.double(), b.double()], model_params=[{}, {}],
                     params={"filter_wise": False}, base=BASE)
    assert_close(m.adapter(x), torch.tensor([2.0, 1.0 + math.sqrt(3) / 3], dtype=torch.float64))
    assert m.min_models == 2


# -- the singular ratio: guarded as mergekit does, warned outside [0, 1] ----------------------------------
def test_opposing_task_vectors_at_the_singularity_keep_the_base() -> None:
    # δ2 = −δ1: cos φ = −1, 1 + (N−1) cos φ = 0 → no finite t: the base is kept (mergekit's guard)
    d = torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert_close(model_stock_merge(BASE, [BASE + d, BASE - 3 * d]), BASE)
    # three models with mean cosine −1/2: δ = e1, (−½, √3/2), (−½, −√3/2) (120° apart) → denominator 0
    r = math.sqrt(3) / 2
    deltas = [torch.tensor(v, dtype=torch.float64) for v in ([1.0, 0.0], [-0.5, r], [-0.5, -r])]
    assert_close(model_stock_merge(BASE, [BASE + x for x in deltas]), BASE)


def test_ratio_outside_unit_interval_is_merged_by_the_formula_and_warned() -> None:
    # cos φ = −0.9 for two models: t = 2(−0.9) / (1 − 0.9) = −18: far from the base, so it must be said
    phi = math.acos(-0.9)
    d1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    d2 = torch.tensor([math.cos(phi), math.sin(phi)], dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"t = -18 is outside \[0, 1\]"):
        out = model_stock_merge(BASE, [BASE + d1, BASE + d2])
    assert_close(out, BASE - 18 * (d1 + d2) / 2)


def test_ratio_inside_unit_interval_does_not_warn(recwarn: pytest.WarningsRecorder) -> None:
    model_stock_merge(BASE, [BASE + torch.tensor([2.0, 0.0]).double(), BASE + torch.tensor([1.0, 1.0]).double()])
    assert not recwarn.list


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(), (0,), (0, 3), (3, 0), (2, 0, 4)])
def test_scalar_and_empty_tensors(shape: tuple[int, ...], filter_wise: bool) -> None:
    base = torch.full(shape, 2.0)
    out = model_stock_merge(base, [base + 1, base + 1], filter_wise=filter_wise)
    assert out.shape == base.shape and out.dtype == base.dtype
    if base.numel():  # identical task vectors: t = 1, the average
        assert_close(out, base + 1)
