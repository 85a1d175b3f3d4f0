"""Extract a PEFT LoRA adapter from a fine-tune: the truncated SVD of each weight matrix's delta.

For every 2-D weight whose fine-tuned value differs from the base, ``Δ = W_tuned − W_base = U S Vᵀ`` and the
adapter keeps the top ``rank`` singular directions: ``B = U_r √S_r``, ``A = √S_r V_rᵀ``, so ``B A`` is the best
rank-``r`` approximation of Δ (Eckart–Young: its Frobenius error is √Σ_{i>r} s_i², recorded per tensor).
``lora_alpha = r`` makes peft's scale 1. Embeddings (names with ``embed``/``wte``/``wpe``) use peft's embedding
layout (``lora_embedding_A`` r × vocab, ``B`` dim × r, ΔW = (B A)ᵀ); GPT-2's Conv1D layers are stored
transposed and flagged ``fan_in_fan_out``. Deltas LoRA cannot hold (biases, norms: 1-D tensors) are listed
in the record as not captured, with their size, never silently dropped from the report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from safetensors.torch import save_file

from mergelab.errors import CompatibilityError, ConfigError
from mergelab.io.models import open_model
from mergelab.io.readers import CheckpointReader
from mergelab.merge.install import RECORD_NAME, check_replaceable, install, written_files
from mergelab.methods.spectral import thin_svd

_EMBEDDING = re.compile(r"(embed|(^|\.)wte|(^|\.)wpe|(^|\.)shared)\b|embeddings?\.weight$")
_CONV1D_TYPES = {"gpt2"}  # transformers' Conv1D stores (in, out): peft calls this fan_in_fan_out


@dataclass
class ExtractResult:
    out_dir: Path
    modules: int
    not_captured: dict[str, float] = field(default_factory=dict)
    errors: dict[str, dict[str, float]] = field(default_factory=dict)


def truncated_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(B, A, Frobenius error of B A against ``delta``, ‖delta‖_F) for the best rank-``rank`` approximation."""
    u, s, vh = thin_svd(delta.to(torch.float32))
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = u[:, :r] * root
    a = root[:, None] * vh[:r]
    return b, a, float(s[r:].square().sum().sqrt()), float(s.square().sum().sqrt())


def _check_pair(base: CheckpointReader, tuned: CheckpointReader) -> list[str]:
    problems = []
    for name in base.names:
        if name in tuned and base.meta(name).shape != tuned.meta(name).shape:
            problems.append(f"tensor '{name}' has shape {list(tuned.meta(name).shape)} in the fine-tune and "
                            f"{list(base.meta(name).shape)} in the base")
    shared = [n for n in base.names if n in tuned]
    if not shared:
        problems.append("the base and the fine-tune share no tensor name: are they the same architecture?")
    return problems


def extract_lora(base: str | Path, tuned: str | Path, out_dir: str | Path, *, rank: int, overwrite: bool = False,
                 progress: bool = True) -> ExtractResult:
    """Write a PEFT LoRA adapter of rank ``rank`` that turns ``base`` into (approximately) ``tuned``."""
    if rank < 1:
        raise ConfigError(f"--rank {rank}: must be at least 1")
    out = Path(out_dir)
    check_replaceable(out, overwrite)  # an existing OUT is replaced only when it holds an earlier output
    with open_model(str(base)) as b, open_model(str(tuned)) as t:
        problems = _check_pair(b, t)
        if problems:
            raise CompatibilityError(problems)
        model_type = str(b.config().get("model_type", ""))
        state: dict[str, torch.Tensor] = {}
        targets: list[str] = []
        rank_pattern: dict[str, int] = {}
        errors: dict[str, dict[str, float]] = {}
        not_captured: dict[str, float] = {}
        fan_in_fan_out = False
        names = [n for n in b.names if n in t and b.meta(n).dtype.is_floating_point]
        bar = Progress(TextColumn("[bold]extracting"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[name]}"), disable=not progress)
        with bar:
            task = bar.add_task("extract", total=len(names), name="")
            for name in names:
                bar.update(task, advance=1, name=name[-40:])
                delta = t.get(name).to(torch.float32) - b.get(name).to(torch.float32)
                if not bool(delta.any()):
                    continue
                if delta.ndim != 2 or not name.endswith(".weight"):
                    not_captured[name] = float(delta.norm())
                    continue
                module = name.removesuffix(".weight")
                embedding = _EMBEDDING.search(name) is not None
                conv1d = model_type in _CONV1D_TYPES and not embedding
                fan_in_fan_out |= conv1d
                # peft's ΔW for embeddings and Conv1D is (B A)ᵀ: factor the transposed delta
                mat = delta.T if embedding or conv1d else delta
                fb, fa, err, norm = truncated_factors(mat, rank)
                key = f"base_model.model.{module}"
                if embedding:
                    state[f"{key}.lora_embedding_A"], state[f"{key}.lora_embedding_B"] = fa, fb
                else:
                    state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = fa, fb
                targets.append(module)
                if fa.shape[0] != rank:
                    rank_pattern[module] = int(fa.shape[0])
                errors[name] = {"frobenius_error": err, "delta_norm": norm,
                                "relative_error": err / norm if norm else 0.0}
        if not targets:
            raise CompatibilityError([f"{tuned}: no weight matrix differs from {base}: nothing to extract"])
        config = _adapter_config(str(base), rank, targets, rank_pattern, fan_in_fan_out)
        record = {"base": str(base), "tuned": str(tuned), "rank": rank, "modules": len(targets),
                  "tensors": errors, "not_captured_delta_norms": not_captured}
        _write(out, overwrite, state, config, record)
    return ExtractResult(out, len(targets), not_captured, errors)


def _adapter_config(base: str, rank: int, targets: list[str], rank_pattern: dict[str, int],
                    fan_in_fan_out: bool) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "r": rank,
        "lora_alpha": rank, "target_modules": targets, "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),  # alpha = r per module: scale 1 everywhere
        "lora_dropout": 0.0, "fan_in_fan_out": fan_in_fan_out, "bias": "none", "use_rslora": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    }


def _write(out: Path, overwrite: bool, state: dict[str, torch.Tensor], config: dict[str, Any],
           record: dict[str, Any]) -> None:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        record = {**record, "files": written_files(tmp, RECORD_NAME, "README.md")}
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
        worst = max((e["relative_error"] for e in record["tensors"].values()), default=0.0)
        (tmp / "README.md").write_text(
            "---\n" f"base_model: {record['base']}\nlibrary_name: peft\ntags: [lora, mergelab]\n---\n\n"
            f"# LoRA extracted from `{record['tuned']}`\n\nRank {record['rank']} truncated SVD of the weight "
            f"deltas against `{record['base']}` ({record['modules']} modules, largest relative Frobenius error "
            f"{worst:.3g}; per tensor in `mergelab.json`). Deltas LoRA cannot hold (biases, norms): "
            f"{len(record['not_captured_delta_norms'])} tensor(s), listed in `mergelab.json`.\n",
            encoding="utf-8")
        install(tmp, out, overwrite)  # the same atomic swap as a merge's output
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

