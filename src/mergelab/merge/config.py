"""The merge config: mergekit's YAML format for the methods we share, validated by pydantic.

Accepted (as in mergekit): ``merge_method``, ``base_model``, ``models: [{model, parameters}]``, a single
``slices`` entry whose sources span whole models, global ``parameters``, ``dtype``, ``out_dtype``,
``tokenizer_source`` (``union``, ``base`` or a model: embedding rows aligned by token, merge/tokenizer.py),
``tokenizer: {source, tokens, pad_to_multiple_of}``, ``chat_template``. Our own keys:
``seed`` (random methods) and ``name``. Unknown keys and bad values are errors that name the key and the
allowed values.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergelab.errors import ConfigError
from mergelab.methods import get_method, list_methods
from mergelab.safe_yaml import load_yaml, read_config_text

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


def _check_scalar(value: bool | int | float | str, where: str) -> None:
    # NaN or ±inf would pass every range check (comparisons with NaN are false) and only surface much later
    # as a non-finite merged tensor blamed on the method, so refuse them here, naming the key.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: must be a finite number, got {value!r}")


def _check_setting(value: Any, where: str) -> Any:
    """A setting is a scalar, a list of scalars (gradient) or a list of ``{filter, value}`` conditionals."""
    if isinstance(value, (bool, int, float, str)):
        _check_scalar(value, where)
        return value
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, list):
        if not value:  # would silently mean "the default" (evaluate_setting finds no value in it)
            raise ValueError(f"{where}: an empty list is not a value; give a number, a gradient list "
                             "[start, ..., end] or conditional entries")
        if all(isinstance(e, (bool, int, float, str)) for e in value):
            for e in value:
                _check_scalar(e, where)
            return value
        for i, entry in enumerate(value):
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where}: a conditional list must hold only {{filter, value}} entries, "
                                 f"got {entry!r}")
            if "pattern" in entry and "filter" not in entry:
                # mergekit's examples/gradient-slerp.yml writes 'pattern', a key mergekit silently drops, so the
                # entry matches every tensor there: do the same (same tensors), but say so
                log.warning("%s: 'pattern' is not a key of a conditional entry; mergekit ignores it, so this "
                            "entry (value %r) applies to every tensor. Write 'filter' to restrict it",
                            where, entry.get("value"))
                entry = {k: v for k, v in entry.items() if k != "pattern"}
                value[i] = entry
            extra = set(entry) - {"filter", "value"}
            if extra or "value" not in entry:
                raise ValueError(f"{where}: conditional entries take keys 'filter' and 'value', "
                                 f"got {sorted(entry)}")
            # A filter is matched as a substring of tensor names: anything but a string would fail with a
            # TypeError deep inside the merge.
            if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                raise ValueError(f"{where}: 'filter' must be a string (part of a tensor name), "
                                 f"got {entry['filter']!r}")
            _check_setting(entry["value"], where)
        return value
    raise ValueError(f"{where}: expected a number, bool, string, gradient list or conditional list, "
                     f"got {value!r}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelEntry(_Strict):
    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("parameters")
    @classmethod
    def _settings(cls, v: dict[str, Any]) -> dict[str, Any]:
        return {k: _check_setting(x, f"parameters.{k}") for k, x in v.items()}


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)

    # Slice parameters become the models' and the global parameters: check them the same way.
    @field_validator("parameters")
    @classmethod
    def _settings(cls, v: dict[str, Any]) -> dict[str, Any]:
        return {k: _check_setting(x, f"parameters.{k}") for k, x in v.items()}


class SliceDefinition(_Strict):
    sources: list[SliceSource]
    parameters: dict[str, Any] = Field(default_factory=dict)
    base_model: str | None = None

    @field_validator("parameters")
    @classmethod
    def _settings(cls, v: dict[str, Any]) -> dict[str, Any]:
        return {k: _check_setting(x, f"parameters.{k}") for k, x in v.items()}


class ModelTokenSource(_Strict):
    """A row of one model's own embedding: the row of ``token`` in its tokenizer, or row ``token_id``."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of 'token' and 'token_id'")
        return self


class ZeroSource(_Strict):
    kind: Literal["zero"]


class TokenSetting(_Strict):
    """Where a token's embedding rows come from (mergekit's ``tokenizer.tokens.TOKEN``)."""

    source: ModelTokenSource | ZeroSource | str | None = None
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, v: Any) -> Any:
        # one clear message instead of pydantic's one error per member of the union
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, Mapping) and v.get("kind") == "zero":
            return ZeroSource.model_validate(v)
        if isinstance(v, Mapping) and v.get("kind") == "model_token":
            try:
                return ModelTokenSource.model_validate(v)
            except ValidationError as exc:
                msgs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'source'}: {e['msg'].removeprefix('Value error, ')}"
                                 for e in exc.errors())
                raise ValueError(f"model_token source {dict(v)}: {msgs}") from None
        raise ValueError(f"a token's source is a model path, {{kind: model_token, model: PATH, token: TOKEN}} "
                         f"(or token_id: ROW), or {{kind: zero}}; got {v!r}")


class TokenizerSettings(_Strict):
    source: str = "union"
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class MergeConfig(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[SliceDefinition] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    seed: int = 0
    name: str | None = None

    @field_validator("merge_method")
    @classmethod
    def _method(cls, v: str) -> str:
        # pydantic only turns ValueError into a validation error; get_method's KeyError would escape raw.
        try:
            get_method(v)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        return v

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in DTYPES:
            raise ValueError(f"unknown dtype '{v}'; allowed: {', '.join(DTYPES)}")
        return v

    @field_validator("parameters")
    @classmethod
    def _settings(cls, v: dict[str, Any]) -> dict[str, Any]:
        return {k: _check_setting(x, f"parameters.{k}") for k, x in v.items()}

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeConfig:
        if self.slices is not None:
            if self.models is not None:
                raise ValueError("give either 'models' or 'slices', not both")
            if not self.slices or any(not sl.sources for sl in self.slices):
                raise ValueError("slices: every slice needs at least one entry in 'sources'")
            sl = self.slices[0]
            ranges = {s.layer_range for s in sl.sources}
            whole = len(self.slices) == 1 and len(ranges) == 1 and next(iter(ranges))[0] == 0
            # The whole-model form (mergekit's usual SLERP config) is merged like 'models'; layer-stacking
            # slices keep their own parameters per slice (merge/slices.py) and list the first slice's sources
            # here only so that the method's checks (base, number of models) see one slice's inputs.
            self.models = [ModelEntry(model=s.model, parameters=s.parameters) for s in sl.sources]
            if whole:
                self.parameters = {**self.parameters, **sl.parameters}
                self.base_model = sl.base_model or self.base_model
        if not self.models:
            raise ValueError("'models' must list at least one model")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either 'tokenizer_source' or a 'tokenizer' block (its 'source'), not both")
        listed = [m.model for m in self.models]
        twice = sorted({m for m in listed if listed.count(m) > 1})
        # which entry's parameters would count? (per-model checks saw only the last); slice sources may
        # legitimately take two layer ranges of one model
        if twice and self.slices is None:
            raise ValueError(f"model {twice[0]!r} is listed more than once; list each model once (a larger "
                             "weight counts it more)")
        return self

    # -- derived ------------------------------------------------------------------------------------------
    @property
    def slice_layer_range(self) -> tuple[int, int] | None:
        return self.slices[0].sources[0].layer_range if self.slices else None

    @property
    def merge_models(self) -> list[ModelEntry]:
        """The models that are merged, without the base (a base listed among the models is the base)."""
        method = get_method(self.merge_method)
        assert self.models is not None
        if method.base == "ignored" or self.base_model is None:
            return list(self.models)
        return [m for m in self.models if m.model != self.base_model]

    @property
    def token_source(self) -> str | None:
        """The tokenizer the output gets (``union``, ``base`` or a model), from either way of giving it."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype else None

    @property
    def output_dtype(self) -> torch.dtype | None:
        return DTYPES[self.out_dtype] if self.out_dtype else self.compute_dtype


def _model_at(tp: Any, path: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model that ``path`` (a validation error's location) leads to from the type ``tp``.

    Walks fields; a list index or dict key steps into the item type; pydantic puts a union member's tag
    (e.g. ``list[GroupSpec]``) into the location, so a union tries each member with and without the next part.
    """
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if not path:
            return tp
        field = tp.model_fields.get(path[0]) if isinstance(path[0], str) else None
        return _model_at(field.annotation, path[1:]) if field is not None else None
    origin, args = get_origin(tp), get_args(tp)
    if origin in (list, tuple, dict) and path:
        return _model_at(args[-1], path[1:])
    if origin in (Union, UnionType):
        members = [a for a in args if a is not type(None)]
        for rest in (path, path[1:]) if path else (path,):
            for member in members:
                if (model := _model_at(member, rest)) is not None:
                    return model
    return None


def config_error(exc: ValidationError, source: str, what: str, schema: type[BaseModel]) -> ConfigError:
    """One :class:`ConfigError` for every problem pydantic found in ``source`` (a ``what`` with the model
    ``schema``): an unknown key names the keys allowed where it stands (and the closest one), a missing key
    its place, any other problem its place and pydantic's message."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            model = _model_at(schema, err["loc"][:-1])
            allowed = list(model.model_fields) if model is not None else []
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            lines.append(f"unknown key '{loc}'.{hint}" + (f" Allowed keys here: {', '.join(allowed)}" if allowed
                                                            else ""))
        elif err["type"] == "missing":
            lines.append(f"missing required key '{loc}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"'{loc}': {msg}")
    return ConfigError(f"{source}: invalid {what}:\n" + "\n".join(f"  - {x}" for x in lines))


def read_config_source(config: str | Path | Mapping[str, Any], what: str) -> tuple[Any, str, Path | None]:
    """(parsed data, the name errors give it, the YAML's folder) of a YAML path or an in-memory mapping.

    Errors name a file by its path and a mapping by ``what``; a missing, unreadable or invalid file is a
    :class:`ConfigError`.
    """
    if isinstance(config, (str, Path)):
        path = Path(config)
        return read_yaml(path, f"{what} file"), str(path), path.parent
    return dict(config), what, None


def read_yaml(path: Path, what: str) -> Any:
    """The parsed YAML at ``path``; a missing, unreadable or invalid file is a :class:`ConfigError`."""
    if path.is_dir():  # a model folder or the folder of the config, given by mistake
        yamls = sorted(q.name for q in path.iterdir() if q.suffix in (".yml", ".yaml") and q.is_file())[:3]
        hint = f" (it holds {', '.join(yamls)})" if yamls else ""
        raise ConfigError(f"{path}: is a folder, not a {what}{hint}; give the path of the YAML file itself")
    text = read_config_text(path, what.removesuffix(" file"))
    return load_yaml(text, str(path))  # duplicate keys, alias bombs and deep nesting refused (safe_yaml.py)


def load_config(config: str | Path | Mapping[str, Any] | MergeConfig) -> tuple[MergeConfig, Path | None]:
    """Parse a YAML path, a dict or a :class:`MergeConfig`; returns it and the YAML's folder (if any)."""
    if isinstance(config, MergeConfig):
        return config, None
    data, source, folder = read_config_source(config, "config")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    if "merge_method" in data and isinstance(data["merge_method"], str):
        try:
            get_method(data["merge_method"])
        except KeyError:
            close = difflib.get_close_matches(data["merge_method"], list_methods(), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown merge_method '{data['merge_method']}'.{hint} "
                              f"Valid methods: {', '.join(list_methods())}") from None
    try:
        return MergeConfig.model_validate(data), folder
    except ValidationError as exc:
        raise config_error(exc, source, "merge config", MergeConfig) from None
