"""Every config in examples/ runs unchanged on the models `mergelab example-models DIR` writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import mergelab
from cli_helpers import assert_ok
from mergelab.cli import app
from mergelab.merge.config import load_config

EXAMPLES_DIR = Path(mergelab.__file__).parent / "examples"
EXAMPLES = sorted(p for p in EXAMPLES_DIR.glob("*.yml") if p.name != "search.yml")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("examples")
    assert_ok(CliRunner().invoke(app, ["example-models", str(root), "-q"]))
    return root


def test_repository_examples_are_the_packaged_ones() -> None:
    repo_examples = Path(__file__).parent.parent / "examples"
    assert sorted(p.name for p in repo_examples.glob("*.yml")) == sorted(p.name for p in EXAMPLES_DIR.glob("*.yml"))
    assert len(EXAMPLES) >= 8


def test_example_models_load_in_transformers_and_refuse_to_overwrite(layout: Path) -> None:
    transformers = pytest.importorskip("transformers")
    for name in ("base", "ft-a", "ft-b", "ft-c"):
        _, info = transformers.AutoModelForCausalLM.from_pretrained(layout / name, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
    tok = transformers.AutoTokenizer.from_pretrained(layout / "base")
    assert tok.unk_token_id not in tok("the model merges the weights")["input_ids"]
    result = CliRunner().invoke(app, ["example-models", str(layout)])
    assert result.exit_code != 0 and "--overwrite" in result.output


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_runs(example: Path, layout: Path, tmp_path: Path) -> None:
    config = layout / example.name
    config.write_text(example.read_text())
    cfg, _ = load_config(config)
    result = mergelab.merge(config, tmp_path / "out", progress=False, hash_inputs=False)
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(str(layout / "base" / "model.safetensors"))
    assert set(merged) == set(base)
    assert result.record["method"] == cfg.merge_method
    if cfg.out_dtype == "bfloat16":
        assert all(str(t.dtype) == "torch.bfloat16" for t in merged.values())
    card = (tmp_path / "out" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["tags"] == ["merge", "mergelab"]


def test_merge_then_eval_on_the_example_models(layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--eval`: the merged model's perplexity sits with its inputs'; a broken merge is caught (exit 1)."""
    pytest.importorskip("transformers")
    monkeypatch.chdir(layout)
    (layout / "ties.yml").write_text((EXAMPLES_DIR / "ties.yml").read_text())
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", "ties.yml", "-o", str(out), "-q", "--eval"])
    assert_ok(result)
    assert "ok" in result.output and "perplexity" in result.output
    record = json.loads((out / "mergelab.json").read_text())
    assert record["input_paths"]["./ft-a"] == str((layout / "ft-a").absolute())

    # task vectors scaled by λ = 40 (a classic broken merge) fail the check
    broken = dict(yaml.safe_load((EXAMPLES_DIR / "task_arithmetic.yml").read_text()))
    broken["parameters"] = {"lambda": 40.0}
    (layout / "broken.yml").write_text(yaml.safe_dump(broken))
    assert_ok(CliRunner().invoke(app, ["merge", "broken.yml", "-o", str(tmp_path / "broken"), "-q"]))
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "broken")])
    assert result.exit_code == 1, result.output
    assert "looks broken" in result.output


def test_sample_search_yaml_runs(layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    monkeypatch.chdir(layout)
    (layout / "search.yml").write_text((EXAMPLES_DIR / "search.yml").read_text())
    out = tmp_path / "search"
    assert_ok(CliRunner().invoke(app, ["search", "search.yml", "-o", str(out), "--generations", "1",
                                       "--population", "2", "--executor", "local:0"]))
    assert (out / "best_config.yaml").is_file()
