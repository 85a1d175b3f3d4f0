"""The search space: tensor groups (blocks) × searched parameters (× models), and candidate → merge config.

A candidate is a vector in [0, 1]^d (CMA-ES works on that normalised box); coordinate k maps linearly to
its parameter's [low, high]. Per-group values become mergekit-style conditional lists
``[{filter: "body.1.", value: 0.42}, ...]`` in the merge config, which ``mergelab merge`` resolves with
the same code, so a saved candidate reproduces its merge exactly.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mergelab.io.readers import open_checkpoint
from mergelab.merge.config import MergeConfig
from mergelab.methods import get_method
from mergelab.search.config import GroupSpec, SearchConfig, SearchParam

_NUMBER = re.compile(r"^\d+$")


def block_of(name: str) -> str:
    """The block a tensor belongs to, as a name prefix: up to the first numeric part (``layers.3.``), else the
    first part (``head.``), else the whole name (``cls``)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if _NUMBER.match(part):
            return ".".join(parts[: i + 1]) + "."
    return parts[0] + "." if len(parts) > 1 else name


def first_match(groups: Sequence[GroupSpec], name: str) -> str | None:
    """The group whose filter the engine would apply to ``name`` (first substring match), as it resolves
    conditional lists."""
    for g in groups:
        if g.filter in name:
            return g.name
    return None


def discover_groups(names: Sequence[str]) -> list[GroupSpec]:
    """One group per block, ordered so that the engine's first-substring-match picks each tensor's own block
    (longer prefixes first: ``model.layers.1.`` must come before ``model.``)."""
    blocks: dict[str, None] = {}
    for n in names:
        blocks.setdefault(block_of(n), None)
    ordered = sorted(blocks, key=lambda b: -len(b))
    groups = [GroupSpec(name=b.rstrip("."), filter=b) for b in ordered]
    bad = [n for n in names if first_match(groups, n) != block_of(n).rstrip(".")]
    if bad:
        raise ValueError(f"cannot make per-block filters that pick out each block by substring, e.g. for {bad[:3]}"
                         "; list the groups explicitly under search.groups as [{name, filter}]")
    return groups


@dataclass(frozen=True)
class Dimension:
    """One searched number: ``param`` for ``model`` (index into the merged models, None: global) in ``group``."""

    param: SearchParam
    model: int | None
    group: GroupSpec | None  # None: the whole model (groups: model)

    @property
    def label(self) -> str:
        who = f"[m{self.model}]" if self.model is not None else ""
        where = f"[{self.group.name}]" if self.group is not None else ""
        return f"{self.param.name}{who}{where}"


@dataclass
class SearchSpace:
    dims: list[Dimension]
    merge: dict[str, Any]  # the absolute-path merge section the candidates fill in
    merged_models: list[int]  # indices into merge["models"] of the non-base models, in merge order
    groups: list[GroupSpec] | None

    def to_values(self, x: Sequence[float]) -> list[float]:
        out = []
        for d, u in zip(self.dims, x, strict=True):
            p = d.param
            v = p.low + float(np.clip(u, 0.0, 1.0)) * (p.high - p.low)
            out.append(v)
        return out

    def merge_config(self, x: Sequence[float]) -> dict[str, Any]:
        """The merge config (a plain dict, as it will be written to YAML) for candidate ``x``."""
        cfg = copy.deepcopy(self.merge)
        collected: dict[tuple[str, int | None], list[tuple[GroupSpec | None, float]]] = {}
        for d, v in zip(self.dims, self.to_values(x), strict=True):
            value: float | int = round(v) if get_method(cfg["merge_method"]).param(d.param.name).kind is int \
                else float(v)
            collected.setdefault((d.param.name, d.model), []).append((d.group, value))
        for (pname, model), entries in collected.items():
            if entries[0][0] is None:
                setting: Any = entries[0][1]
            else:
                setting = [{"filter": g.filter, "value": v} for g, v in entries if g is not None]
            if model is None:
                cfg.setdefault("parameters", {})[pname] = setting
            else:
                entry = cfg["models"][self.merged_models[model]]
                entry.setdefault("parameters", {})[pname] = setting
        return cfg


def _initial(param: SearchParam, merge: MergeConfig, model: int | None) -> float:
    if param.init is not None:
        return param.init
    given: Any = None
    if model is not None:
        given = merge.merge_models[model].parameters.get(param.name)
    if given is None:
        given = merge.parameters.get(param.name)
    if given is None:
        method_param = get_method(merge.merge_method).param(param.name)
        given = None if method_param is None or method_param.required else method_param.default
    if isinstance(given, (int, float)) and not isinstance(given, bool):
        return float(min(param.high, max(param.low, float(given))))
    return (param.low + param.high) / 2


def build_space(cfg: SearchConfig, merge: MergeConfig) -> tuple[SearchSpace, list[float]]:
    """The search space and the initial candidate (in [0, 1]^d)."""
    method = get_method(merge.merge_method)
    for p in cfg.search.parameters:
        mp = method.param(p.name)
        if mp is None:
            valid = ", ".join(x.name for x in method.params)
            raise ValueError(f"search.parameters: '{p.name}' is not a parameter of '{method.name}'; valid: {valid}")
        if mp.kind not in (float, int):
            raise ValueError(f"search.parameters: '{p.name}' is a {mp.kind.__name__}; only numbers can be searched")
        if (mp.low is not None and p.low < mp.low) or (mp.high is not None and p.high > mp.high):
            raise ValueError(f"search.parameters: '{p.name}' range [{p.low}, {p.high}] leaves the method's allowed "
                             f"range [{mp.low}, {mp.high}]")
    groups: list[GroupSpec] | None
    if cfg.search.groups == "model":
        groups = None
    else:
        ref_path = merge.base_model if merge.base_model is not None and method.base != "ignored" else \
            merge.merge_models[0].model
        with open_checkpoint(ref_path) as reader:
            names = [n for n in reader.names if reader.meta(n).dtype.is_floating_point]
        if cfg.search.groups == "blocks":
            groups = discover_groups(names)
        else:
            groups = list(cfg.search.groups)
            unmatched = [n for n in names if first_match(groups, n) is None]
            if unmatched:
                raise ValueError(f"search.groups: no filter matches {unmatched[:5]}; add a group for them "
                                 "(a filter is a substring of tensor names)")
    models = cfg.merge.get("models") or []
    merged_labels = [m.model for m in merge.merge_models]
    merged_idx = [i for i, m in enumerate(models) if m["model"] in merged_labels]
    dims: list[Dimension] = []
    x0: list[float] = []
    for p in cfg.search.parameters:
        mp = method.param(p.name)
        assert mp is not None
        per_model = p.per_model if p.per_model is not None else mp.scope == "model"
        if per_model and mp.scope != "model":
            raise ValueError(f"search.parameters: '{p.name}' is a global parameter of '{method.name}'; "
                             "it cannot be searched per model")
        for m in (range(len(merged_idx)) if per_model else [None]):
            init = _initial(p, merge, m)
            for g in (groups if groups is not None else [None]):
                dims.append(Dimension(p, m, g))
                x0.append((init - p.low) / (p.high - p.low))
    return SearchSpace(dims, cfg.merge, merged_idx, groups), x0
