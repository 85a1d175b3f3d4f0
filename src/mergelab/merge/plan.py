"""Plan a merge and check, before any heavy work, that the inputs can be merged as configured.

Every problem is collected and reported at once (missing tensors, shapes, dtypes, vocabulary sizes, an
unknown or misplaced parameter, a missing base model...), each naming the model, the tensor and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import CheckpointError, CompatibilityError
from mergelab.io.readers import CheckpointReader, TensorMeta, open_checkpoint
from mergelab.merge.config import MergeConfig, resolve_model_path
from mergelab.merge.params import check_parameter_names, layer_index, layer_position, resolve_parameters
from mergelab.methods import MergeMethod, get_method

_VOCAB_HINTS = ("embed", "lm_head", "wte", "word_embeddings", "shared.weight", "output.weight")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    base: CheckpointReader | None
    models: list[CheckpointReader]
    labels: list[str]
    model_settings: list[dict[str, Any]]
    names: list[str]
    out_metas: dict[str, TensorMeta]
    num_layers: int
    reference: CheckpointReader

    @property
    def readers(self) -> list[CheckpointReader]:
        return ([self.base] if self.base is not None else []) + self.models

    def close(self) -> None:
        for r in self.readers:
            r.close()


def _num_layers(reference: CheckpointReader, names: list[str]) -> int:
    cfg = reference.config()
    for key in _LAYER_KEYS:
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else 1


def plan_merge(config: MergeConfig, config_folder: Path | None = None) -> MergePlan:
    method = get_method(config.merge_method)
    problems: list[str] = []

    def open_one(path: str) -> CheckpointReader | None:
        try:
            return open_checkpoint(resolve_model_path(path, config_folder))
        except CheckpointError as exc:
            problems.append(str(exc))
            return None

    entries = config.merge_models
    labels = [e.model for e in entries]
    base: CheckpointReader | None = None
    if method.base != "ignored" and config.base_model is not None:
        base = open_one(config.base_model)
    elif method.base == "required":
        problems.append(f"method '{method.name}' needs a base model: add 'base_model: PATH' (the model the "
                        "task vectors are taken from)")
    models = [open_one(e.model) for e in entries]
    n = len(entries)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        most = "" if method.max_models is None else f" and at most {method.max_models}"
        problems.append(f"method '{method.name}' needs at least {method.min_models}{most} model(s) besides the base, "
                        f"got {n}: {labels}")
    settings = [dict(e.parameters) for e in entries]
    problems += check_parameter_names(method, config.parameters, dict(zip(labels, settings)))

    opened = [m for m in models if m is not None]
    if problems or len(opened) != len(models):
        for r in [base, *opened]:
            if r is not None:
                r.close()
        raise CompatibilityError(problems)
    reference = base if base is not None else opened[0]
    names = reference.names
    ref_label = config.base_model if base is not None else labels[0]
    for label, reader in zip(labels, opened):
        missing = [x for x in names if x not in reader]
        extra = [x for x in reader.names if x not in reference]
        if missing:
            problems.append(f"{label}: missing {len(missing)} tensor(s) that {ref_label} has, e.g. {missing[:3]}")
        if extra:
            problems.append(f"{label}: has {len(extra)} tensor(s) that {ref_label} lacks, e.g. {extra[:3]}; "
                            "are these the same architecture?")
        for name in names:
            if name not in reader:
                continue
            a, b = reference.meta(name), reader.meta(name)
            if a.shape != b.shape:
                if any(h in name for h in _VOCAB_HINTS) and len(a.shape) == len(b.shape) and a.shape[1:] == b.shape[1:]:
                    problems.append(
                        f"{label}: tensor '{name}' has vocabulary size {b.shape[0]} but {ref_label} has {a.shape[0]}: "
                        "the tokenizers differ. Resize the embeddings to one vocabulary first "
                        "(model.resize_token_embeddings) or merge models that share a tokenizer")
                else:
                    problems.append(f"{label}: tensor '{name}' has shape {list(b.shape)}, {ref_label} has "
                                    f"{list(a.shape)}")
            elif a.dtype.is_floating_point != b.dtype.is_floating_point:
                problems.append(f"{label}: tensor '{name}' is {b.dtype} but {ref_label} has {a.dtype}; floating and "
                                "integer tensors cannot be merged")
    num_layers = _num_layers(reference, names)
    if config.slice_layer_range is not None and config.slice_layer_range[1] != num_layers:
        problems.append(f"slices: layer_range {list(config.slice_layer_range)} does not span the model's "
                        f"{num_layers} layers; only whole-model slices are supported")
    # Resolve every tensor's parameters now, so that a bad value fails before anything is read.
    seen: set[str] = set()
    for name in names:
        if not reference.meta(name).dtype.is_floating_point:
            continue
        try:
            resolve_parameters(method, name, layer_position(name, num_layers), config.parameters, settings, labels)
        except ValueError as exc:
            msg = str(exc)
            key = msg.split("(tensor")[0]
            if key not in seen:
                seen.add(key)
                problems.append(msg)
    if problems:
        for r in [base, *opened]:
            if r is not None:
                r.close()
        raise CompatibilityError(problems)
    out_dtype = config.output_dtype
    out_metas = {}
    for name in names:
        meta = reference.meta(name)
        dtype = out_dtype if out_dtype is not None and meta.dtype.is_floating_point else meta.dtype
        out_metas[name] = TensorMeta(meta.shape, dtype)
    return MergePlan(config, method, base, opened, labels, settings, names, out_metas, num_layers, reference)


def nonfinite_problem(label: str, name: str, tensor: torch.Tensor) -> str | None:
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return None
    bad = int((~torch.isfinite(tensor)).sum())
    return (f"{label}: tensor '{name}' has {bad} NaN/Inf value(s); fix or drop this checkpoint, or pass "
            "--allow-nonfinite to merge anyway")
