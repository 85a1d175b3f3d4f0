"""Same config, same tensors: mergelab against mergekit 0.1.5 on tiny Llama- and GPT-2-style folders."""

from __future__ import annotations

import json
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


def _configs(base: Path, fts: list[Path], dtype: str = "float32") -> dict[str, dict[str, Any]]:
    b, m = str(base), [str(p) for p in fts]
    gradient = [{"filter": "mlp", "value": [0.1, 0.9]}, {"filter": "self_attn", "value": 0.3}, {"value": 0.5}]
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": m[0], "parameters": {"weight": 0.2}}, {"model": m[1], "parameters": {"weight": [0.3, 0.9]}},
            {"model": m[2], "parameters": {"weight": 0.5}}], "dtype": dtype},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b, "models": [
            {"model": p, "parameters": {"weight": w}} for p, w in zip(m, (0.5, 0.7, [0.2, 1.0]))],
            "parameters": {"lambda": 0.8}, "dtype": dtype},
        "ties": {"merge_method": "ties", "base_model": b, "models": [
            {"model": p, "parameters": {"weight": w, "density": d}}
            for p, w, d in zip(m, (1.0, 0.6, 0.8), (0.3, 0.5, 0.9))],
            "parameters": {"normalize": True}, "dtype": dtype},
        "ties_unnormalized": {"merge_method": "ties", "base_model": b, "models": [
            {"model": p, "parameters": {"weight": 0.7, "density": 0.4}} for p in m],
            "parameters": {"normalize": False, "lambda": 1.3}, "dtype": dtype},
        "dare_linear": {"merge_method": "dare_linear", "base_model": b, "models": [
            {"model": p, "parameters": {"weight": 0.4, "density": 1.0}} for p in m], "dtype": dtype},
        "slerp": {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": m[0]}],
                  "parameters": {"t": gradient}, "dtype": dtype},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": b, "models": [
            {"model": p, "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.05}} for p in m],
            "dtype": dtype},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "models": [{"model": p} for p in m],
                        "dtype": dtype},
        "ties_rescale": {"merge_method": "ties", "base_model": b, "models": [
            {"model": p, "parameters": {"weight": w, "density": d}}
            for p, w, d in zip(m, (1.0, 0.6, 0.8), (0.3, 0.5, 0.9))],
            "parameters": {"rescale": True}, "dtype": dtype},
        "breadcrumbs_ties_rescale": {"merge_method": "breadcrumbs_ties", "base_model": b, "models": [
            {"model": p, "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.05}} for p in m],
            "parameters": {"rescale": True}, "dtype": dtype},
    }


def _slice_configs(fts: list[Path], arch: str, dtype: str) -> dict[str, dict[str, Any]]:
    """Layer-stacking slices (frankenmerges) on 3-layer models, as mergekit's examples write them."""
    m = [str(p) for p in fts]
    out_proj = "o_proj" if arch == "llama" else "c_proj"

    def one(model: str, layers: list[int], **params: Any) -> dict[str, Any]:
        return {"sources": [{"model": model, "layer_range": layers, **({"parameters": params} if params else {})}]}

    return {
        # orcamini-platy-44layer.yml: the first layers of one model, then later layers of another
        "stack": {"merge_method": "passthrough", "dtype": dtype,
                  "slices": [one(m[0], [0, 2]), one(m[1], [1, 3])]},
        # gpt2-small.yml: a partial slice of one model
        "partial": {"merge_method": "passthrough", "dtype": dtype, "slices": [one(m[0], [0, 2])]},
        # a duplicated block with its output projections scaled down
        "scale": {"merge_method": "passthrough", "dtype": dtype, "slices": [
            one(m[0], [0, 3]), one(m[1], [2, 3], scale=[{"filter": out_proj, "value": 0.0}, {"value": 0.5}])]},
        # slerp per slice, gradients over each slice, the base among every slice's sources
        "slerp_slices": {"merge_method": "slerp", "base_model": m[0], "dtype": dtype, "parameters": {"t": [0.2, 0.8]},
                         "slices": [{"sources": [{"model": m[0], "layer_range": [0, 2]},
                                                 {"model": m[1], "layer_range": [1, 3]}]},
                                    {"sources": [{"model": m[0], "layer_range": [2, 3]},
                                                 {"model": m[2], "layer_range": [0, 1]}],
                                     "parameters": {"t": 0.6}}]},
    }


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("case", ["stack", "partial", "scale", "slerp_slices"])
def test_slices_same_tensors_and_layer_count_as_mergekit(families: dict[str, tuple[Path, list[Path]]],
                                                          tmp_path: Path, arch: str, case: str, dtype: str) -> None:
    _, fts = families[arch]
    config = _slice_configs(fts, arch, dtype)[case]
    ours = _mergelab_merge(config, tmp_path / "mergelab")
    theirs = _mergekit_merge(config, tmp_path / "mergekit")
    assert set(ours) == set(theirs)  # renumbered layers, embeddings and head from the first and last slice
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name
    key = "num_hidden_layers" if arch == "llama" else "n_layer"
    ours_cfg = json.loads((tmp_path / "mergelab" / "config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    assert ours_cfg[key] == theirs_cfg[key] == sum(
        s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in config["slices"])


CASES = ["linear", "task_arithmetic", "ties", "ties_unnormalized", "dare_linear", "slerp", "breadcrumbs",
         "model_stock", "ties_rescale", "breadcrumbs_ties_rescale"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("case", CASES)
def test_same_tensors_as_mergekit(families: dict[str, tuple[Path, list[Path]]], tmp_path: Path, arch: str,
                                  case: str, dtype: str) -> None:
    """mergekit computes in the config's ``dtype``; so do we, so half-precision merges agree bit for bit
    (sign votes and top-k boundaries of TIES flip when one side computes in float32)."""
    base, fts = families[arch]
    config = _configs(base, fts, dtype)[case]
    ours = _mergelab_merge(config, tmp_path / "mergelab")
    theirs = _mergekit_merge(config, tmp_path / "mergekit")
    assert set(ours) == set(theirs)
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        assert ours[name].dtype == theirs[name].dtype, name
        diff = (ours[name].double() - theirs[name].double()).abs().max().item()
        assert diff == 0.0, f"{case}/{arch}: {name} differs by {diff}"
    # the merge is not a no-op: it moved away from the base
    base_t = load_file(str(base / "model.safetensors"))
    assert any(not torch.equal(ours[n], base_t[n]) for n in ours if ours[n].is_floating_point())


# -- methods added for mergekit parity (issue 12): every architecture, float32 and half precision -----------
def _hash_coin(shape: torch.Size | tuple[int, ...], probs: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for both tools' random coins: entry j is kept when u_j < p_j, with u_j a
    fixed hash of its flat index. With it, DELLA in both tools differs only if the keep probabilities,
    rescaling, election or sums differ."""
    n = int(torch.Size(shape).numel())
    u = ((torch.arange(n, dtype=torch.float64) * 0.6180339887498949) % 1.0).to(torch.float32)
    return u.reshape(shape).to(probs.device) < probs


def _new_configs(base: Path, fts: list[Path], dtype: str) -> dict[str, dict[str, Any]]:
    b, m = str(base), [str(p) for p in fts]
    return {
        "della": {"merge_method": "della", "base_model": b, "models": [
            {"model": p, "parameters": {"weight": w, "density": d, "epsilon": e}}
            for p, w, d, e in zip(m, (1.0, 0.6, 0.8), (0.3, 0.5, 0.7), (0.1, 0.2, 0.25))],
            "parameters": {"rescale_mode": "l1", "lambda": 1.2}, "dtype": dtype},
        "della_linear": {"merge_method": "della_linear", "base_model": b, "models": [
            {"model": p, "parameters": {"weight": 0.4, "density": 0.5, "epsilon": 0.15}} for p in m],
            "parameters": {"rescale_mode": "l1"}, "dtype": dtype},
        "sce": {"merge_method": "sce", "base_model": b, "models": [{"model": p} for p in m],
                "parameters": {"select_topk": 0.3}, "dtype": dtype},
        "nuslerp": {"merge_method": "nuslerp", "base_model": b, "models": [
            {"model": m[0], "parameters": {"weight": 0.3}}, {"model": m[1], "parameters": {"weight": [0.9, 0.2]}}],
            "parameters": {"nuslerp_flatten": False}, "dtype": dtype},
        "multislerp": {"merge_method": "multislerp", "base_model": b, "models": [
            {"model": p, "parameters": {"weight": w}} for p, w in zip(m, (0.2, 0.5, 0.3))], "dtype": dtype},
        "karcher": {"merge_method": "karcher", "base_model": b, "models": [{"model": p} for p in m],
                    "parameters": {"max_iter": 5}, "dtype": dtype},
        "nearswap": {"merge_method": "nearswap", "base_model": b, "models": [{"model": b}, {"model": m[0]}],
                     "parameters": {"t": 0.01}, "dtype": dtype},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": b, "models": [{"model": b}, {"model": m[1]}],
                         "dtype": dtype},
    }


NEW_CASES = ["della", "della_linear", "sce", "nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion"]
# float32 on every architecture; half precision on a Llama-like (Qwen2: with q/k/v biases) and on GPT-2
COMBOS = [(arch, "float32") for arch in ("llama", "mistral", "qwen2", "gpt2")] + [
    (arch, dtype) for arch in ("qwen2", "gpt2") for dtype in ("float16", "bfloat16")]

def _max_abs_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        assert ours[name].dtype == theirs[name].dtype, (name, ours[name].dtype, theirs[name].dtype)
        diff = (ours[name].double() - theirs[name].double()).abs().max().item()
        if diff > worst:
            worst, where = diff, name
    return worst, where


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "dtype"), COMBOS)
@pytest.mark.parametrize("case", NEW_CASES)
def test_new_methods_same_tensors_as_mergekit(families: dict[str, tuple[Path, list[Path]]], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, case: str, arch: str,
                                              dtype: str) -> None:
    import mergelab.methods.dare as dare


    base, fts = families[arch]
    config = _new_configs(base, fts, dtype)[case]
    # mergekit draws DELLA's coins with torch.bernoulli(probs), we with a seeded generator: replace both
    monkeypatch.setattr(torch, "bernoulli", lambda p: _hash_coin(p.shape, p).to(p.dtype))
    monkeypatch.setattr(dare, "bernoulli_mask", lambda shape, p, generator, device="cpu": _hash_coin(shape, p))
    ours = _mergelab_merge(config, tmp_path / "mergelab")
    theirs = _mergekit_merge(config, tmp_path / "mergekit")
    assert set(ours) == set(theirs)
    if case == "arcee_fusion" and dtype != "float32":
        # mergekit's arcee_fusion returns float32 (its mask is float32) and, with no out_dtype, writes the
        # float32 tensors: a file twice the size asked for. We write the config's dtype, the same values rounded.
        assert all(t.dtype == torch.float32 for t in theirs.values())
        theirs = {name: t.to(ours[name].dtype) for name, t in theirs.items()}
    diff, where = _max_abs_diff(ours, theirs)
    print(f"CONFORMANCE {case} {arch} {dtype} {diff:.3g} {where}")
    # the same bits in every dtype: the methods compute in the config's dtype with mergekit's operations
    assert diff == 0.0, f"{case}/{arch}/{dtype}: {where} differs by {diff}"
    base_t = load_file(str(base / "model.safetensors"))
    assert any(not torch.equal(ours[n].float(), base_t[n].float()) for n in ours if ours[n].is_floating_point())


@pytest.mark.slow
def test_multi_stage_same_tensors_as_mergekit_multi(families: dict[str, tuple[Path, list[Path]]],
                                                    tmp_path: Path) -> None:
    """A named linear stage fed into a float16 TIES stage: the same bits as ``mergekit-multi``."""
    import subprocess
    import sys

    import yaml

    base, fts = families["llama"]
    stages = [
        {"name": "soup", "merge_method": "linear", "dtype": "float32",
         "models": [{"model": str(fts[0]), "parameters": {"weight": 0.3}},
                    {"model": str(fts[1]), "parameters": {"weight": 1.0}}]},
        {"merge_method": "ties", "base_model": str(base), "dtype": "float16",
         "models": [{"model": "soup", "parameters": {"density": 0.5, "weight": 1.0}},
                    {"model": str(fts[2]), "parameters": {"density": 0.7, "weight": 0.6}}]},
    ]
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump_all(stages, sort_keys=False))
    subprocess.run([sys.executable, "-m", "mergekit.scripts.multimerge", str(path), "--intermediate-dir",
                    str(tmp_path / "mk-stages"), "--out-path", str(tmp_path / "mergekit"), "--no-write-model-card",
                    "--no-copy-tokenizer"], check=True, capture_output=True)
    result = mergelab.merge(path, tmp_path / "mergelab", progress=False, hash_inputs=False)
    ours = {k: v for f in result.files if f.suffix == ".safetensors" for k, v in load_file(f).items()}
    theirs = {k: v for f in (tmp_path / "mergekit").glob("*.safetensors") for k, v in load_file(f).items()}
    assert set(ours) == set(theirs)
    assert all(ours[n].dtype == theirs[n].dtype == torch.float16 and torch.equal(ours[n], theirs[n]) for n in ours)


# mergekit's basic-merge tests write every config the same way: two models with `weight` 0.6 and 0.4, a third as
# base_model, dtype bfloat16 — `weight` included where the method has no use for it (sce, karcher): mergekit
# ignores it, we ignore it with a warning.
BASIC_STYLE = {"della": {"density": 0.66}, "della_linear": {"density": 0.66}, "sce": {"select_topk": 0.5},
               "nuslerp": {}, "multislerp": {}, "karcher": {}}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(BASIC_STYLE))
def test_mergekit_basic_merge_style_configs(families: dict[str, tuple[Path, list[Path]]], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    import mergelab.methods.dare as dare

    _, fts = families["llama"]
    config = {"merge_method": method, "base_model": str(fts[2]), "dtype": "bfloat16",
              "models": [{"model": str(fts[0]), "parameters": {"weight": 0.6}},
                         {"model": str(fts[1]), "parameters": {"weight": 0.4}}],
              "parameters": BASIC_STYLE[method]}
    monkeypatch.setattr(torch, "bernoulli", lambda p: _hash_coin(p.shape, p).to(p.dtype))
    monkeypatch.setattr(dare, "bernoulli_mask", lambda shape, p, generator, device="cpu": _hash_coin(shape, p))
    if method.startswith("della"):
        config["parameters"] = {**config["parameters"], "rescale_mode": "l1"}  # mergekit's rescaling
    ours = _mergelab_merge(config, tmp_path / "mergelab")
    theirs = _mergekit_merge(config, tmp_path / "mergekit")
    assert set(ours) == set(theirs)
    diff, where = _max_abs_diff(ours, theirs)
    assert diff == 0.0, f"{method}: {where} differs by {diff}"
