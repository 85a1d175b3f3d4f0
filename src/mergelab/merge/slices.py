"""Layer-stacking ``slices`` (frankenmerges), as mergekit plans them.

Output layers are numbered in slice order: slice ``s`` contributes ``layer_range[1] − layer_range[0]``
layers, and output layer ``o`` of that slice is merged from layer ``layer_range[0] + (o − offset)`` of each of
its sources. Tensors outside the layer stack come from the first slice's sources (embeddings) or the last
slice's (final norm, LM head), and ``config.json``'s layer count becomes the total. Gradients run over each
slice (``t = i / (L_s − 1)``), and a parameter is looked up in the source's ``parameters``, then the
slice's, then the top-level block (mergekit's precedence).

The engine merges one output name at a time across inputs of the same name; here each *source position*
``j`` (the j-th source of every slice, the base model's source set apart) becomes one :class:`SlicedReader`
that serves output names from the right model and layer, so the streaming engine needs no special case.
Slices may have different sources, and different numbers of them (as in mergekit): a slice with fewer
sources leaves the later positions without its tensors, and the engine merges each tensor over the
readers that serve it (``MergePlan.inputs_for``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mergelab.io.readers import CheckpointReader, TensorMeta
from mergelab.merge.config import MergeConfig, SliceDefinition, SliceSource
from mergelab.merge.params import layer_index
from mergelab.methods import MergeMethod

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# Tensors outside the layer stack that follow it (mergekit's "post weights"); the others precede it.
_POST = re.compile(r"(^|\.)(lm_head|norm|ln_f|final_layer_norm|final_layernorm|pooler|score|classifier)(\.|$)")
_INDEX = re.compile(r"((?:^|\.)(?:layers|layer|h|blocks|block)\.)(\d+)(\.)")


def is_frankenmerge(config: MergeConfig, open_one: Callable[[str], CheckpointReader | None]) -> bool:
    """Slices other than one slice whose sources all span the whole model (mergekit's usual SLERP config,
    merged like ``models``)."""
    if not config.slices:
        return False
    if len(config.slices) > 1:
        return True
    ranges = {s.layer_range for s in config.slices[0].sources}
    if len(ranges) != 1 or next(iter(ranges))[0] != 0:
        return True
    reader = open_one(config.slices[0].sources[0].model)
    if reader is None:
        return False  # the plan reports why it cannot be opened
    try:
        return next(iter(ranges))[1] != _layer_count(reader)
    finally:
        reader.close()


def renumbered(name: str, layer: int) -> str:
    """``name`` with its layer index replaced by ``layer`` (``model.layers.3.mlp`` → ``model.layers.7.mlp``)."""
    return _INDEX.sub(lambda m: f"{m.group(1)}{layer}{m.group(3)}", name, count=1)


class SlicedReader:
    """A read-only view that serves output tensor names from (reader, input name) pairs."""

    def __init__(self, label: str, parts: dict[str, tuple[CheckpointReader, str]], reference: CheckpointReader,
                 config_updates: Mapping[str, Any], models: Mapping[str, str] | None = None) -> None:
        self.label = label
        self._parts = parts
        self._models = dict(models or {})
        self.path = reference.path
        self.folder = reference.folder
        self._reference = reference
        self._config_updates = dict(config_updates)
        readers = {id(r): r for r, _ in parts.values()}
        self.files = sorted({f for r in readers.values() for f in r.files})

    @property
    def names(self) -> list[str]:
        return list(self._parts)

    def __contains__(self, name: str) -> bool:
        return name in self._parts

    def source_model(self, name: str) -> str:
        """The config's name of the model that output tensor ``name`` is read from."""
        return self._models.get(name, self.label)

    def meta(self, name: str) -> TensorMeta:
        reader, source = self._parts[name]
        return reader.meta(source)

    def get(self, name: str) -> torch.Tensor:
        reader, source = self._parts[name]
        return reader.get(source)

    def get_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        reader, source = self._parts[name]
        return reader.get_flat(source, start, stop)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._parts:
            yield name, self.get(name)

    def config(self) -> dict[str, Any]:
        return {**self._reference.config(), **self._config_updates}

    def close(self) -> None:  # the underlying readers belong to the plan and are closed there
        pass


@dataclass
class SlicePlan:
    base: SlicedReader | None
    models: list[SlicedReader]
    labels: list[str]
    settings: list[dict[str, Any]]
    """Per source position: every per-model setting any slice gives it (for name checks only)."""
    underlying: list[CheckpointReader]
    num_layers: int
    tensor_settings: dict[str, tuple[dict[str, Any], list[dict[str, Any]], float]] = field(default_factory=dict)
    """Per output tensor: (global settings, per-model settings, t) with mergekit's precedence."""
    config_updates: dict[str, Any] = field(default_factory=dict)
    by_model: dict[str, CheckpointReader] = field(default_factory=dict)
    """Each source model's reader, by its name in the config (in order of first use)."""


def _split(sl: SliceDefinition, base_model: str | None) -> tuple[SliceSource | None, list[SliceSource]]:
    base = next((s for s in sl.sources if base_model is not None and s.model == base_model), None)
    return base, [s for s in sl.sources if s is not base]


def plan_slices(config: MergeConfig, method: MergeMethod, open_one: Callable[[str], CheckpointReader | None],
                problems: list[str]) -> SlicePlan | None:
    """Map every output tensor of a frankenmerge to its sources; None (with ``problems``) if impossible."""
    assert config.slices is not None
    uses_base = method.base != "ignored"
    readers: dict[str, CheckpointReader | None] = {}
    for sl in config.slices:
        for src in sl.sources:
            if src.model not in readers:
                readers[src.model] = open_one(src.model)
    underlying = [r for r in readers.values() if r is not None]
    splits = []
    for i, sl in enumerate(config.slices):
        base_model = (sl.base_model or config.base_model) if uses_base else None
        base_src, others = _split(sl, base_model)
        if base_model is not None and base_src is None and method.base == "required":
            problems.append(f"slices[{i}]: base_model '{base_model}' is not among this slice's sources; add it "
                            "with the layer_range its layers come from")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if len(lengths) != 1:
            problems.append(f"slices[{i}]: every source must span the same number of layers, got layer_range "
                            f"{[list(s.layer_range) for s in sl.sources]}")
        for s in sl.sources:
            if s.layer_range[0] < 0 or s.layer_range[1] <= s.layer_range[0]:
                problems.append(f"slices[{i}]: layer_range {list(s.layer_range)} of '{s.model}' is empty or "
                                "negative; write [first, last + 1]")
        splits.append((base_src, others))
    for i, (_, others) in enumerate(splits):
        n = len(others)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            most = "" if method.max_models is None else f" and at most {method.max_models}"
            problems.append(f"slices[{i}]: method '{method.name}' needs at least {method.min_models}{most} source(s) "
                            f"besides the base, got {n}")
    has_base = {b is not None for b, _ in splits}
    if len(has_base) != 1:
        problems.append("slices: give the base model a source in every slice or in none")
    if problems or any(r is None for r in readers.values()):
        return None
    for model, reader in readers.items():
        assert reader is not None
        layers = _layer_count(reader)
        for i, sl in enumerate(config.slices):
            for s in sl.sources:
                if s.model == model and s.layer_range[1] > layers:
                    problems.append(f"slices[{i}]: layer_range {list(s.layer_range)} of '{model}' goes past its "
                                    f"{layers} layers")
    if problems:
        return None
    k = max(len(others) for _, others in splits)
    with_base = has_base.pop()
    positions = ([None] if with_base else []) + list(range(k))  # None: the base's source
    parts: dict[int | None, dict[str, tuple[CheckpointReader, str]]] = {p: {} for p in positions}
    model_of: dict[int | None, dict[str, str]] = {p: {} for p in positions}
    tensor_settings: dict[str, tuple[dict[str, Any], list[dict[str, Any]], float]] = {}

    def source_at(sl_index: int, position: int | None) -> SliceSource | None:
        base_src, others = splits[sl_index]
        return base_src if position is None else others[position] if position < len(others) else None

    def source_of(sl_index: int, position: int | None) -> SliceSource:
        src = source_at(sl_index, position)
        assert src is not None
        return src

    def any_source(sl_index: int) -> SliceSource:
        base_src, others = splits[sl_index]
        src = others[0] if others else base_src
        assert src is not None
        return src

    def settings(sl_index: int, t: float) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
        sl = config.slices[sl_index]  # type: ignore[index]
        shared = {**config.parameters, **sl.parameters}
        return shared, [{**shared, **src.parameters} for src in splits[sl_index][1]], t

    def add(out_name: str, sl_index: int, in_layer_offset: int | None) -> None:
        for p in positions:
            src = source_at(sl_index, p)
            if src is None:  # this slice has fewer sources than the widest one
                continue
            reader = readers[src.model]
            assert reader is not None
            name = out_name if in_layer_offset is None else renumbered(out_name, src.layer_range[0] + in_layer_offset)
            parts[p][out_name] = (reader, name)
            model_of[p][out_name] = src.model

    first, last = any_source(0), any_source(len(config.slices) - 1)
    first_reader, last_reader = readers[first.model], readers[last.model]
    assert first_reader is not None and last_reader is not None
    for name in first_reader.names:
        if layer_index(name) is None and not _POST.search(name):
            add(name, 0, None)
            tensor_settings[name] = settings(0, 0.0)
    offset = 0
    for i in range(len(config.slices)):
        src0 = any_source(i)
        reader0 = readers[src0.model]
        assert reader0 is not None
        length = src0.layer_range[1] - src0.layer_range[0]
        for idx in range(length):
            t = idx / (length - 1) if length > 1 else 1.0
            for name in reader0.names:
                if layer_index(name) == src0.layer_range[0] + idx:
                    out_name = renumbered(name, offset + idx)
                    add(out_name, i, idx)
                    tensor_settings[out_name] = settings(i, t)
        offset += length
    for name in last_reader.names:
        if layer_index(name) is None and _POST.search(name):
            add(name, len(config.slices) - 1, None)
            tensor_settings[name] = settings(len(config.slices) - 1, 0.0)
    key = next((x for x in _LAYER_KEYS if isinstance(first_reader.config().get(x), int)), "num_hidden_layers")
    updates = {key: offset}
    missing = [(p, out, src) for p in positions for out, (r, src) in parts[p].items() if src not in r]
    for p, out, src in missing[:3]:
        problems.append(f"slices: output tensor '{out}' needs '{src}', which {model_of[p][out]} lacks")
    if problems:
        return None

    def label(p: int | None) -> str:
        models = [src.model for i in range(len(config.slices)) if (src := source_at(i, p)) is not None]
        return "+".join(dict.fromkeys(models))

    def first_with(p: int | None) -> SliceSource:
        return next(src for i in range(len(config.slices)) if (src := source_at(i, p)) is not None)

    views = {p: SlicedReader(label(p), parts[p], readers[first_with(p).model], updates,  # type: ignore[arg-type]
                             model_of[p]) for p in positions}
    all_settings = [{key: v for i in range(len(config.slices)) if (src := source_at(i, j)) is not None
                     for key, v in src.parameters.items()} for j in range(k)]
    return SlicePlan(views[None] if with_base else None, [views[j] for j in range(k)], [label(j) for j in range(k)],
                     all_settings, underlying, offset, tensor_settings, updates,
                     {m: r for m, r in readers.items() if r is not None})


def _layer_count(reader: CheckpointReader) -> int:
    cfg = reader.config()
    for key in _LAYER_KEYS:
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    indices = [i for i in (layer_index(n) for n in reader.names) if i is not None]
    return max(indices) + 1 if indices else 0

