"""Plan a merge and check, before any heavy work, that the inputs can be merged as configured.

Every problem is collected and reported at once (missing tensors, shapes, dtypes, vocabulary sizes, an
unknown or misplaced parameter, a missing base model...), each naming the model, the tensor and the fix.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import CheckpointError, CompatibilityError
from mergelab.io.borrow import borrow_missing
from mergelab.io.models import open_model
from mergelab.io.readers import CheckpointReader, TensorMeta
from mergelab.kernels.nonfinite import nonfinite_count
from mergelab.merge.config import MergeConfig
from mergelab.merge.inputs import resolve_model_path
from mergelab.merge.params import (
    ResolvedParams,
    check_parameter_names,
    layer_index,
    layer_position,
    resolve_parameters,
    unused_parameters,
)
from mergelab.merge.slices import SlicePlan, is_frankenmerge, plan_slices
from mergelab.merge.tokenizer import TokenizerPlan, plan_tokenizer
from mergelab.merge.vocab import vocabulary_mismatch
from mergelab.merge.vocab_align import is_vocabulary_tensor
from mergelab.methods import MergeMethod, get_method

log = logging.getLogger(__name__)
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
    tokenizer_folder: Path | None = None
    """Where ``config.json``'s sibling tokenizer files are copied from (None: no tokenizer files)."""
    global_densities: list[float] | None = None
    """Per-model densities when TIES trims with one threshold over the whole model (``scope: global``)."""
    taken_from_base: dict[str, list[str]] = field(default_factory=dict)
    """``--take-missing-from base``: per model, the tensors it lacked and the base supplied."""
    dropped: dict[str, list[str]] = field(default_factory=dict)
    """``--take-missing-from base``: per model, its tensors the base lacks (left out of the output)."""
    warnings: list[str] = field(default_factory=list)
    """What the merge ignores (per-model parameters the method does not use): logged and recorded."""
    owned: list[CheckpointReader] = field(default_factory=list)
    """Readers behind the layer-stacking views in ``base``/``models`` (merge/slices.py), closed with the plan."""
    config_updates: dict[str, Any] = field(default_factory=dict)
    """Keys of the output ``config.json`` that differ from the reference's (the layer count of slices)."""
    files_folder: Path | None = None
    """Where ``config.json`` is copied from: the base model's folder (also for methods that do not merge the
    base, like linear), else the first model's."""
    params: dict[str, ResolvedParams] = field(default_factory=dict)
    """Every floating-point tensor's parameters, resolved once here; the engine merges every piece with them."""
    tokenizer: TokenizerPlan | None = None
    """The tokenizer written to the output and the row order of token-indexed tensors (merge/tokenizer.py)."""
    input_models: dict[str, list[str]] = field(default_factory=dict)
    """Per token-indexed tensor: the config's model of each input (base first), for the row re-ordering."""

    def align_vocabulary(self, name: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The inputs of tensor ``name`` (base first) with rows in the output vocabulary's order, where the
        merge re-orders them; else unchanged."""
        vocab = self.tokenizer.vocabulary if self.tokenizer is not None else None
        if vocab is None or name not in self.input_models:
            return tensors
        return vocab.align(name, self.input_models[name], tensors)

    def inputs_for(self, name: str) -> tuple[list[CheckpointReader], list[str]]:
        """The models tensor ``name`` is merged from and their labels (besides the base): all of them, except
        with layer-stacking slices whose sources differ from slice to slice (a reader serves only its own)."""
        pairs = [(r, label) for r, label in zip(self.models, self.labels, strict=True) if name in r]
        return [r for r, _ in pairs], [label for _, label in pairs]

    @property
    def readers(self) -> list[CheckpointReader]:
        return ([self.base] if self.base is not None else []) + self.models

    def close(self) -> None:
        for r in [*self.readers, *self.owned]:
            r.close()


def _num_layers(reference: CheckpointReader, names: list[str]) -> tuple[int, str | None]:
    """The layer count that places gradients (from config.json, else from the tensor names), or a problem
    when config.json's count cannot hold the tensors' layer indices (gradients would run past their end)."""
    cfg = reference.config()
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    from_tensors = max(indices) + 1 if indices else 1
    for key in _LAYER_KEYS:
        if key not in cfg:
            continue
        value = cfg[key]
        if type(value) is not int or value < 1:
            return from_tensors, f"{reference.folder}/config.json: '{key}' is {value!r}, not a positive integer"
        if value < from_tensors:
            last = next(n for n in names if layer_index(n) == from_tensors - 1)
            return value, (f"{reference.folder}/config.json: '{key}' is {value}, but tensor '{last}' belongs "
                                  f"to layer {from_tensors - 1}; fix config.json")
        return value, None
    return from_tensors, None


def plan_merge(config: MergeConfig, config_folder: Path | None = None, *,
               take_missing_from: str | None = None) -> MergePlan:
    method = get_method(config.merge_method)
    problems: list[str] = []

    def open_one(path: str) -> CheckpointReader | None:
        try:
            return open_model(path, lambda p: resolve_model_path(p, config_folder))
        except CheckpointError as exc:
            problems.append(str(exc))
            return None
        except (OSError, ValueError) as exc:  # unreadable (permissions, a NUL in the path): a problem, not a traceback
            problems.append(f"{path}: cannot read this checkpoint ({exc})")
            return None

    def open_quietly(path: str) -> CheckpointReader | None:
        try:
            return open_model(path, lambda p: resolve_model_path(p, config_folder))
        except (CheckpointError, OSError):
            return None

    entries = config.merge_models
    labels = [e.model for e in entries]
    base: CheckpointReader | None = None
    sliced: SlicePlan | None = None
    if is_frankenmerge(config, open_quietly):
        sliced = plan_slices(config, method, open_one, problems)
        if sliced is None:
            raise CompatibilityError(problems)
        base = sliced.base
        if base is None and method.base == "required":
            problems.append(f"method '{method.name}' needs a base model: add 'base_model: PATH' and give it a "
                            "source in every slice")
    elif method.base != "ignored" and config.base_model is not None:
        base = open_one(config.base_model)
    elif method.base == "required":
        problems.append(f"method '{method.name}' needs a base model: add 'base_model: PATH' (the model the "
                        "task vectors are taken from)")
    if method.needs_stats:
        problems.append(f"method '{method.name}' needs statistics of each model on its own data (see "
                        "mergelab.statistics); it runs from the Python API: mergelab.merge_state_dicts(..., "
                        "stats=...), not from a YAML config")
    if sliced is not None:
        models: list[CheckpointReader | None] = list(sliced.models)
        labels = sliced.labels
    else:
        models = [open_one(e.model) for e in entries]
    n = len(models)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        most = "" if method.max_models is None else f" and at most {method.max_models}"
        problems.append(f"method '{method.name}' needs at least {method.min_models}{most} model(s) besides "
                        f"the base, got {n}: {labels}")
    settings = sliced.settings if sliced is not None else [dict(e.parameters) for e in entries]
    named_settings = dict(zip(labels, settings, strict=True))
    problems += check_parameter_names(method, config.parameters, named_settings)
    warnings = unused_parameters(method, named_settings)
    # Whole-model (global) trimming needs one plain density per model and a plain scope; a gradient or a
    # conditional would otherwise fail in the middle of the merge, after the threshold passes.
    scope = config.parameters.get("scope") if method.param("scope") is not None else None
    if scope is not None and not isinstance(scope, str):
        problems.append(f"parameters.scope: must be one value, 'tensor' or 'global', not {scope!r}")
    scope_global = scope == "global"
    if scope_global and sliced is not None:
        problems.append("parameters.scope: 'global' needs whole models; with layer-stacking slices use 'tensor'")
    if scope_global:
        for label, s in zip(labels, settings, strict=True):
            if isinstance(s.get("density", config.parameters.get("density")), (list, Mapping)):
                problems.append(f"{label}: with scope: global, 'density' must be one number per model (one "
                                "magnitude threshold over the whole model), not a gradient or a conditional")
    tokenizer_folder, tok_problem = _tokenizer_folder(config, config_folder)
    if tok_problem:
        problems.append(tok_problem)
    files_folder = None
    if method.base == "ignored" and config.base_model is not None:
        unmerged_base = resolve_model_path(config.base_model, config_folder)
        if not unmerged_base.exists():
            problems.append(f"base_model: {config.base_model}: no such file or folder; '{method.name}' does not "
                            "merge the base, but copies its config.json and tokenizer files (mergelab never "
                            "downloads)")
        elif unmerged_base.is_dir():
            files_folder = unmerged_base

    opened = [m for m in models if m is not None]
    tok_plan = None
    if not problems and (config.token_source is not None or config.chat_template):
        tok_plan = _plan_tokenizer(config, config_folder, base, models, labels, sliced, tokenizer_folder, problems)
    aligned = tok_plan is not None and tok_plan.vocabulary is not None
    if aligned and scope_global:
        problems.append("parameters.scope: 'global' is not supported together with a tokenizer source that re-orders "
                        "embedding rows; use scope: tensor")
    # Keep comparing the checkpoints that did open, so that every problem is reported in one go; only
    # without the base (or any model) is there nothing to compare against.
    pairs = [(label, r) for label, r in zip(labels, models, strict=True) if r is not None]
    if not pairs or (base is None and config.base_model is not None and method.base != "ignored"
                     and sliced is None):
        for r in [base, *opened, *(sliced.underlying if sliced else [])]:
            if r is not None:
                r.close()
        raise CompatibilityError(problems)
    reference = base if base is not None else pairs[0][1]
    names = reference.names
    ref_label = config.base_model if base is not None else pairs[0][0]
    taken: dict[str, list[str]] = {}
    dropped: dict[str, list[str]] = {}
    if take_missing_from not in (None, "base"):
        problems.append(f"--take-missing-from {take_missing_from}: the only source is 'base'")
    elif take_missing_from is not None and base is None:
        problems.append(f"--take-missing-from {take_missing_from}: needs a base_model (and a method that uses "
                        f"one; '{method.name}' {'ignores' if method.base == 'ignored' else 'was given'} none)")
    for label, reader in pairs:
        # slices map every output tensor to its sources (merge/slices.py); a slice with fewer sources leaves
        # some positions without its tensors on purpose
        missing = [x for x in names if x not in reader] if sliced is None else []
        extra = [x for x in reader.names if x not in reference]
        if take_missing_from == "base" and base is not None:
            if missing:
                taken[label] = borrow_missing(reader, base, missing)
            if extra:
                dropped[label] = extra
            missing, extra = [], []
        fix = " or pass --take-missing-from base to copy them from the base" if base is not None else ""
        if missing:
            problems.append(f"{label}: missing {len(missing)} tensor(s) that {ref_label} has, "
                            f"e.g. {missing[:3]}{_buffer_hint(missing, fix)}")
        if extra:
            problems.append(f"{label}: has {len(extra)} tensor(s) that {ref_label} lacks, e.g. {extra[:3]}; "
                            + (f"these look like buffers saved by another library version: pass "
                               f"--take-missing-from base to leave them out, as {ref_label} does"
                               if base is not None and all(_is_buffer(x) for x in extra)
                               else "are these the same architecture?"))
        for name in names:
            if name not in reader:
                continue
            a, b = reference.meta(name), reader.meta(name)
            if aligned and is_vocabulary_tensor(name) and len(a.shape) == len(b.shape) and a.shape[1:] == b.shape[1:]:
                continue  # rows re-ordered to the output vocabulary before merging
            if a.shape != b.shape:
                same_rest = len(a.shape) == len(b.shape) and a.shape[1:] == b.shape[1:]
                if any(h in name for h in _VOCAB_HINTS) and same_rest:
                    problems.append(
                        f"{label}: tensor '{name}' has vocabulary size {b.shape[0]} but {ref_label} has "
                        f"{a.shape[0]}: the tokenizers differ. Add 'tokenizer_source: union' (or base, or a "
                        "model) to align the rows by token, or merge models that share a tokenizer")
                else:
                    problems.append(f"{label}: tensor '{name}' has shape {list(b.shape)}, {ref_label} has "
                                    f"{list(a.shape)}")
            elif a.dtype.is_floating_point != b.dtype.is_floating_point:
                problems.append(f"{label}: tensor '{name}' is {b.dtype} but {ref_label} has {a.dtype}; "
                                "floating and integer tensors cannot be merged")
    if not any("vocabulary size" in p for p in problems) and config.token_source is None:
        tokenizers = [(ref_label, reference.folder)] + [(label, r.folder) for label, r in pairs if r is not reference]
        if tokenizer_folder is not None:
            tokenizers.append((f"tokenizer_source {config.tokenizer_source}", tokenizer_folder))
        if (mismatch := vocabulary_mismatch(tokenizers)) is not None:
            problems.append(mismatch)
    num_layers, layers_problem = _num_layers(reference, names)
    if layers_problem and sliced is None:  # layer-stacking slices renumber layers (config_updates)
        problems.append(layers_problem)
    tensor_settings = sliced.tensor_settings if sliced is not None else None
    # Resolve every tensor's parameters once, now, so that a bad value fails before anything is read.
    resolved: dict[str, ResolvedParams] = {}
    seen: set[str] = set()
    for name in names:
        if not reference.meta(name).dtype.is_floating_point:
            continue
        shared, per_model, t = (tensor_settings[name] if tensor_settings is not None
                                else (config.parameters, settings, layer_position(name, num_layers)))
        tensor_labels = labels if sliced is None else [lb for r, lb in zip(sliced.models, labels, strict=True)
                                                        if name in r]
        try:
            resolved[name] = resolve_parameters(method, name, t, shared, per_model, tensor_labels)
        except ValueError as exc:
            msg = str(exc)
            key = msg.split("(tensor")[0]
            if key not in seen:
                seen.add(key)
                problems.append(msg)
    global_densities = None
    if scope_global and not problems:
        try:
            _, per_model = resolve_parameters(method, "", 0.0, config.parameters, settings, labels)
            global_densities = [float(p["density"]) for p in per_model]
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        for r in [base, *opened, *(sliced.underlying if sliced else [])]:
            if r is not None:
                r.close()
        raise CompatibilityError(problems)
    out_dtype = config.output_dtype
    out_metas = {}
    input_models: dict[str, list[str]] = {}
    config_updates = dict(sliced.config_updates) if sliced else {}
    for name in names:
        meta = reference.meta(name)
        dtype = out_dtype if out_dtype is not None and meta.dtype.is_floating_point else meta.dtype
        shape = meta.shape
        if aligned and is_vocabulary_tensor(name) and meta.shape:
            assert tok_plan is not None and tok_plan.vocabulary is not None
            shape = (tok_plan.vocabulary.rows, *meta.shape[1:])
            input_models[name] = _input_models(name, config, base, opened, labels, sliced)
        out_metas[name] = TensorMeta(shape, dtype)
    if aligned:
        assert tok_plan is not None and tok_plan.vocabulary is not None
        config_updates["vocab_size"] = tok_plan.vocabulary.rows
    files_folder = files_folder or reference.folder
    if config.token_source in (None, "base", "union"):
        tokenizer_folder = files_folder
    if tok_plan is not None:
        warnings += tok_plan.warnings
    for warning in warnings:
        log.warning(warning)
    return MergePlan(config, method, base, opened, labels, settings, names, out_metas, num_layers, reference,
                     tokenizer_folder, global_densities, taken, dropped, warnings,
                     sliced.underlying if sliced else [], config_updates, files_folder, resolved, tok_plan,
                     input_models)


# Tensors that are state but not trained parameters: saved by some library versions and not others.
_BUFFER_NAMES = re.compile(r"(position_ids|inv_freq|rotary_emb|cos_cached|sin_cached|masked_bias|attn\.bias|"
                           r"\.mask$|num_batches_tracked|token_type_ids)")


def _is_buffer(name: str) -> bool:
    return _BUFFER_NAMES.search(name) is not None


def _buffer_hint(missing: list[str], fix: str) -> str:
    if all(_is_buffer(x) for x in missing):
        return f"; these are buffers that some library versions do not save: save the model again{fix}"
    return f"; is this the same architecture?{fix}" if fix else ""


def _tokenizer_folder(config: MergeConfig, config_folder: Path | None) -> tuple[Path | None, str | None]:
    """The folder of a model-path tokenizer source, or a problem (checked here, before any heavy work)."""
    tok = config.token_source
    if tok is None or tok in ("base", "union"):
        return None, None  # the reference model's folder, known once it is opened
    folder = resolve_model_path(tok, config_folder)
    if not folder.is_dir():
        key = "tokenizer_source" if config.tokenizer_source is not None else "tokenizer.source"
        return None, (f"{key}: '{tok}' is not a model folder; use 'union', 'base' or the folder of one of "
                      "the models (mergelab never downloads)")
    return folder, None


def _folders(config: MergeConfig, config_folder: Path | None, base: CheckpointReader | None,
             models: list[CheckpointReader | None], labels: list[str],
             sliced: SlicePlan | None) -> dict[str, Path | None]:
    """Every model the config names (base first, then as listed) → its folder (tokenizer, config.json)."""
    folders: dict[str, Path | None] = {}
    if config.base_model is not None:
        folders[config.base_model] = base.folder if base is not None and sliced is None else None
    if sliced is not None:
        for model, reader in sliced.by_model.items():
            folders[model] = reader.folder
    else:
        for label, reader in zip(labels, models, strict=True):
            folders[label] = reader.folder if reader is not None else None
    for model, folder in list(folders.items()):
        if folder is None:
            path = resolve_model_path(model, config_folder)
            folders[model] = path if path.is_dir() else path.parent if path.is_file() else None
    return folders


def _plan_tokenizer(config: MergeConfig, config_folder: Path | None, base: CheckpointReader | None,
                    models: list[CheckpointReader | None], labels: list[str], sliced: SlicePlan | None,
                    source_folder: Path | None, problems: list[str]) -> TokenizerPlan | None:
    folders = _folders(config, config_folder, base, models, labels, sliced)
    base_label = config.base_model if config.base_model in folders else None
    try:
        return plan_tokenizer(config, folders, base_label, source_folder)
    except CheckpointError as exc:
        problems.append(str(exc))
    except ValueError as exc:
        problems.append(str(exc))
    return None


def _input_models(name: str, config: MergeConfig, base: CheckpointReader | None,
                  models: list[CheckpointReader], labels: list[str], sliced: SlicePlan | None) -> list[str]:
    """The config's model of each input of tensor ``name``, in the engine's order (base first)."""
    if sliced is not None:
        views = ([sliced.base] if sliced.base is not None else []) + list(sliced.models)
        return [v.source_model(name) for v in views if name in v]
    assert config.base_model is not None or base is None
    return ([config.base_model] if base is not None else []) + list(labels)  # type: ignore[list-item]


_MINMAX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def count_nonfinite(tensor: torch.Tensor) -> int:
    """How many entries of ``tensor`` are NaN or ±Inf (0 for integer tensors)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    counted = nonfinite_count(tensor)  # the compiled loop, where loaded: a third of aminmax's time
    if counted is not None:
        return counted
    # min and max propagate NaN and reach ±Inf, so finite extremes prove the whole tensor finite in one
    # pass with no temporary mask (a bf16 float32-sum was 20× slower); only then is the exact count needed.
    if tensor.dtype in _MINMAX_DTYPES:
        low, high = torch.aminmax(tensor)
        if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
            return 0
        return int((~torch.isfinite(tensor)).sum())
    # float8 has neither aminmax nor isfinite: count on float32 copies, a chunk at a time
    return sum(int((~torch.isfinite(c.float())).sum()) for c in tensor.reshape(-1).split(1 << 20))


def nonfinite_message(label: str, name: str, count: int) -> str:
    return (f"{label}: tensor '{name}' has {count} NaN/Inf value(s); fix or drop this checkpoint, or pass "
            "--allow-nonfinite to merge anyway")
