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
