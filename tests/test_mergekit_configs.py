"""mergekit configs run unchanged: the config's ``dtype`` is the arithmetic dtype, per-model parameters a
method does not use are ignored with a warning (as mergekit ignores them)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import mergelab
from cli_helpers import assert_ok, load_folder, load_output, run_cli, write_config
from mergelab.merge.params import check_parameter_names, unused_parameters
from mergelab.methods import get_method, ties_merge

Families = dict[str, tuple[Path, list[Path]]]


# -- arithmetic dtype ----------------------------------------------------------------------------------------
def test_half_precision_vote_is_taken_in_half_precision() -> None:
    """By hand: base 0, deltas +1 and −1 with weights 1 and 1.0004. In float32 the vote 1 − 1.0004 is
    negative; in float16 the weight rounds to 1 (spacing 2⁻¹⁰ at 1), the vote is 0, which elects +."""
    base = torch.zeros(1, dtype=torch.float16)
    a = torch.tensor([1.0], dtype=torch.float16)
    b = torch.tensor([-1.0], dtype=torch.float16)
    # float32: 1·1 + 1.0004·(−1) < 0 → the negative delta wins the vote and is the result
    assert ties_merge(base, [a, b], [1.0, 1.0004], [1.0, 1.0]).item() == pytest.approx(-1.0, abs=1e-3)
    # float16: the weight 1.0004 rounds to 1.0 (spacing 2⁻¹⁰ at 1), the vote is 0 → positive, result +1
    assert ties_merge(base, [a, b], [1.0, 1.0004], [1.0, 1.0], dtype=torch.float16).item() == 1.0


def test_dtype_in_config_is_the_arithmetic_dtype(families: Families, tmp_path: Path) -> None:
    """``dtype: float16`` gives the merge computed in float16 (inputs rounded, then the method in
    float16), not the float32 merge rounded at the end; no ``dtype`` computes in float32."""
    base, fts = families["llama"]
    models = [{"model": str(p), "parameters": {"weight": w, "density": 0.4}} for p, w in zip(fts, (1.0, .6, .8))]
    config = {"merge_method": "ties", "base_model": str(base), "models": models}
    assert_ok(run_cli(write_config(tmp_path, {**config, "dtype": "float16"}, "h.yml"), tmp_path / "half"))
    assert_ok(run_cli(write_config(tmp_path, {**config, "out_dtype": "float16"}, "f.yml"), tmp_path / "full"))
    half, full = load_output(tmp_path / "half"), load_output(tmp_path / "full")
    b16 = {k: v.to(torch.float16) for k, v in load_folder(base).items()}
    m16 = [{k: v.to(torch.float16) for k, v in load_folder(p).items()} for p in fts]
    b32, m32 = load_folder(base), [load_folder(p) for p in fts]
    differ = 0
    for name, tensor in half.items():
        assert tensor.dtype == full[name].dtype == torch.float16
        expected = ties_merge(b16[name], [m[name] for m in m16], [1.0, .6, .8], [0.4] * 3, dtype=torch.float16)
        assert torch.equal(tensor, expected), name
        in_float32 = ties_merge(b32[name], [m[name] for m in m32], [1.0, .6, .8], [0.4] * 3).to(torch.float16)
        assert torch.equal(full[name], in_float32), name
        differ += int((tensor != full[name]).sum())
    assert differ > 0  # the two arithmetics differ on these models: the test can tell them apart


# -- per-model parameters the method does not use ------------------------------------------------------------
def test_unused_per_model_parameters_are_warnings_not_problems() -> None:
    slerp, stock = get_method("slerp"), get_method("model_stock")
    settings = {"a": {"weight": 0.5}, "b": {"weight": 0.5, "density": 0.3}}
    assert check_parameter_names(slerp, {"t": 0.5}, settings) == []
    warnings = unused_parameters(stock, settings)
    assert len(warnings) == 3 and all("is ignored" in w for w in warnings)
    assert "models[b].parameters: 'density' is not used by 'model_stock'" in warnings[2]
    # a typo or a global parameter given per model is still refused: that setting would be lost
    assert "not a per-model parameter" in check_parameter_names(slerp, {}, {"a": {"wieght": 1}})[0]
    assert "not a per-model parameter" in check_parameter_names(get_method("ties"), {}, {"a": {"lambda": 1}})[0]
    assert unused_parameters(get_method("ties"), {"a": {"weight": 1.0, "density": 0.5}}) == []


@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_weight_on_slerp_and_model_stock_is_ignored_with_a_warning(
        families: Families, tmp_path: Path, method: str, caplog: pytest.LogCaptureFixture) -> None:
    """mergekit's own tests give every model a ``weight`` whatever the method; it is ignored there too."""
    base, fts = families["gpt2"]
    chosen = fts[:1] if method == "slerp" else fts
    params = {"t": 0.3} if method == "slerp" else {}
    plain = {"merge_method": method, "base_model": str(base), "parameters": params,
             "models": [{"model": str(base)}, *({"model": str(p)} for p in chosen)]}
    weighted = {**plain, "models": [{"model": m["model"], "parameters": {"weight": 0.5}} for m in plain["models"]]}
    with caplog.at_level(logging.WARNING, logger="mergelab"):
        result = mergelab.merge(weighted, tmp_path / "weighted", progress=False, hash_inputs=False)
    mergelab.merge(plain, tmp_path / "plain", progress=False, hash_inputs=False)
    x, y = load_output(tmp_path / "weighted"), load_output(tmp_path / "plain")
    assert all(torch.equal(x[n], y[n]) for n in x)
    assert any(f"'weight' is not used by '{method}'" in r.getMessage() for r in caplog.records)
    record = json.loads((tmp_path / "weighted" / "mergelab.json").read_text())
    assert record["warnings"] == result.record["warnings"] and len(record["warnings"]) == len(chosen)


# -- layer-stacking slices ---------------------------------------------------------------------------------
def test_frankenmerge_loads_with_the_stacked_layers(families: Families, tmp_path: Path) -> None:
    """Layers 0-1 of one fine-tune then layers 1-2 of another: a 4-layer Llama that transformers loads, each
    layer the source layer it was taken from, embeddings from the first slice and the head from the last."""
    import transformers

    _, fts = families["llama"]
    config = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(fts[0]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(fts[1]), "layer_range": [1, 3]}]}]}
    out = tmp_path / "out"
    assert_ok(run_cli(write_config(tmp_path, config), out))
    merged, a, b = load_output(out), load_folder(fts[0]), load_folder(fts[1])
    for out_layer, (src, layer) in enumerate([(a, 0), (a, 1), (b, 1), (b, 2)]):
        for name in (n for n in src if n.startswith(f"model.layers.{layer}.")):
            assert torch.equal(merged[name.replace(f".{layer}.", f".{out_layer}.", 1)], src[name]), name
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], b["lm_head.weight"])
    assert torch.equal(merged["model.norm.weight"], b["model.norm.weight"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 4
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


def test_slice_without_the_base_is_a_clear_error(families: Families, tmp_path: Path) -> None:
    from cli_helpers import assert_refused

    base, fts = families["llama"]
    config = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.5}, "slices": [
        {"sources": [{"model": str(fts[0]), "layer_range": [0, 2]}, {"model": str(fts[1]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(fts[0]), "layer_range": [2, 3]}, {"model": str(fts[1]), "layer_range": [2, 3]}]}]}
    out = tmp_path / "out"
    assert_refused(run_cli(write_config(tmp_path, config), out), out,
                   f"slices[0]: base_model '{base}' is not among this slice's sources", "layer_range")


# -- multi-stage merges (mergekit-multi) --------------------------------------------------------------------
def _two_stages(base: Path, fts: list[Path]) -> list[dict[str, object]]:
    return [
        {"name": "soup", "merge_method": "linear", "dtype": "float32",
         "models": [{"model": str(fts[0]), "parameters": {"weight": 0.3}}, {"model": str(fts[1])}]},
        {"merge_method": "ties", "base_model": str(base), "dtype": "float16",
         "models": [{"model": "soup", "parameters": {"density": 0.5}},
                    {"model": str(fts[2]), "parameters": {"density": 0.7, "weight": 0.6}}]},
    ]


def test_multi_stage_merge_feeds_a_named_stage_into_the_next(families: Families, tmp_path: Path) -> None:
    """The final (unnamed) stage reads the 'soup' stage's output: same bytes as running the two by hand."""
    import yaml

    base, fts = families["llama"]
    first, second = _two_stages(base, fts)
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump_all([second, first], sort_keys=False))  # order in the file does not matter
    assert_ok(run_cli(path, tmp_path / "out"))
    mergelab.merge({k: v for k, v in first.items() if k != "name"}, tmp_path / "soup", progress=False)
    by_hand = {**second, "models": [{"model": str(tmp_path / "soup"), "parameters": {"density": 0.5}},
                                    second["models"][1]]}  # type: ignore[index]
    mergelab.merge(by_hand, tmp_path / "by_hand", progress=False)
    x, y = load_output(tmp_path / "out"), load_output(tmp_path / "by_hand")
    assert set(x) == set(y) and all(torch.equal(x[n], y[n]) for n in x)
    assert all(t.dtype == torch.float16 for t in x.values())
    assert [p.name for p in tmp_path.iterdir() if ".stages" in p.name] == []  # temporary intermediates removed
    kept = tmp_path / "kept"
    mergelab.merge(path, tmp_path / "out2", progress=False, intermediate_dir=kept)
    assert (kept / "soup" / "model.safetensors").is_file()
    # the CLI flag keeps them too; the final mergelab.json records the whole multi-document YAML
    assert_ok(run_cli(path, tmp_path / "out3", "--intermediate-dir", str(tmp_path / "kept-cli")))
    assert (tmp_path / "kept-cli" / "soup" / "model.safetensors").is_file()
    stages = json.loads((tmp_path / "out3" / "mergelab.json").read_text())["stages"]
    assert stages["yaml"] == path.read_text() and stages["order"] == ["soup", None]
    assert stages["intermediate_dir"] == str(tmp_path / "kept-cli")
    assert json.loads((tmp_path / "out" / "mergelab.json").read_text())["stages"]["intermediate_dir"] is None
    assert "stages" not in json.loads((tmp_path / "kept-cli" / "soup" / "mergelab.json").read_text())
    # an existing stage output is never replaced without --overwrite
    from cli_helpers import assert_refused

    assert_refused(run_cli(path, tmp_path / "out4", "--intermediate-dir", str(tmp_path / "kept-cli")),
                   tmp_path / "out4", "soup", "exists", "--overwrite")


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda a, b: (a, {**b, "name": "soup"}), "used twice"),
    (lambda a, b: ({**a, "models": [{"model": "final"}, *a["models"][1:]]}, {**b, "name": "final"}), "cycle"),
    (lambda a, b: ({k: v for k, v in a.items() if k != "name"}, b), "more than one document has no 'name'"),
])
def test_multi_stage_mistakes_are_clear_errors(families: Families, tmp_path: Path, edit, fragment: str) -> None:  # type: ignore[no-untyped-def]
    import yaml

    from cli_helpers import assert_refused

    base, fts = families["llama"]
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump_all(list(edit(*_two_stages(base, fts))), sort_keys=False))
    assert_refused(run_cli(path, tmp_path / "out"), tmp_path / "out", fragment)


# -- tokenizers ---------------------------------------------------------------------------------------------
def _with_vocab(src: Path, dst: Path, tokens: list[str]) -> Path:
    import shutil

    from tiny_models import tiny_tokenizer

    shutil.copytree(src, dst)
    return tiny_tokenizer(dst, tokens[1:])  # '[UNK]' is id 0, then tokens[1:]


def test_same_size_different_vocabulary_is_refused(families: Families, tmp_path: Path) -> None:
    """Two models with 64-row embeddings whose tokenizers swap two ids: rows 3 and 4 are different tokens in
    each, so an index-wise merge would mix them; refused, naming the token, and pointing to tokenizer_source.
    Same vocabulary: merged. With a tokenizer_source the rows are aligned by token instead."""
    from cli_helpers import assert_refused

    _, fts = families["gpt2"]
    tokens = ["[UNK]", *(f"tok{i}" for i in range(1, 64))]
    swapped = [*tokens[:3], tokens[4], tokens[3], *tokens[5:]]
    a = _with_vocab(fts[0], tmp_path / "a", tokens)
    b = _with_vocab(fts[1], tmp_path / "b", swapped)
    same = _with_vocab(fts[2], tmp_path / "same", tokens)
    config = {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]}
    out = tmp_path / "out"
    assert_refused(run_cli(write_config(tmp_path, config), out), out, "numbers tokens differently",
                   "token 'tok3' is id 3", "but 4 in", "tokenizer_source: union")
    config = {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(same)}]}
    assert_ok(run_cli(write_config(tmp_path, config), out))
    # a tokenizer_source that numbers tokens differently: the rows of a and same are moved to its order
    config = {**config, "tokenizer_source": str(b)}
    assert_ok(run_cli(write_config(tmp_path, config), tmp_path / "out2"))
    by_index, by_token = (load_output(o)["transformer.wte.weight"] for o in (out, tmp_path / "out2"))
    assert torch.equal(by_token[3], by_index[4]) and torch.equal(by_token[4], by_index[3])
    assert torch.equal(by_token[5:], by_index[5:]) and not torch.equal(by_token[3], by_token[4])
