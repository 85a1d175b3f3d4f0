"""The search config: a merge config (the format of ``mergelab merge``) plus what to search and how to score.

::

    merge:                      # any merge config; searched parameters are filled in per group
      merge_method: task_arithmetic
      base_model: base.safetensors
      models: [{model: task_a.safetensors}, {model: task_b.safetensors}]
    search:
      groups: blocks            # blocks (one group per layer/block), model (one group), or [{name, filter}]
      parameters:
        - {name: weight, low: 0.0, high: 1.5}   # per model (its scope in the method) and per group
      population: 8             # candidates per generation (default: CMA-ES's 4 + 3 ln d)
      generations: 10
      sigma0: 0.25              # initial step, as a fraction of each parameter's range
      seed: 0
    evaluator:
      callable: my_package.my_module:score      # or path/to/file.py:score
      kwargs: {split: val}                      # score(state_dict, **kwargs) -> float or {"score": ...}
      test_kwargs: {split: test}                # optional: the best and the initial config, reported on test
      label: validation accuracy (%)            # optional: y axis of the score plot

Model paths are resolved like ``mergelab merge`` does (working directory, then the YAML's folder) and written
as absolute paths into the saved best config, so it reproduces from anywhere on the same machine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergelab.errors import ConfigError
from mergelab.merge.config import MergeConfig, config_error, load_config, read_config_source
from mergelab.merge.inputs import resolve_model_path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GroupSpec(_Strict):
    name: str
    filter: str = Field(min_length=1)


class SearchParam(_Strict):
    name: str
    low: float
    high: float
    init: float | None = None  # default: the merge config's scalar value, else the method's default, else mid
    per_model: bool | None = None  # default: the parameter's scope in the method

    @model_validator(mode="after")
    def _range(self) -> SearchParam:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.high <= self.low:
            raise ValueError(f"parameter '{self.name}': need finite low < high, got [{self.low}, {self.high}]")
        if self.init is not None and not self.low <= self.init <= self.high:
            raise ValueError(f"parameter '{self.name}': init {self.init} outside [{self.low}, {self.high}]")
        return self


class SearchSettings(_Strict):
    groups: Literal["blocks", "model"] | list[GroupSpec] = "blocks"
    parameters: list[SearchParam] = Field(min_length=1)
    population: int | None = Field(default=None, ge=2)
    generations: int = Field(default=10, ge=1)
    sigma0: float = Field(default=0.25, gt=0.0, le=1.0)
    seed: int = 0


class EvaluatorSpec(_Strict):
    callable: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    test_kwargs: dict[str, Any] | None = None
    label: str = "validation score (evaluator units)"  # the plot's y axis, e.g. "mean accuracy (%)"

    @field_validator("callable")
    @classmethod
    def _path(cls, v: str) -> str:
        if ":" not in v and "." not in v:
            raise ValueError(f"'{v}' is not an import path; write 'package.module:function' or 'file.py:function'")
        return v


class SearchConfig(_Strict):
    merge: dict[str, Any]
    search: SearchSettings
    evaluator: EvaluatorSpec


def absolute_merge_config(merge: Mapping[str, Any], folder: Path | None) -> dict[str, Any]:
    """The merge section with every model path made absolute (so the saved YAML works from any folder)."""
    cfg, _ = load_config(dict(merge))  # validates it exactly as ``mergelab merge`` would
    data = dict(merge)

    def fix(path: str) -> str:
        return str(resolve_model_path(path, folder).resolve())

    if cfg.base_model is not None and "base_model" in data:
        data["base_model"] = fix(cfg.base_model)
    if "models" in data:
        data["models"] = [{**dict(m), "model": fix(m["model"])} for m in data["models"]]
    if "slices" in data:  # a single whole-model slice: rewrite it as models (what load_config does anyway)
        data.pop("slices")
        assert cfg.models is not None
        data["models"] = [{"model": fix(m.model), **({"parameters": m.parameters} if m.parameters else {})}
                          for m in cfg.models]
        data["parameters"] = dict(cfg.parameters)
        if cfg.base_model is not None:
            data["base_model"] = fix(cfg.base_model)
    if "tokenizer_source" in data and data["tokenizer_source"] not in ("base", "union", None):
        data["tokenizer_source"] = fix(data["tokenizer_source"])
    if isinstance(data.get("tokenizer"), Mapping) and data["tokenizer"].get("source", "union") not in ("base", "union"):
        data["tokenizer"] = {**dict(data["tokenizer"]), "source": fix(data["tokenizer"]["source"])}
    return data


def load_search_config(path: str | Path | Mapping[str, Any]) -> tuple[SearchConfig, MergeConfig, Path | None]:
    """(search config with absolute model paths, the validated merge config, the YAML's folder)."""
    data, source, folder = read_config_source(path, "search config")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with keys merge, search, evaluator")
    try:
        cfg = SearchConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, source, "search config", SearchConfig) from None
    try:
        merge = absolute_merge_config(cfg.merge, folder)
        merge_cfg, _ = load_config(merge)
    except ConfigError as exc:
        raise ConfigError(f"{source}: section 'merge': {exc}") from None
    cfg.merge = merge
    return cfg, merge_cfg, folder
