"""Golden tests for SLERP: sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from mergelab.methods import get_method, slerp_merge
from mergelab.methods.registry import TensorInputs


def _unit(angle: float) -> torch.Tensor:
    return torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    return math.acos(max(-1.0, min(1.0, cos)))


V0 = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
V1 = torch.tensor([[-2.0, 0.5], [3.0, 1.0]], dtype=torch.float64)


def test_endpoints() -> None:
    assert_close(slerp_merge(0.0, V0, V1), V0)
    assert_close(slerp_merge(1.0, V0, V1), V1)


@pytest.mark.parametrize("t", [0.1, 0.25, 0.5, 0.8])
def test_unit_vectors_stay_on_circle_at_angle_t_omega(t: float) -> None:
    omega = 1.2  # radians between v0 and v1
    v0, v1 = _unit(0.3), _unit(0.3 + omega)
    out = slerp_merge(t, v0, v1)
    assert float(out.norm()) == pytest.approx(1.0, abs=1e-12)
    assert _angle(v0, out) == pytest.approx(t * omega, abs=1e-9)
    assert_close(out, _unit(0.3 + t * omega))  # the same point in closed form


def test_unit_vectors_in_higher_dimension() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 5, generator=g, dtype=torch.float64)
    b = torch.randn(4, 5, generator=g, dtype=torch.float64)
    a, b = a / a.norm(), b / b.norm()
    omega = _angle(a, b)
    for t in (0.3, 0.7):
        out = slerp_merge(t, a, b)
        assert float(out.norm()) == pytest.approx(1.0, abs=1e-12)
        assert _angle(a, out) == pytest.approx(t * omega, abs=1e-9)
        assert _angle(out, b) == pytest.approx((1 - t) * omega, abs=1e-9)


def test_orthogonal_midpoint_by_hand() -> None:
    # Ω = π/2: coefficients sin(π/4) / 1 = √2/2 on both; unnormalized inputs keep their lengths in the mix
    v0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    v1 = torch.tensor([0.0, 4.0], dtype=torch.float64)
    expected = torch.tensor([math.sqrt(2), 2 * math.sqrt(2)], dtype=torch.float64)
    assert_close(slerp_merge(0.5, v0, v1), expected)


def test_near_parallel_falls_back_to_lerp() -> None:
    v0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    v1 = torch.tensor([2.0, 0.02], dtype=torch.float64)  # cos Ω = 0.99995 > 0.9995
    lerp = 0.7 * v0 + 0.3 * v1
    assert torch.equal(slerp_merge(0.3, v0, v1), lerp)
    # with the fallback off, SLERP of unequal-length vectors differs from LERP
    no_fallback = slerp_merge(0.3, v0, v1, dot_threshold=1.0)
    assert not torch.allclose(no_fallback, lerp, rtol=0, atol=1e-6)


def test_antiparallel_falls_back_to_lerp() -> None:
    v0 = torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert_close(slerp_merge(0.25, v0, -3 * v0), 0.75 * v0 + 0.25 * (-3 * v0))


def test_zero_tensor_does_not_produce_nan() -> None:
    out = slerp_merge(0.5, torch.zeros(3), torch.ones(3))
    assert torch.isfinite(out).all()


def test_dtype_and_shape_checks() -> None:
    out = slerp_merge(0.5, V0.to(torch.bfloat16), V1.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="shapes differ"):
        slerp_merge(0.5, V0, V1.reshape(-1))


def test_adapter_base_is_v0() -> None:
    m = get_method("slerp")
    x = TensorInputs(name="w", tensors=[V1], model_params=[{}], params={"t": 0.25, "dot_threshold": 0.9995},
                     base=V0)
    assert_close(m.adapter(x), slerp_merge(0.25, V0, V1))
    assert m.min_models == m.max_models == 1
    t = m.param("t")
    assert t is not None and t.required
