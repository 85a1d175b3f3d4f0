"""End to end through ``mergelab merge``: tiny Llama/GPT-2/BERT folders in, loadable sharded folders out.

Every merge is checked against :func:`mergelab.merge_state_dicts` on the same inputs, so the engine's
streaming, sharding, dtype handling and record are tested, not only that it runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import blake3
import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

import mergelab
from cli_helpers import (
    assert_ok,
    assert_refused,
    leftovers,
    load_folder,
    load_output,
    run_cli,
    write_config,
)
from mergelab.merge.config import load_config
from mergelab.merge.engine import COPIED_FILES
from mergelab.methods import ties_merge
from tiny_models import tiny_tokenizer

Families = dict[str, tuple[Path, list[Path]]]
AUTO_CLASS = {"llama": transformers.AutoModelForCausalLM, "gpt2": transformers.AutoModelForCausalLM,
              "bert": transformers.AutoModel}


def _hf_state(arch: str, folder: Path) -> dict[str, torch.Tensor]:
    model, info = AUTO_CLASS[arch].from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_index(out: Path) -> None:
    """A valid Hugging Face shard index: every tensor is in the shard the map names, sizes add up."""
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    total = 0
    for shard in shards:
        tensors = load_file(out / shard)
        assert {n for n, f in index["weight_map"].items() if f == shard} == set(tensors)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total


# -- three architectures, sharded output, loadable, same tensors as the in-memory API -----------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_merge_loads_back_with_transformers(families: Families, tmp_path: Path, arch: str) -> None:
    base, fts = families[arch]
    weights: list[Any] = [0.5, [0.2, 0.9], 0.7]
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "seed": 5,
              "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(fts, weights, strict=True)],
              "parameters": {"lambda": 0.8}}
    out = tmp_path / "out"
    assert_ok(run_cli(write_config(tmp_path, config), out, "--max-shard-size", "30KB"))

    _check_index(out)
    merged = _hf_state(arch, out)
    expected = mergelab.merge_state_dicts(
        [_hf_state(arch, p) for p in fts], "task_arithmetic", base=_hf_state(arch, base),
        parameters={"lambda": 0.8}, model_parameters=[{"weight": w} for w in weights], num_layers=3)
    assert set(merged) == set(expected)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)

    # config.json copied as is (no dtype change asked), the record says what was done
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    record = json.loads((out / "mergelab.json").read_text())
    assert record["method"] == "task_arithmetic"
    assert record["parameters"] == {"lambda": 0.8}
    assert record["seed"] == 5
    assert record["mergelab_version"] == mergelab.__version__
    assert [m["parameters"]["weight"] for m in record["models"]] == weights
    inputs = [base / "model.safetensors", *(p / "model.safetensors" for p in fts)]
    assert sorted(record["input_digests"]["files"]) == sorted(str(p) for p in inputs)
    assert record["input_digests"]["files"][str(inputs[1])] == blake3.blake3(inputs[1].read_bytes()).hexdigest()
    # the exact config used is kept and can be run again
    again, _ = load_config(out / "mergelab_config.yml")
    assert again.merge_method == "task_arithmetic" and again.seed == 5
    assert leftovers(out) == []


def test_config_and_tokenizer_files_copied(families: Families, tmp_path: Path) -> None:
    base_src, fts = families["llama"]
    base = tmp_path / "base"
    shutil.copytree(base_src, base)
    tiny_tokenizer(base, ["merge", "these", "models"])
    other = tiny_tokenizer(tmp_path / "other-tokenizer", ["a", "different", "vocabulary"])
    tok_files = [f for f in COPIED_FILES if (base / f).is_file() and f != "config.json"]
    assert "tokenizer.json" in tok_files

    config = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(p), "parameters": {"density": 0.5}} for p in fts]}
    out = tmp_path / "out"
    assert_ok(run_cli(write_config(tmp_path, config), out))
    for name in ["config.json", "generation_config.json", *tok_files]:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("merge these models")["input_ids"] == [1, 2, 3]
    record = json.loads((out / "mergelab.json").read_text())
    assert set(tok_files) <= set(record["copied_files"])

    # tokenizer_source: another folder's tokenizer, as mergekit does it: the output has that vocabulary's 4 rows
    # ('[UNK]' merged, the 3 tokens no model has are zeros) and config.json (from the base) says so
    config["tokenizer_source"] = str(other)
    out2 = tmp_path / "out2"
    assert_ok(run_cli(write_config(tmp_path, config, "tok.yml"), out2))
    assert transformers.AutoTokenizer.from_pretrained(out2).get_vocab() == \
        transformers.AutoTokenizer.from_pretrained(other).get_vocab()
    cfg = json.loads((out2 / "config.json").read_text())
    assert cfg["vocab_size"] == 4 and cfg == {**json.loads((base / "config.json").read_text()), "vocab_size": 4}
    merged = load_file(out2 / "model.safetensors")
    assert merged["model.embed_tokens.weight"].shape == (4, 32)
    assert torch.equal(merged["model.embed_tokens.weight"][1:], torch.zeros(3, 32))
    record = json.loads((out2 / "mergelab.json").read_text())
    assert any("has no tokenizer files" in w for w in record["warnings"])


# -- input layouts --------------------------------------------------------------------------------------
def test_sharded_inputs(sharded_family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, fts = sharded_family
    assert (base / "model.safetensors.index.json").is_file() and len(list(base.glob("*.safetensors"))) > 1
    config = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(p), "parameters": {"density": 0.4, "weight": 0.6}} for p in fts]}
    out = tmp_path / "out"
    assert_ok(run_cli(write_config(tmp_path, config), out))
    assert (out / "model.safetensors").is_file()  # default shard size: one file
    expected = mergelab.merge_state_dicts(
        [load_folder(p) for p in fts], "ties", base=load_folder(base),
        model_parameters=[{"density": 0.4, "weight": 0.6}] * 3, num_layers=3)
    merged = load_output(out)
    assert set(merged) == set(expected)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
    record = json.loads((out / "mergelab.json").read_text())
    shard_files = {str(f) for p in [base, *fts] for f in p.glob("*.safetensors")}
    assert set(record["input_digests"]["files"]) == shard_files


def test_pt_bin_and_single_safetensors_inputs(families: Families, tmp_path: Path) -> None:
    """The same weights as a lone .safetensors file, a .pt, a .bin and an HF folder with pytorch_model.bin
    merge to exactly what the safetensors folders merge to."""
    from safetensors.torch import save_file

    base, fts = families["llama"]
    states = [load_folder(p) for p in (base, *fts)]
    files = tmp_path / "files"
    files.mkdir()
    save_file(states[0], str(files / "base.safetensors"))
    torch.save({"state_dict": states[1]}, files / "ft0.pt")  # nested, as training scripts save it
    torch.save(states[2], files / "ft1.bin")
    bin_folder = files / "ft2"
    bin_folder.mkdir()
    torch.save(states[3], bin_folder / "pytorch_model.bin")
    shutil.copy2(fts[2] / "config.json", bin_folder / "config.json")

    def config(paths: list[Path]) -> dict[str, Any]:
        return {"merge_method": "dare_ties", "base_model": str(paths[0]), "seed": 3,
                "models": [{"model": str(p), "parameters": {"density": 0.7, "weight": 0.5}} for p in paths[1:]]}

    out_files, out_folders = tmp_path / "from-files", tmp_path / "from-folders"
    mixed = [files / "base.safetensors", files / "ft0.pt", files / "ft1.bin", bin_folder]
    assert_ok(run_cli(write_config(tmp_path, config(mixed), "files.yml"), out_files))
    assert_ok(run_cli(write_config(tmp_path, config([base, *fts]), "folders.yml"), out_folders))
    a, b = load_output(out_files), load_output(out_folders)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    record = json.loads((out_files / "mergelab.json").read_text())
    assert str(bin_folder / "pytorch_model.bin") in record["input_digests"]["files"]


# -- every method, end to end, against the in-memory API ----------------------------------------------------
def _method_cases(base: Path, fts: list[Path]) -> dict[str, dict[str, Any]]:
    """name -> (method, global parameters, per-model parameters, models used, base used)."""
    m = fts
    return {
        "linear": dict(method="linear", params={}, models=m, per_model=[{"weight": 1.0}, {"weight": 2.0},
                                                                        {"weight": [0.5, 1.5]}], base=None),
        "task_arithmetic": dict(method="task_arithmetic", params={"lambda": 0.7}, models=m,
                                per_model=[{"weight": 0.3}, {"weight": 0.5}, {"weight": 0.2}], base=base),
        "ties": dict(method="ties", params={"normalize": True}, models=m,
                     per_model=[{"density": 0.3, "weight": 1.0}, {"density": 0.5, "weight": 0.6},
                                {"density": [0.2, 0.8], "weight": 0.8}], base=base),
        "dare_linear": dict(method="dare_linear", params={}, models=m,
                            per_model=[{"density": 0.6, "weight": 0.4}] * 3, base=base),
        "dare_ties": dict(method="dare_ties", params={"lambda": 1.1}, models=m,
                          per_model=[{"density": 0.5, "weight": 0.5}] * 3, base=base),
        "breadcrumbs": dict(method="breadcrumbs", params={}, models=m,
                            per_model=[{"density": 0.8, "gamma": 0.05, "weight": 0.5}] * 3, base=base),
        "breadcrumbs_ties": dict(method="breadcrumbs_ties", params={}, models=m,
                                 per_model=[{"density": 0.7, "gamma": 0.1, "weight": 0.6}] * 3, base=base),
        "slerp": dict(method="slerp", params={"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.4}]},
                      models=m[:1], per_model=[{}], base=base),
        "model_stock": dict(method="model_stock", params={}, models=m, per_model=[{}] * 3, base=base),
        "cart": dict(method="cart", params={"rank_ratio": 0.25, "lambda": 1.2}, models=m,
                     per_model=[{}] * 3, base=base),
        "della": dict(method="della", params={"lambda": 0.9}, models=m,
                      per_model=[{"density": 0.5, "epsilon": 0.2, "weight": 0.7}] * 3, base=base),
        "della_linear": dict(method="della_linear", params={"rescale_mode": "l1"}, models=m,
                             per_model=[{"density": [0.3, 0.7], "epsilon": 0.1, "weight": 0.5}] * 3, base=base),
        "sce": dict(method="sce", params={"select_topk": 0.4}, models=m, per_model=[{}] * 3, base=base),
        "nuslerp": dict(method="nuslerp", params={"nuslerp_flatten": False}, models=m[:2],
                        per_model=[{"weight": 0.3}, {"weight": [0.2, 0.9]}], base=base),
        "nuslerp_no_base": dict(method="nuslerp", params={}, models=m[:2],
                                per_model=[{"weight": 1.0}, {"weight": 2.0}], base=None),
        "multislerp": dict(method="multislerp", params={}, models=m,
                           per_model=[{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}], base=base),
        "karcher": dict(method="karcher", params={"max_iter": 20}, models=m, per_model=[{}] * 3, base=base),
        "nearswap": dict(method="nearswap", params={"t": 0.01}, models=m[:1], per_model=[{}], base=base),
        "arcee_fusion": dict(method="arcee_fusion", params={}, models=m[1:2], per_model=[{}], base=base),
    }


@pytest.mark.parametrize("case", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                                  "breadcrumbs_ties", "slerp", "model_stock", "cart", "della", "della_linear",
                                  "sce", "nuslerp", "nuslerp_no_base", "multislerp", "karcher", "nearswap",
                                  "arcee_fusion"])
def test_every_method_end_to_end(families: Families, tmp_path: Path, case: str) -> None:
    base, fts = families["llama"]
    c = _method_cases(base, fts)[case]
    config: dict[str, Any] = {"merge_method": c["method"], "seed": 11, "parameters": c["params"],
                              "models": [{"model": str(p), "parameters": s}
                                         for p, s in zip(c["models"], c["per_model"], strict=True)]}
    if c["base"] is not None:
        config["base_model"] = str(c["base"])
    out = tmp_path / "out"
    assert_ok(run_cli(write_config(tmp_path, config), out, "--max-shard-size", "40KB"))
    merged = load_output(out)
    expected = mergelab.merge_state_dicts(
        [load_folder(p) for p in c["models"]], c["method"],
        base=load_folder(c["base"]) if c["base"] is not None else None,
        parameters=c["params"], model_parameters=c["per_model"], seed=11, num_layers=3)
    assert set(merged) == set(expected)
    for name, tensor in merged.items():
        assert torch.isfinite(tensor).all(), name
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=f"{case}: {name}")
    assert json.loads((out / "mergelab.json").read_text())["method"] == c["method"]


def test_ties_global_scope(families: Families, tmp_path: Path) -> None:
    """``scope: global``: one magnitude threshold per model over the whole model, as in the TIES paper."""
    base, fts = families["llama"]
    densities = [0.2, 0.5, 0.3]
    config = {"merge_method": "ties", "base_model": str(base), "parameters": {"scope": "global"},
              "models": [{"model": str(p), "parameters": {"density": d}} for p, d in zip(fts, densities, strict=True)]}
    out = tmp_path / "out"
    assert_ok(run_cli(write_config(tmp_path, config), out))
    merged = load_output(out)

    b = load_folder(base)
    states = [load_folder(p) for p in fts]
    thresholds = []
    for sd, d in zip(states, densities, strict=True):
        mags = torch.cat([(sd[n] - b[n]).abs().reshape(-1) for n in b]).sort(descending=True).values
        thresholds.append(float(mags[max(1, int(d * mags.numel())) - 1]))
    for name in b:
        expected = ties_merge(b[name], [sd[name] for sd in states], [1.0] * 3, densities, thresholds=thresholds)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6, msg=name)
    per_tensor = mergelab.merge_state_dicts(states, "ties", base=b,
                                            model_parameters=[{"density": d} for d in densities])
    assert any(not torch.equal(merged[n], per_tensor[n]) for n in b), "global scope changed nothing"


# -- dtypes ----------------------------------------------------------------------------------------------------
def test_bf16_output(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    models = [{"model": str(p), "parameters": {"weight": 0.4}} for p in fts]
    out32, out16 = tmp_path / "fp32", tmp_path / "bf16"
    common = {"merge_method": "task_arithmetic", "base_model": str(base), "models": models}
    assert_ok(run_cli(write_config(tmp_path, {**common, "dtype": "float32"}, "a.yml"), out32))
    assert_ok(run_cli(write_config(tmp_path, {**common, "dtype": "float32", "out_dtype": "bfloat16"}, "b.yml"),
                      out16))
    full, half = load_output(out32), load_output(out16)
    for name, tensor in half.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, full[name].to(torch.bfloat16)), name
    cfg = json.loads((out16 / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(out16, dtype="auto")
    assert model.dtype == torch.bfloat16


def test_bf16_compute_dtype(families: Families, tmp_path: Path) -> None:
    """``dtype: bfloat16`` alone: the math runs in bf16 and the output is bf16 too."""
    _, fts = families["gpt2"]
    config = {"merge_method": "linear", "dtype": "bf16", "models": [{"model": str(p)} for p in fts]}
    out = tmp_path / "out"
    assert_ok(run_cli(write_config(tmp_path, config), out))
    merged = load_output(out)
    expected = mergelab.merge_state_dicts(
        [{k: v.to(torch.bfloat16) for k, v in load_folder(p).items()} for p in fts], "linear")
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[name]), name


# -- mergekit-style slices ---------------------------------------------------------------------------------
def test_slices_spanning_whole_model(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    sliced = {"merge_method": "ties", "base_model": str(base), "slices": [{"sources": [
        {"model": str(p), "layer_range": [0, 3], "parameters": {"density": 0.5}} for p in fts]}]}
    plain = {"merge_method": "ties", "base_model": str(base),
             "models": [{"model": str(p), "parameters": {"density": 0.5}} for p in fts]}
    a, b = tmp_path / "sliced", tmp_path / "plain"
    assert_ok(run_cli(write_config(tmp_path, sliced, "s.yml"), a))
    assert_ok(run_cli(write_config(tmp_path, plain, "p.yml"), b))
    x, y = load_output(a), load_output(b)
    assert set(x) == set(y) and all(torch.equal(x[n], y[n]) for n in x)


@pytest.mark.parametrize(("ranges", "fragment"), [([[0, 5]] * 3, "goes past its 3 layers"),
                                                   ([[0, 2], [1, 3], [0, 1]], "same number of layers"),
                                                   ([[2, 2]] * 3, "is empty")])
def test_impossible_slice_is_a_clear_error(families: Families, tmp_path: Path, ranges: list[list[int]],
                                           fragment: str) -> None:
    """Partial and layer-stacking slices merge (tests/test_mergekit_conformance.py); these cannot."""
    _, fts = families["llama"]
    config = {"merge_method": "linear", "slices": [{"sources": [
        {"model": str(p), "layer_range": r} for p, r in zip(fts, ranges)]}]}
    out = tmp_path / "out"
    assert_refused(run_cli(write_config(tmp_path, config), out), out, fragment, "layer_range")


def test_api_matches_cli(families: Families, tmp_path: Path) -> None:
    """``mergelab.merge`` (the Python API) and the CLI write the same tensors and a YAML the CLI can rerun."""
    base, fts = families["bert"]
    config = {"merge_method": "breadcrumbs", "base_model": str(base),
              "models": [{"model": str(p), "parameters": {"density": 0.9, "gamma": 0.02}} for p in fts]}
    result = mergelab.merge(config, tmp_path / "api", progress=False)
    assert result.tensors == len(load_output(tmp_path / "api"))
    rerun = tmp_path / "rerun"
    assert_ok(run_cli(tmp_path / "api" / "mergelab_config.yml", rerun))
    x, y = load_output(tmp_path / "api"), load_output(rerun)
    assert all(torch.equal(x[n], y[n]) for n in x)
    assert yaml.safe_load((rerun / "mergelab_config.yml").read_text())["merge_method"] == "breadcrumbs"
