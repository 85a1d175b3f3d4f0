"""PEFT LoRA adapters folded into their base model, tensor by tensor, so that they merge like any model.

A LoRA adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``). For every
target module it stores ``A`` (r × in) and ``B`` (out × r); the fine-tuned weight is ``W + s · B A`` with
``s = lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``; ``rank_pattern``/``alpha_pattern`` override
both per module), transposed for ``fan_in_fan_out`` layers (GPT-2's Conv1D) and for embeddings. Tensors saved
whole (``modules_to_save``) replace the base's. The adapter is small and read once; each base tensor is read
and folded only when the engine asks for it, so memory stays bounded like any other input.
Refused with a message: adapter types other than LoRA, DoRA (``use_dora``), LoRA biases, target modules the
base does not have.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import CheckpointError
from mergelab.io.readers import CheckpointReader, _load_pickle_state_dict

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$"
                       r"|^(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$")


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def adapter_base_name(folder: Path) -> str | None:
    """The ``base_model_name_or_path`` an adapter was trained on (a path or a Hub id), if it says."""
    return _read_config(folder).get("base_model_name_or_path") or None


@dataclass(frozen=True)
class LoraModule:
    """One target module: the fine-tuned weight is ``W + scale · (B @ A)`` (transposed if ``transpose``)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transpose: bool

    def delta(self) -> torch.Tensor:
        d = self.b.to(torch.float32) @ self.a.to(torch.float32)
        return (d.T if self.transpose else d) * self.scale


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a valid adapter config ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return cfg


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # peft matches a pattern key against the end of the module name: re.match(rf"(.*\.)?{key}$", name)
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _adapter_weights(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    for name in ADAPTER_WEIGHTS:
        path = folder / name
        if path.is_file():
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                try:
                    return path, load_file(str(path))
                except Exception as exc:  # damaged header or data: safetensors raises its own error types
                    raise CheckpointError(f"{path}: cannot read the adapter weights ({exc})") from None
            return path, _load_pickle_state_dict(path)
    raise CheckpointError(f"{folder}: has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}")


def read_lora(folder: Path) -> tuple[Path, dict[str, LoraModule], dict[str, torch.Tensor]]:
    """(weights file, module name → its LoRA factors, whole tensors that replace the base's)."""
    cfg = _read_config(folder)
    where = folder / ADAPTER_CONFIG
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported; only LoRA "
                              "adapters can be folded into their base (merge the adapter with peft's "
                              "merge_and_unload() and save the model instead)")
    if cfg.get("use_dora"):
        raise CheckpointError(f"{where}: DoRA adapters (use_dora: true) are not supported; fold it with "
                              "peft's merge_and_unload() and merge the saved model")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise CheckpointError(f"{where}: LoRA adapters that train biases (bias: {cfg.get('bias')!r}) are not "
                              "supported; fold it with peft's merge_and_unload() and merge the saved model")
    weights_file, state = _adapter_weights(folder)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    embedding: set[str] = set()
    whole: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key.removeprefix(_PREFIX)
        m = _LORA_KEY.match(name)
        if m is None:
            if "lora_" in name or "magnitude" in name:
                raise CheckpointError(f"{weights_file}: tensor '{key}' is not a LoRA factor this reader knows")
            whole[name.replace(".modules_to_save.default", "")] = tensor
            continue
        module = m.group("module") or m.group("emodule")
        kind = (m.group("kind") or m.group("ekind"))[-1]  # "A" or "B"
        if m.group("emodule"):
            embedding.add(module)
        factors.setdefault(module, {})[kind] = tensor
    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    modules = {}
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{weights_file}: module '{module}' has lora_{next(iter(ab))} but not its pair")
        r = int(_pattern_value(cfg.get("rank_pattern") or {}, module, r_default))
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha_default))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        a, b = ab["A"], ab["B"]
        if module in embedding:  # lora_embedding_A is (r, num_embeddings), B (dim, r): ΔW = (B A)ᵀ
            modules[module] = LoraModule(a, b, scale, transpose=True)
        else:
            modules[module] = LoraModule(a, b, scale, transpose=bool(cfg.get("fan_in_fan_out")))
    if not modules and not whole:
        raise CheckpointError(f"{weights_file}: holds no LoRA factors")
    return weights_file, modules, whole


class _Folded:
    """Stands where a base tensor's storage stands in a reader: returns ``W + ΔW`` in W's dtype."""

    def __init__(self, original: Any, lora: LoraModule | None, whole: torch.Tensor | None) -> None:
        self.original, self.lora, self.whole = original, lora, whole

    def get(self, name: str) -> torch.Tensor:
        if self.whole is not None:
            return self.whole
        w = self.original if isinstance(self.original, torch.Tensor) else self.original.get(name)
        assert self.lora is not None
        return (w.to(torch.float32) + self.lora.delta()).to(w.dtype)

    def get_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get(name).reshape(-1)[start:stop]


def _base_name(reader: CheckpointReader, module: str, suffix: str) -> str | None:
    """The base tensor of ``module`` (``module.suffix``), also when the base's names carry a prefix."""
    exact = f"{module}.{suffix}"
    if exact in reader:
        return exact
    ends = [n for n in reader.names if n.endswith(f".{exact}")]
    if len(ends) == 1:
        return ends[0]
    parts = module.split(".")  # the adapter's names carry a prefix the base lacks (model.* vs a bare model)
    for i in range(1, len(parts)):
        shorter = ".".join(parts[i:]) + f".{suffix}"
        if shorter in reader:
            return shorter
    return None


def fold_lora(reader: CheckpointReader, adapter: Path) -> CheckpointReader:
    """``reader`` (the base) with the LoRA adapter in folder ``adapter`` folded into its tensors."""
    weights_file, modules, whole = read_lora(adapter)
    problems = []
    for module, lora in modules.items():
        name = _base_name(reader, module, "weight")
        if name is None:
            problems.append(f"target module '{module}' has no '{module}.weight' in the base")
            continue
        shape = reader.meta(name).shape
        if tuple(lora.delta().shape) != tuple(shape):
            problems.append(f"'{module}': B·A has shape {list(lora.delta().shape)} but the base's '{name}' has "
                            f"{list(shape)}")
            continue
        reader._where[name] = _Folded(reader._where[name], lora, None)
    for key, tensor in whole.items():
        name = _base_name(reader, key.rsplit(".", 1)[0], key.rsplit(".", 1)[-1]) if "." in key else None
        if name is None or tuple(reader.meta(name).shape) != tuple(tensor.shape):
            problems.append(f"saved tensor '{key}' {list(tensor.shape)} has no tensor of that shape in the base")
            continue
        reader._where[name] = _Folded(reader._where[name], None, tensor.to(reader.meta(name).dtype))
    if problems:
        reader.close()
        raise CheckpointError(f"{adapter}: this LoRA adapter does not fit the base model {reader.path}: "
                              + "; ".join(problems[:3]) + ("" if len(problems) <= 3 else
                                                           f" (and {len(problems) - 3} more)")
                              + ". Use the base model it was trained on")
    reader.files.append(weights_file)
    reader.path = Path(f"{reader.path.absolute()}+{adapter.absolute()}")
    return reader
