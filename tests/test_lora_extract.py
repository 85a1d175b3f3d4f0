"""``mergelab extract-lora``: a PEFT adapter peft loads, whose error is exactly the SVD tail of each delta."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from cli_helpers import assert_ok, load_output
from mergelab.cli import app
from mergelab.io.models import open_model

Families = dict[str, tuple[Path, list[Path]]]
CLASSES = {"bert": transformers.AutoModel, "gpt2": transformers.AutoModelForCausalLM}


def _extract(base: Path, tuned: Path, out: Path, rank: int) -> None:
    assert_ok(CliRunner().invoke(app, ["extract-lora", str(base), str(tuned), "-o", str(out), "--rank", str(rank),
                                       "-q"]))


def _peft_folded(arch: str, base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(CLASSES[arch].from_pretrained(base), adapter).merge_and_unload()
    state = {k.removeprefix("transformer."): v.detach() for k, v in model.state_dict().items()}
    return state


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_extracted_lora_loads_in_peft_with_the_svd_tail_as_its_error(families: Families, tmp_path: Path,
                                                                      arch: str) -> None:
    pytest.importorskip("peft")
    base, fts = families[arch]
    rank = 3
    out = tmp_path / "lora"
    _extract(base, fts[0], out, rank)
    b, t = load_output(base), load_output(fts[0])
    b = {k.removeprefix("transformer."): v for k, v in b.items()}
    t = {k.removeprefix("transformer."): v for k, v in t.items()}
    folded = _peft_folded(arch, base, out)
    record = json.loads((out / "mergelab.json").read_text())
    matrices = [n for n in b if b[n].ndim == 2]
    assert len(record["tensors"]) == len(matrices)
    for name in matrices:
        delta = t[name] - b[name]
        tail = float(torch.linalg.svdvals(delta)[rank:].square().sum().sqrt())
        error = float((t[name] - folded[name]).norm())
        assert error == pytest.approx(tail, rel=1e-3, abs=1e-5), name
        assert error < float(delta.norm()), name  # it captured something
    # biases and norms cannot be a LoRA: listed, and left as the base's
    assert {n.removeprefix("transformer.") for n in record["not_captured_delta_norms"]} == {
        n for n in b if b[n].ndim == 1 and not torch.equal(t[n], b[n])}
    for name in (n for n in b if b[n].ndim == 1):
        assert torch.equal(folded[name], b[name]), name

    # mergelab folds its own adapter (found through base_model_name_or_path) exactly as peft does
    with open_model(str(out)) as reader:
        for name in reader.names:
            key = name.removeprefix("transformer.")
            if key in folded:
                torch.testing.assert_close(reader.get(name), folded[key], rtol=1e-5, atol=1e-6, msg=name)


def test_full_rank_reproduces_the_delta(families: Families, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    base, fts = families["bert"]
    out = tmp_path / "lora"
    _extract(base, fts[1], out, rank=64)  # ≥ every matrix's smaller side (32): clamped per matrix
    b, t = load_output(base), load_output(fts[1])
    folded = _peft_folded("bert", base, out)
    for name in (n for n in b if b[n].ndim == 2):
        torch.testing.assert_close(folded[name], t[name], rtol=0, atol=2e-6, msg=name)


def test_extract_refuses_existing_output_and_bad_rank(families: Families, tmp_path: Path) -> None:
    base, fts = families["bert"]
    out = tmp_path / "lora"
    out.mkdir()
    result = CliRunner().invoke(app, ["extract-lora", str(base), str(fts[0]), "-o", str(out)])
    assert result.exit_code != 0 and "--overwrite" in result.output
    before = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    result = CliRunner().invoke(app, ["extract-lora", str(base), str(fts[0]), "-o", str(base), "--overwrite"])
    assert result.exit_code != 0 and "not the output of a merge" in result.output  # the base is never replaced
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()} == before
    result = CliRunner().invoke(app, ["extract-lora", str(base), str(fts[0]), "-o", str(tmp_path / "x"),
                                      "--rank", "0"])
    assert result.exit_code != 0 and "at least 1" in result.output
    result = CliRunner().invoke(app, ["extract-lora", str(base), str(base), "-o", str(tmp_path / "y")])
    assert result.exit_code != 0 and "nothing to extract" in result.output
