"""Every registered method takes every odd tensor it can meet in a checkpoint without crashing.

Scalars (0-dim), empty tensors (a zero in the shape), 1-D vectors, every floating dtype of the safetensors
format (float8 variants included: torch refuses to promote them in arithmetic, so methods compute on
float32 copies) and non-floating tensors (integers, bool, complex: copied from the base). Results keep the
input's shape and dtype.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import mergelab
from mergelab.methods import MergeMethod, all_methods
from mergelab.methods.registry import REQUIRED

SHAPES = [(), (0,), (0, 3), (3, 0), (7,), (4, 6)]
FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.float8_e8m0fnu, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]
PASSTHROUGH = [torch.int64, torch.int8, torch.uint16, torch.uint32, torch.uint64, torch.bool, torch.complex64]
METHODS = [m for m in all_methods() if not m.needs_stats]


def _call(method: MergeMethod, tensors: list[dict[str, torch.Tensor]], base: dict[str, torch.Tensor]) -> Any:
    params = {p.name: 0.5 for p in method.global_params.values() if p.default is REQUIRED}
    return mergelab.merge_state_dicts(
        tensors, method.name, base=base if method.base != "ignored" else None, parameters=params,
        model_parameters=[{"density": 0.5} if method.param("density") else {} for _ in tensors], seed=1)


def _models(method: MergeMethod) -> int:
    return max(method.min_models, 2) if method.max_models is None else method.max_models


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_every_method_merges_every_float_dtype_and_odd_shape(method: MergeMethod, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    base = {f"t{i}": (torch.rand(s, generator=g) + 0.5).to(dtype) for i, s in enumerate(SHAPES)}
    models = [{k: (v.float() + 0.25 * (j + 1)).to(dtype) for k, v in base.items()} for j in range(_models(method))]
    merged = _call(method, models, base)
    for name, tensor in base.items():
        assert merged[name].shape == tensor.shape and merged[name].dtype == dtype, name


ELEMENTWISE_AND_TASK_VECTOR = [m for m in METHODS if m.elementwise or m.base == "required"]


@pytest.mark.parametrize("method", ELEMENTWISE_AND_TASK_VECTOR, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_float8_merges_like_its_float32_values_cast_back(method: MergeMethod, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(16, 8, generator=g).to(dtype)}
    models = [{"w": (base["w"].float() + 0.5 * torch.randn(16, 8, generator=g)).to(dtype)}
              for _ in range(_models(method))]
    as_f32 = _call(method, [{k: v.float() for k, v in m.items()} for m in models], {"w": base["w"].float()})
    assert torch.equal(_call(method, models, base)["w"].float(), as_f32["w"].to(dtype).float())


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", PASSTHROUGH, ids=str)
def test_non_floating_tensors_are_copied_from_the_base(method: MergeMethod, dtype: torch.dtype) -> None:
    base = {"ids": torch.arange(6).reshape(2, 3).to(dtype)}
    models = [{"ids": (torch.arange(6).reshape(2, 3) + j + 1).to(dtype)} for j in range(_models(method))]
    merged = _call(method, models, base)["ids"]
    expected = base["ids"] if method.base != "ignored" else models[0]["ids"]
    assert merged.dtype == dtype and torch.equal(merged, expected)
