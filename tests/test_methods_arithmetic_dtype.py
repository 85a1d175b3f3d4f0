"""The methods added for mergekit parity compute in the config's dtype, and in float32 without one."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mergelab.methods import get_method
from mergelab.methods.registry import TensorInputs

CASES: dict[str, tuple[dict[str, Any], list[dict[str, Any]], int]] = {
    # method: (global parameters, per-model parameters, models)
    "sce": ({"select_topk": 0.5, "int8_mask": False}, [{}] * 3, 3),
    "nuslerp": ({"nuslerp_flatten": False, "nuslerp_row_wise": False}, [{"weight": 0.3}, {"weight": 0.8}], 2),
    "multislerp": ({"normalize_weights": True, "eps": 1e-8}, [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}], 3),
    "karcher": ({"max_iter": 10, "tol": 1e-5}, [{}] * 3, 3),
    "nearswap": ({"t": 0.05}, [{}], 1),
    "arcee_fusion": ({}, [{}], 1),
    "della": ({"lambda": 1.0, "normalize": True, "rescale": True, "rescale_mode": "l1", "int8_mask": False},
              [{"weight": 0.5, "density": 0.5, "epsilon": 0.1, "tie_order": "sort"}] * 3, 3),
}


def _inputs(name: str, dtype: torch.dtype | None, seed: int = 0) -> TensorInputs:
    params, per_model, n = CASES[name]
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(16, 24, generator=g)
    tensors = [(base + 0.3 * torch.randn(16, 24, generator=g)).bfloat16() for _ in range(n)]
    return TensorInputs(name="model.layers.0.w", tensors=tensors, model_params=per_model, params=params,
                        base=base.bfloat16(), seed=seed, dtype=dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_float32_without_a_dtype_and_the_dtype_with_one(name: str) -> None:
    adapter = get_method(name).adapter
    x = _inputs(name, None)
    plain = adapter(x)
    assert plain.dtype == torch.bfloat16
    # without a dtype: the float32 computation on the same (bf16) inputs, rounded once at the end
    up = TensorInputs(name=x.name, tensors=[t.float() for t in x.tensors], model_params=x.model_params,
                      params=x.params, base=x.base.float() if x.base is not None else None, seed=x.seed)
    assert torch.equal(plain, adapter(up).bfloat16())
    in_bf16 = adapter(_inputs(name, torch.bfloat16))
    assert in_bf16.dtype == torch.bfloat16
    assert not torch.equal(plain, in_bf16)  # rounding inside the method shows: the dtype is really used
