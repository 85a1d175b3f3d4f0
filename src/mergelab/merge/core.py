"""Merge one tensor name: resolve parameters, call the method's adapter. Shared by the engine and the API."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergelab.merge.params import layer_position, resolve_parameters
from mergelab.methods.registry import MergeMethod, TensorInputs


def tensor_seed(seed: int, tensor_name: str) -> int:
    """Seed for one tensor, from the merge seed and the tensor's name (order-independent, reproducible)."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**62 - 1)


def passthrough(base: torch.Tensor | None, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Non-floating tensors (BatchNorm counters, position ids) are copied from the base or the first model."""
    return base if base is not None else tensors[0]


def merge_tensor(
    method: MergeMethod,
    name: str,
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    global_settings: Mapping[str, Any],
    model_settings: Sequence[Mapping[str, Any]],
    seed: int,
    num_layers: int,
    model_names: Sequence[str] | None = None,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    stats: Sequence[Any] | None = None,
    thresholds: Sequence[float] | None = None,
    t: float | None = None,
) -> torch.Tensor:
    """Merge the tensors of one name; ``t`` is the gradient position (None: from the layer index)."""
    reference = base if base is not None else tensors[0]
    if not reference.is_floating_point():
        return passthrough(base, tensors)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        if device is not None:
            x = x.to(device, non_blocking=True)
        return x.to(compute_dtype) if compute_dtype is not None else x

    if t is None:
        t = layer_position(name, num_layers)
    params, per_model = resolve_parameters(method, name, t, global_settings, model_settings, model_names)
    inputs = TensorInputs(
        name=name,
        tensors=[prepare(x) for x in tensors],
        model_params=per_model,
        params=params,
        base=prepare(base) if base is not None else None,
        seed=tensor_seed(seed, name),
        stats=stats,
        thresholds=thresholds,
        dtype=compute_dtype,
    )
    return method.adapter(inputs)
