"""Resolve a method's parameters for one tensor, the way mergekit does.

A setting is a scalar, a *gradient* (a list of numbers interpolated over the layer stack: with ``L`` layers,
layer ``i`` sits at ``t = i / (L − 1)``; tensors outside the layer stack sit at ``t = 0``), or a
*conditional list* ``[{filter: self_attn, value: ...}, {value: ...}]`` whose first entry whose filter is a
substring of the tensor name (or that has no filter) applies. Per-model settings take precedence over the
global ``parameters`` block.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from mergelab.methods import all_methods
from mergelab.methods.registry import MergeMethod, Param

_LAYER_PATTERN = re.compile(
    r"(?:^|\.)(?:layers|layer|h|blocks|block|encoder\.layer|decoder\.layers)\.(\d+)\."
)


def layer_index(tensor_name: str) -> int | None:
    """Index of the transformer block a tensor belongs to (``model.layers.3.mlp...`` → 3), else None."""
    match = _LAYER_PATTERN.search(tensor_name)
    return int(match.group(1)) if match else None


def layer_position(tensor_name: str, num_layers: int) -> float:
    """mergekit's ``t`` for gradients: ``i / (L − 1)`` inside the layer stack (1 for one layer), else 0."""
    idx = layer_index(tensor_name)
    if idx is None:
        return 0.0
    return idx / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate_setting(setting: Any, tensor_name: str, t: float,
                     validate: Callable[[Any], Any] | None = None) -> Any:
    """Value of one setting for ``tensor_name`` at layer position ``t`` (None if no conditional matches).

    Gradient endpoints are passed through ``validate`` (the parameter's coercion) before interpolating, as
    mergekit does: YAML reads ``1e-3`` (no dot) as a string, and ``[1e-3, 1e-2]`` for a float parameter must
    interpolate, not select one endpoint. Numeric endpoints interpolate; bools and strings select.
    """
    if isinstance(setting, Mapping):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(isinstance(e, (int, float, bool, str)) for e in setting):
        values = [validate(e) for e in setting] if validate is not None else setting
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    for cond in setting:
        if not isinstance(cond, Mapping):
            continue
        flt = cond.get("filter")
        if flt is None or flt == "*" or flt in tensor_name:
            value = evaluate_setting(cond.get("value"), tensor_name, t, validate)
            if value is not None:
                return value
    return None


def _resolve(param: Param, scopes: Sequence[Mapping[str, Any]], tensor_name: str, t: float,
             where: str) -> Any:
    for scope in scopes:
        if param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name, t,
                                     lambda v: param.validate(v, where))
            if value is not None:
                return param.validate(value, where)
    if param.required:
        raise ValueError(f"{where}: missing required parameter '{param.name}' of this method")
    return param.default


class ResolvedParams(NamedTuple):
    """A method's parameter values for one tensor: ``params`` the global ones, ``model_params[i]`` model i's."""

    params: dict[str, Any]
    model_params: list[dict[str, Any]]


def resolve_parameters(method: MergeMethod, tensor_name: str, t: float, global_settings: Mapping[str, Any],
                       model_settings: Sequence[Mapping[str, Any]], model_names: Sequence[str] | None = None,
                       ) -> ResolvedParams:
    """Global and per-model parameter values for one tensor."""
    params = {p.name: _resolve(p, [global_settings], tensor_name, t, f"parameters (tensor {tensor_name})")
              for p in method.global_params.values()}
    per_model = []
    for i, settings in enumerate(model_settings):
        label = model_names[i] if model_names else f"model {i}"
        per_model.append({
            p.name: _resolve(p, [settings, global_settings], tensor_name, t,
                             f"{label} (tensor {tensor_name})")
            for p in method.model_params.values()
        })
    return ResolvedParams(params, per_model)


def _per_model_elsewhere(method: MergeMethod, key: str) -> bool:
    """Whether ``key`` is a per-model parameter of some other method (``weight`` on slerp, say)."""
    return method.param(key) is None and any(key in m.model_params for m in all_methods())


def check_parameter_names(method: MergeMethod, global_settings: Mapping[str, Any],
                          model_settings: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Problems with parameter names: unknown to the method, or per-model ones given globally by mistake.

    A per-model parameter that only other methods use is not a problem but an :func:`unused_parameters`
    warning, as mergekit ignores it (its own tests give slerp and model_stock models a ``weight``).
    """
    problems = []
    valid = ", ".join(p.name for p in method.params) or "(none)"
    for key in global_settings:
        if method.param(key) is None:
            problems.append(f"parameters: unknown parameter '{key}' for method '{method.name}'; "
                            f"valid: {valid}")
    model_valid = ", ".join(method.model_params) or "(none)"
    for model, settings in model_settings.items():
        for key in settings:
            if key not in method.model_params and not _per_model_elsewhere(method, key):
                problems.append(f"models[{model}].parameters: '{key}' is not a per-model parameter of "
                                f"'{method.name}'; per-model parameters: {model_valid}")
    return problems


def unused_parameters(method: MergeMethod, model_settings: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Warnings for per-model parameters ``method`` does not use but other methods do: ignored."""
    return [f"models[{model}].parameters: '{key}' is not used by '{method.name}' and is ignored (as "
            "mergekit does); remove it to silence this warning"
            for model, settings in model_settings.items() for key in settings
            if key not in method.model_params and _per_model_elsewhere(method, key)]
