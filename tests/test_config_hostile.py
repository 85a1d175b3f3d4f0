"""Config files that are misread or that attack the parser: each is an error naming the key, found quickly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cli_helpers import assert_refused, run_cli
from mergelab.errors import ConfigError
from mergelab.merge.config import load_config

GOOD = "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n"


def _load(tmp_path: Path, text: str) -> None:
    path = tmp_path / "merge.yml"
    path.write_text(text)
    load_config(path)


@pytest.mark.parametrize(("text", "fragment"), [
    ("merge_method: linear\nmerge_method: ties\nmodels: [{model: a}]\n", "key 'merge_method' appears twice"),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1, weight: 2}\n",
     "key 'weight' appears twice"),
    ("merge_method: linear\nmodels:\n  - model: a\n    model: b\n", "key 'model' appears twice"),
])
def test_duplicate_yaml_keys_are_errors_naming_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        _load(tmp_path, text)


def test_merge_keys_may_override_what_they_merge(tmp_path: Path) -> None:
    text = "defaults: &d {weight: 1.0}\n" + GOOD.replace("  - model: a\n", "  - model: a\n    parameters:\n"
                                                          "      <<: *d\n      weight: 2.0\n")
    with pytest.raises(ConfigError, match="unknown key 'defaults'"):  # parsed: only the schema objects
        _load(tmp_path, text)


def test_empty_list_for_a_setting_is_an_error_not_the_default(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models\.0\.parameters.*empty list"):
        _load(tmp_path, GOOD.replace("  - model: a\n", "  - model: a\n    parameters: {weight: []}\n"))


def test_a_model_listed_twice_is_an_error(tmp_path: Path) -> None:
    # a typo in the first entry's parameters was ignored: per-model checks only saw the last entry
    text = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {wieght: 2}\n  - model: a\n  - model: b\n"
    with pytest.raises(ConfigError, match="'a' is listed more than once"):
        _load(tmp_path, text)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))


@pytest.mark.parametrize(("text", "fragment"), [
    (BOMB, "expands to more than"),
    ("merge_method: " + "[" * 50_000 + "]" * 50_000, "nested too deeply"),
    ("merge_method: " + "{a: " * 50_000 + "1" + "}" * 50_000, "nested too deeply"),
    ("x:\n" + "".join(" " * i + "- \n" for i in range(1, 3000)), "nested too deeply"),
])
def test_alias_bombs_and_deep_nesting_are_refused_quickly(tmp_path: Path, text: str, fragment: str) -> None:
    start = time.process_time()
    with pytest.raises(ConfigError, match=fragment):
        _load(tmp_path, text)
    # CPU time, not wall time: other processes share these cores. Unbounded, these take minutes or
    # end in a RecursionError; bounded they stop after the first few thousand characters.
    assert time.process_time() - start < 5


def test_cli_refuses_a_bomb_with_exit_code_2(tmp_path: Path) -> None:
    config = tmp_path / "bomb.yml"
    config.write_text(BOMB)
    out = tmp_path / "out"
    result = run_cli(config, out)
    assert_refused(result, out, "bomb.yml", "expands to more than")
    assert result.exit_code == 2
