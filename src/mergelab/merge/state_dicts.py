"""Merge in-memory state dicts with any registered method (notebooks, studies, tests)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergelab.merge.core import merge_tensor
from mergelab.merge.params import (
    check_parameter_names,
    layer_index,
    layer_position,
    resolve_parameters,
    unused_parameters,
)
from mergelab.methods import get_method

log = logging.getLogger(__name__)


def merge_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    method: str = "linear",
    *,
    base: Mapping[str, torch.Tensor] | None = None,
    weights: Sequence[float] | None = None,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    num_layers: int | None = None,
    device: str | torch.device | None = None,
    stats: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge ``state_dicts`` (the non-base models) tensor by tensor with ``method``.

    ``weights`` is a shortcut for a per-model ``weight`` parameter; ``parameters`` are the global settings
    and ``model_parameters[i]`` the per-model ones, both in the YAML's format (scalars, gradients,
    conditional lists). ``stats[name]`` gives per-model statistics for data-aware methods. Results are on
    the CPU in the inputs' dtype.
    """
    m = get_method(method)
    if not state_dicts:
        raise ValueError("merge_state_dicts needs at least one state dict")
    if m.needs_stats and not stats:
        raise ValueError(f"method '{method}' needs per-model statistics of data: pass stats={{tensor_name: "
                         "[one per model]} (see mergelab.statistics)")
    if m.base == "required" and base is None:
        raise ValueError(f"method '{method}' needs a base model: pass base=...")
    n = len(state_dicts)
    if n < m.min_models or (m.max_models is not None and n > m.max_models):
        most = m.max_models if m.max_models is not None else "any"
        raise ValueError(f"method '{method}' takes {m.min_models}..{most} non-base models, got {n}")
    per_model = [dict(p) for p in (model_parameters or [{} for _ in state_dicts])]
    if len(per_model) != n:
        raise ValueError(f"got {n} state dicts but {len(per_model)} model_parameters")
    if weights is not None:
        if len(weights) != n:
            raise ValueError(f"got {n} state dicts but {len(weights)} weights")
        for p, w in zip(per_model, weights):
            p.setdefault("weight", float(w))
    settings = dict(parameters or {})
    problems = check_parameter_names(m, settings, dict(enumerate(per_model)))
    for warning in unused_parameters(m, dict(enumerate(per_model))):
        log.warning(warning)
    keys = list(state_dicts[0].keys())
    for i, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != set(keys):
            diff = sorted(set(keys) ^ set(sd))[:5]
            problems.append(f"state dict {i} has different keys from state dict 0, e.g. {diff}")
    if base is not None and not set(keys) <= set(base):
        problems.append(f"base lacks keys {sorted(set(keys) - set(base))[:5]}")
    if problems:
        raise ValueError("cannot merge:\n  " + "\n  ".join(problems))
    if num_layers is None:
        indices = [i for i in (layer_index(k) for k in keys) if i is not None]
        num_layers = max(indices) + 1 if indices else 1
    dev = torch.device(device) if device is not None else None
    out: dict[str, torch.Tensor] = {}
    for name in keys:
        tensors = [sd[name] for sd in state_dicts]
        base_t = base[name] if base is not None and m.base != "ignored" else None
        floating = (base_t if base_t is not None else tensors[0]).is_floating_point()
        params = resolve_parameters(m, name, layer_position(name, num_layers), settings, per_model) \
            if floating else None
        merged = merge_tensor(m, name, tensors, base=base_t, params=params, seed=seed, device=dev,
                              stats=stats.get(name) if stats else None)
        out[name] = merged.detach().to("cpu")
    return out
