"""Bad inputs are refused before any heavy work, with one readable message, and nothing is written.

Every refusal is checked through the CLI: non-zero exit, an ``error:`` message naming the model, the tensor
or the key (and the fix), no traceback, no OUT_DIR and no hidden ``.OUT.tmp-*`` folder beside it.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import mergelab
from cli_helpers import (
    assert_clean_message,
    assert_ok,
    assert_refused,
    leftovers,
    load_folder,
    run_cli,
    save_model_folder,
    write_config,
)
from mergelab.cli import app
from mergelab.errors import MergeLabError

Families = dict[str, tuple[Path, list[Path]]]


def _ties(base: Path, models: list[Path], **extra: Any) -> dict[str, Any]:
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"density": 0.5}} for p in models], **extra}


def _refuse(tmp_path: Path, config: dict[str, Any], *fragments: str, args: tuple[str, ...] = ()) -> str:
    out = tmp_path / "out"
    return assert_refused(run_cli(write_config(tmp_path, config), out, *args), out, *fragments)


# -- tensors that do not line up ---------------------------------------------------------------------------
def test_every_tensor_problem_reported_at_once(families: Families, tmp_path: Path) -> None:
    """A missing tensor, a shape mismatch and an int-vs-float tensor, in three models: one message, all three."""
    base, fts = families["llama"]
    missing = load_folder(fts[0])
    del missing["model.layers.1.mlp.up_proj.weight"]
    reshaped = load_folder(fts[1])
    reshaped["model.layers.2.self_attn.o_proj.weight"] = torch.zeros(32, 16)
    integer = load_folder(fts[2])
    integer["model.norm.weight"] = torch.ones(32, dtype=torch.int64)
    a = save_model_folder(tmp_path / "missing", missing, fts[0])
    b = save_model_folder(tmp_path / "reshaped", reshaped, fts[1])
    c = save_model_folder(tmp_path / "integer", integer, fts[2])
    text = _refuse(tmp_path, _ties(base, [a, b, c]), "3 problem(s)",
                   f"{a}: missing 1 tensor", "model.layers.1.mlp.up_proj.weight",
                   f"{b}: tensor 'model.layers.2.self_attn.o_proj.weight' has shape [32, 16]", "[32, 32]",
                   f"{c}: tensor 'model.norm.weight' is torch.int64", "floating and integer")
    assert text.count("\n  - ") == 3


def test_vocab_size_mismatch_suggests_resizing(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    state = load_folder(fts[0])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = torch.cat([state[name], torch.zeros(8, 32)])
    bigger = save_model_folder(tmp_path / "bigger-vocab", state, fts[0])
    _refuse(tmp_path, _ties(base, [bigger, fts[1]]), str(bigger), "model.embed_tokens.weight",
            "vocabulary size 72", "has 64", "tokenizer_source: union")


def test_nonfinite_input_refused_unless_allowed(families: Families, tmp_path: Path) -> None:
    base, fts = families["gpt2"]
    with_nan, with_inf = load_folder(fts[0]), load_folder(fts[1])
    with_nan["transformer.h.1.mlp.c_fc.weight"][3, 4] = float("nan")
    with_inf["transformer.ln_f.bias"][0] = float("-inf")
    a = save_model_folder(tmp_path / "nan", with_nan, fts[0])
    b = save_model_folder(tmp_path / "inf", with_inf, fts[1])
    config = _ties(base, [a, b, fts[2]])
    _refuse(tmp_path, config, f"{a}: tensor 'transformer.h.1.mlp.c_fc.weight' has 1 NaN/Inf",
            f"{b}: tensor 'transformer.ln_f.bias' has 1 NaN/Inf", "--allow-nonfinite")
    out = tmp_path / "allowed"
    assert_ok(run_cli(write_config(tmp_path, config, "allowed.yml"), out, "--allow-nonfinite"))
    assert (out / "model.safetensors").is_file()


# -- config problems -----------------------------------------------------------------------------------------
def test_unknown_method_lists_valid_ones_and_suggests(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    _refuse(tmp_path, {**_ties(base, fts), "merge_method": "dare_tie"}, "unknown merge_method 'dare_tie'",
            "Did you mean 'dare_ties'?", "Valid methods:", "linear", "model_stock", "slerp")


def test_unknown_parameter_lists_valid_ones(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    _refuse(tmp_path, _ties(base, fts, parameters={"densty": 0.5}), "unknown parameter 'densty'",
            "valid: weight, density, lambda, normalize")
    config = _ties(base, fts)
    config["models"][1]["parameters"]["t"] = 0.5
    _refuse(tmp_path, config, f"models[{fts[1]}].parameters: 't' is not a per-model parameter", "weight, density")


def test_required_base_model_absent(families: Families, tmp_path: Path) -> None:
    _, fts = families["llama"]
    config = {"merge_method": "task_arithmetic", "models": [{"model": str(p)} for p in fts]}
    _refuse(tmp_path, config, "'task_arithmetic' needs a base model", "base_model:")


def test_too_many_models_for_slerp(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    config = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.5},
              "models": [{"model": str(p)} for p in fts[:2]]}
    _refuse(tmp_path, config, "'slerp' needs at least 1 and at most 1 model(s)", "got 2")


def test_typo_in_key_suggests_the_right_one(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    config = _ties(base, fts)
    config["modles"] = config.pop("models")
    _refuse(tmp_path, config, "unknown key 'modles'", "Did you mean 'models'?")
    config = _ties(base, fts)
    config["models"][0]["parameter"] = config["models"][0].pop("parameters")
    _refuse(tmp_path, config, "unknown key 'models.0.parameter'", "Did you mean 'parameters'?")


@pytest.mark.parametrize(("key", "value", "fragments"), [
    ("seed", "abc", ("'seed'", "integer")),
    ("dtype", "float8", ("'dtype'", "unknown dtype 'float8'", "bfloat16")),
    ("models", "not-a-list", ("'models'", "list")),
    ("parameters", {"lambda": "lots"}, ("parameter 'lambda' must be float", "'lots'")),
    ("parameters", {"lambda": float("nan")}, ("parameters.lambda", "finite")),
    # YAML reads 1e309 (no dot) as a string, which converts to inf
    ("parameters", {"lambda": "1e309"}, ("parameter 'lambda' must be a finite number", "'1e309'")),
    ("parameters", {"lambda": "-inf"}, ("parameter 'lambda' must be a finite number", "'-inf'")),
    ("parameters", {"lambda": "nan"}, ("parameter 'lambda' must be a finite number", "'nan'")),
    ("parameters", {"normalize": [{"filter": 3, "value": True}]}, ("parameters.normalize", "'filter' must be")),
    ("parameters", {"normalize": {"nested": {"deep": 1}}}, ("parameters.normalize", "conditional")),
])
def test_bad_value_type(families: Families, tmp_path: Path, key: str, value: Any,
                        fragments: tuple[str, ...]) -> None:
    base, fts = families["llama"]
    _refuse(tmp_path, {**_ties(base, fts), key: value}, *fragments)


def test_out_of_range_density_names_model_and_key(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    config = _ties(base, fts)
    config["models"][2]["parameters"]["density"] = 1.5
    _refuse(tmp_path, config, str(fts[2]), "parameter 'density' must be <= 1.0", "1.5")


def test_global_scope_needs_one_density_per_model(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    config = _ties(base, fts, parameters={"scope": "global"})
    config["models"][0]["parameters"]["density"] = [0.2, 0.8]
    _refuse(tmp_path, config, str(fts[0]), "scope: global", "'density' must be one number")


def test_union_tokenizer_without_tokenizers_and_missing_tokenizer_folder(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    _refuse(tmp_path, _ties(base, fts, tokenizer_source="union"), "tokenizer_source: union", str(base),
            "has no tokenizer files")
    _refuse(tmp_path, _ties(base, fts, tokenizer_source=str(tmp_path / "nope")), "tokenizer_source",
            "not a model folder")


def test_several_config_problems_at_once(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    config = _ties(base, [*fts[:2], tmp_path / "no-such-model"], parameters={"densty": 0.5})
    _refuse(tmp_path, config, "2 problem(s)", "unknown parameter 'densty'", "no-such-model")


def test_missing_model_path_says_never_downloads(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    _refuse(tmp_path, _ties(base, [fts[0], Path("meta-llama/Llama-3-8B")]), "meta-llama/Llama-3-8B",
            "no such file or folder", "never downloads")


def test_missing_config_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_refused(run_cli(tmp_path / "nope.yml", out), out, "nope.yml", "not found")
    (tmp_path / "bad.yml").write_text("merge_method: [unclosed\n")
    assert_refused(run_cli(tmp_path / "bad.yml", out), out, "not valid YAML")
    (tmp_path / "list.yml").write_text("- merge_method: linear\n")
    assert_refused(run_cli(tmp_path / "list.yml", out), out, "expected a mapping")
    (tmp_path / "binary.yml").write_bytes(b"\xff\xfe\x00garbage")
    assert_refused(run_cli(tmp_path / "binary.yml", out), out, "binary.yml")
    # a folder: said so, with the YAML files it holds
    assert_refused(run_cli(tmp_path, out), out, f"{tmp_path}: is a folder, not a config file",
                   "(it holds bad.yml, binary.yml, list.yml)")
    (tmp_path / "empty").mkdir()
    assert_refused(run_cli(tmp_path / "empty", out), out, "empty: is a folder, not a config file; give the path")


def test_method_refusal_mid_merge_is_a_clean_error(families: Families, tmp_path: Path) -> None:
    """Weights that sum to zero can only be found per tensor: still one message, and nothing written."""
    _, fts = families["llama"]
    config = {"merge_method": "linear", "models": [{"model": str(fts[0]), "parameters": {"weight": 1.0}},
                                                   {"model": str(fts[1]), "parameters": {"weight": -1.0}}]}
    _refuse(tmp_path, config, "method 'linear' cannot merge tensor", "sum to zero")
    with pytest.raises(MergeLabError, match="sum to zero"):
        mergelab.merge(config, tmp_path / "api", progress=False)
    assert not (tmp_path / "api").exists() and leftovers(tmp_path / "api") == []


# -- damaged or unsafe checkpoints ---------------------------------------------------------------------------
def _safetensors_bytes(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def test_truncated_safetensors(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    data = _safetensors_bytes(fts[0])
    bad = tmp_path / "truncated"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 1000])
    _refuse(tmp_path, _ties(base, [bad, fts[1]]), str(bad / "model.safetensors"), "truncated")


@pytest.mark.parametrize("header_len", [10**12, 7, "+16"])
def test_wrong_safetensors_header_length(families: Families, tmp_path: Path, header_len: int | str) -> None:
    base, fts = families["llama"]
    data = _safetensors_bytes(fts[0])
    n = int.from_bytes(data[:8], "little") + 16 if header_len == "+16" else int(header_len)
    bad = tmp_path / "bad-header.safetensors"
    bad.write_bytes(n.to_bytes(8, "little") + data[8:])
    _refuse(tmp_path, _ties(base, [bad, fts[1]]), str(bad), "not a valid safetensors file")


class _Exploit:
    """Pickles to ``os.system("touch MARKER")``: unpickling it with pickle.load would run the command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("layout", ["torch.save", "raw pickle", "raw pickle protocol 2", "hf folder"])
def test_malicious_pickle_is_refused_and_never_runs(families: Families, tmp_path: Path, layout: str) -> None:
    base, fts = families["llama"]
    marker = tmp_path / "PWNED"
    payload = {**load_folder(fts[0]), "model.norm.weight": _Exploit(marker)}
    if layout == "hf folder":
        folder = tmp_path / "evil-model"
        folder.mkdir()
        evil = folder / "pytorch_model.bin"
        model: Path = folder
    else:
        evil = model = tmp_path / "evil.bin"
    if layout.startswith("raw pickle"):
        with open(evil, "wb") as f:
            pickle.dump(payload, f, protocol=2 if layout.endswith("2") else pickle.DEFAULT_PROTOCOL)
    else:
        torch.save(payload, evil)
    assert not marker.exists()
    text = _refuse(tmp_path, _ties(base, [model, fts[1]]), str(evil), "refused to load", "never runs pickled code")
    assert not marker.exists(), "the pickle's code ran"
    assert "False" not in text, "torch's advice to load with weights_only=False must not be passed on"


def test_garbage_and_non_state_dict_pickles(families: Families, tmp_path: Path) -> None:
    base, _fts = families["llama"]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    _refuse(tmp_path, _ties(base, [garbage, tensor]), "2 problem(s)", f"{garbage}: cannot read",
            f"{tensor}: expected a state dict")


def test_corrupt_shard_index(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    folder = save_model_folder(tmp_path / "indexed", load_folder(fts[0]), fts[0])
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ["not", "a", "map"]}')
    _refuse(tmp_path, _ties(base, [folder, fts[1]]), "model.safetensors.index.json", "invalid shard index")


# -- the output folder ---------------------------------------------------------------------------------------
def test_existing_output_refused_without_overwrite(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    config = write_config(tmp_path, _ties(base, fts))
    text = assert_clean_message(run_cli(config, out))
    assert "exists" in text and "--overwrite" in text
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"
    assert leftovers(out) == []

    # --overwrite replaces an earlier merge, never a folder of the user's files
    text = assert_clean_message(run_cli(config, out, "--overwrite"))
    assert "precious.txt" in text and "not the output of a merge" in text and "Move them out" in text
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me" and leftovers(out) == []


def test_output_folder_holding_an_input_is_refused(families: Families, tmp_path: Path) -> None:
    """``-o BASE --overwrite`` would delete the base model when the merge is installed."""
    base_src, fts = families["llama"]
    base = save_model_folder(tmp_path / "base", load_folder(base_src), base_src)
    before = (base / "model.safetensors").read_bytes()
    result = run_cli(write_config(tmp_path, _ties(base, fts)), base, "--overwrite")
    text = assert_clean_message(result)
    assert "holds input checkpoint" in text and str(base / "model.safetensors") in text
    assert (base / "model.safetensors").read_bytes() == before and leftovers(base) == []


def test_failed_merge_leaves_existing_output_untouched(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    config = _ties(base, fts, parameters={"densty": 1})
    result = run_cli(write_config(tmp_path, config), out, "--overwrite")
    assert "densty" in assert_clean_message(result)
    assert (out / "precious.txt").read_text() == "keep me" and leftovers(out) == []


@pytest.mark.parametrize(("args", "fragment"), [
    (("--device", "potato"), "--device potato"),
    (("--max-shard-size", "-5"), "--max-shard-size"),
    (("--max-shard-size", "12 parsecs"), "--max-shard-size"),
])
def test_bad_cli_options(families: Families, tmp_path: Path, args: tuple[str, ...], fragment: str) -> None:
    base, fts = families["llama"]
    _refuse(tmp_path, _ties(base, fts), fragment, args=args)


def test_methods_command_unknown_name() -> None:
    result = CliRunner().invoke(app, ["methods", "tie"])
    text = assert_clean_message(result)
    assert text.startswith("error: unknown merge method 'tie'"), text  # not the KeyError's quoted repr


def test_an_output_folder_under_a_file_names_the_file(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    config = write_config(tmp_path, _ties(base, fts))
    out = config / "out"  # the config file is not a folder
    text = assert_clean_message(run_cli(config, out))
    assert f"{config} is a file, not a folder" in text and "-o" in text
    assert config.is_file() and leftovers(out) == []


@pytest.mark.parametrize("target", ["a file", "nothing"])
def test_eval_of_a_file_or_of_nothing_says_which(tmp_path: Path, target: str) -> None:
    path = tmp_path / "merge.yml"
    if target == "a file":
        path.write_text("merge_method: linear\n")
    result = CliRunner().invoke(app, ["eval", str(path)])
    text = assert_clean_message(result)
    assert ("is a file, not a folder" if target == "a file" else "no such folder") in text
