"""Same config, same tensors: mergelab against mergekit 0.1.5 on tiny Llama- and GPT-2-style folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import mergelab

mergekit = pytest.importorskip("mergekit", reason="mergekit is in the dev extra")


def _mergekit_merge(config: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0))
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _mergelab_merge(config: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    result = mergelab.merge(config, out, progress=False, hash_inputs=False)
    tensors: dict[str, torch.Tensor] = {}
    for f in result.files:
        if f.suffix == ".safetensors":
            tensors.update(load_file(f))
    return tensors


def _configs(base: Path, fts: list[Path]) -> dict[str, dict[str, Any]]:
    b, m = str(base), [str(p) for p in fts]
    gradient = [{"filter": "mlp", "value": [0.1, 0.9]}, {"filter": "self_attn", "value": 0.3}, {"value": 0.5}]
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": m[0], "parameters": {"weight": 0.2}}, {"model": m[1], "parameters": {"weight": [0.3, 0.9]}},
            {"model": m[2], "parameters": {"weight": 0.5}}], "dtype": "float32"},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b, "models": [
            {"model": p, "parameters": {"weight": w}} for p, w in zip(m, (0.5, 0.7, [0.2, 1.0]))],
            "parameters": {"lambda": 0.8}, "dtype": "float32"},
        "ties": {"merge_method": "ties", "base_model": b, "models": [
            {"model": p, "parameters": {"weight": w, "density": d}}
            for p, w, d in zip(m, (1.0, 0.6, 0.8), (0.3, 0.5, 0.9))],
            "parameters": {"normalize": True}, "dtype": "float32"},
        "ties_unnormalized": {"merge_method": "ties", "base_model": b, "models": [
            {"model": p, "parameters": {"weight": 0.7, "density": 0.4}} for p in m],
            "parameters": {"normalize": False, "lambda": 1.3}, "dtype": "float32"},
        "dare_linear": {"merge_method": "dare_linear", "base_model": b, "models": [
            {"model": p, "parameters": {"weight": 0.4, "density": 1.0}} for p in m], "dtype": "float32"},
        "slerp": {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": m[0]}],
                  "parameters": {"t": gradient}, "dtype": "float32"},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": b, "models": [
            {"model": p, "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.05}} for p in m],
            "dtype": "float32"},
    }


CASES = ["linear", "task_arithmetic", "ties", "ties_unnormalized", "dare_linear", "slerp", "breadcrumbs"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("case", CASES)
def test_same_tensors_as_mergekit(families: dict[str, tuple[Path, list[Path]]], tmp_path: Path, arch: str,
                                  case: str) -> None:
    base, fts = families[arch]
    config = _configs(base, fts)[case]
    ours = _mergelab_merge(config, tmp_path / "mergelab")
    theirs = _mergekit_merge(config, tmp_path / "mergekit")
    assert set(ours) == set(theirs)
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        diff = (ours[name].double() - theirs[name].double()).abs().max().item()
        assert diff <= 1e-5, f"{case}/{arch}: {name} differs by {diff}"
    # the merge is not a no-op: it moved away from the base
    base_t = load_file(str(base / "model.safetensors"))
    assert any(not torch.equal(ours[n], base_t[n]) for n in ours if ours[n].is_floating_point())
