"""CMA-ES merge search: improves a toy objective, saves a YAML that `mergelab merge` reproduces exactly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("cma")

import mergelab
from mergelab.errors import ConfigError
from mergelab.search import load_search_config, run_search
from mergelab.search.evaluate import load_state_dict, resolve_callable
from mergelab.search.space import block_of, build_space, discover_groups
from search_toy import make_problem, score


def _tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_search_improves_the_toy_objective_and_its_yaml_reproduces_the_best_merge(tmp_path: Path) -> None:
    config = make_problem(tmp_path / "problem")
    best_yaml = run_search(config, tmp_path / "out", generations=4, population=6, seed=0, executor="local:0",
                           show_progress=False)
    record = json.loads((tmp_path / "out" / "search.json").read_text())
    assert record["best"]["score"] > record["initial"]["score"]
    assert record["best"]["score"] > 0.5 * record["initial"]["score"]  # scores are negative distances
    assert record["reproduced_bitwise"] is True
    assert record["cma_seed"] == 1 and record["evaluations"] == 1 + 4 * 6
    assert len(record["dimensions"]) == 2 * 3  # 2 task vectors × 3 blocks (layers.0, layers.1, head)
    # a user reproduces the merge from the saved file alone, from another working directory
    repro = mergelab.merge(best_yaml, tmp_path / "repro", progress=False)
    merged = load_state_dict(repro.out_dir)
    assert _tensors_equal(merged, load_state_dict(tmp_path / "out" / "best_model"))
    target = str(tmp_path / "problem" / "target.safetensors")
    assert score(merged, target)["score"] == record["best"]["score"]
    # the saved config is an ordinary merge config with per-block conditional weights
    saved = yaml.safe_load(best_yaml.read_text())
    weights = saved["models"][0]["parameters"]["weight"]
    assert [w["filter"] for w in weights] == ["layers.0.", "layers.1.", "head."]
    rows = list(csv.DictReader((tmp_path / "out" / "history.csv").open()))
    assert len(rows) == 25 and {r["generation"] for r in rows} == {str(g) for g in range(5)}
    assert (tmp_path / "out" / "scores.png").stat().st_size > 10_000


def test_search_is_reproducible_for_a_seed(tmp_path: Path) -> None:
    config = make_problem(tmp_path / "problem")
    a = run_search(config, tmp_path / "a", generations=2, population=4, seed=3, executor="local:0",
                   show_progress=False)
    b = run_search(config, tmp_path / "b", generations=2, population=4, seed=3, executor="local:0",
                   show_progress=False)
    assert a.read_text() == b.read_text()


def test_block_groups_are_picked_by_the_engines_first_substring_match() -> None:
    assert block_of("model.layers.12.mlp.up.weight") == "model.layers.12."
    assert block_of("head.weight") == "head."
    assert block_of("cls") == "cls"
    names = ["model.embed.weight", "model.layers.1.w", "model.layers.11.w", "model.norm.weight", "lm_head.weight"]
    groups = discover_groups(names)
    # "model." would swallow the numbered layers if it came first
    order = [g.filter for g in groups]
    assert order.index("model.layers.1.") < order.index("model.")
    assert order.index("model.layers.11.") < order.index("model.")


def test_whole_model_group_gives_scalar_settings(tmp_path: Path) -> None:
    config_path = make_problem(tmp_path / "problem")
    data = yaml.safe_load(config_path.read_text())
    data["search"]["groups"] = "model"
    data["search"]["parameters"].append({"name": "lambda", "low": 0.5, "high": 2.0, "init": 1.0})
    cfg, merge, _ = load_search_config({**data, "merge": {**data["merge"], "base_model": str(
        tmp_path / "problem" / "base.safetensors"), "models": [
        {"model": str(tmp_path / "problem" / m), "parameters": {"weight": 0.25}} for m in ("a.safetensors",
                                                                                             "b.safetensors")]}})
    space, x0 = build_space(cfg, merge)
    assert [d.label for d in space.dims] == ["weight[m0]", "weight[m1]", "lambda"]
    assert space.to_values(x0) == pytest.approx([0.25, 0.25, 1.0])
    merged = space.merge_config(x0)
    assert merged["models"][1]["parameters"]["weight"] == pytest.approx(0.25)
    assert merged["parameters"]["lambda"] == pytest.approx(1.0)


@pytest.mark.parametrize(("change", "message"), [
    ({"search": {"parameters": [{"name": "density", "low": 0, "high": 1}]}}, "not a parameter of"),
    ({"search": {"parameters": [{"name": "normalize", "low": 0, "high": 1}]}}, "only numbers"),
    ({"search": {"parameters": [{"name": "weight", "low": 1, "high": 0}]}}, "low < high"),
    ({"search": {"parameters": [{"name": "weight", "low": 0, "high": 1}], "colour": 1}},
     "unknown key 'search.colour'. Allowed keys here: groups, parameters, population"),
])
def test_bad_search_configs_name_the_problem(tmp_path: Path, change: dict, message: str) -> None:
    config_path = make_problem(tmp_path / "problem")
    data = yaml.safe_load(config_path.read_text())
    data.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises((ConfigError, ValueError), match=message):
        run_search(path, tmp_path / "out", executor="local:0", show_progress=False)


def test_evaluator_paths() -> None:
    assert resolve_callable("search_toy:score") is score
    assert resolve_callable("search_toy.score") is score
    with pytest.raises(ValueError, match="cannot import"):
        resolve_callable("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="no callable"):
        resolve_callable("search_toy:nothing_here")


def test_evaluator_from_a_file_next_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "my_eval.py").write_text("def f(state_dict, **kw):\n    return 1.5\n")
    fn = resolve_callable("my_eval.py:f", str(tmp_path))
    assert fn({}) == 1.5


def test_cli_search_writes_the_best_config_and_refuses_an_existing_out(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mergelab.cli import app

    config = make_problem(tmp_path / "problem")
    out = tmp_path / "out"
    args = ["search", str(config), "-o", str(out), "--generations", "1", "--population", "3", "--executor",
            "local:0"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert (out / "best_config.yaml").is_file() and "best config" in first.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
