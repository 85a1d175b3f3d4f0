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


def test_an_unknown_key_anywhere_names_the_keys_allowed_where_it_stands() -> None:
    """One formatter for the merge and the search config: it finds the model that holds the key by walking the
    schema (list items, dict values such as a token's setting, union members such as search.groups)."""
    from pydantic import ValidationError

    from mergelab.merge.config import MergeConfig, config_error
    from mergelab.search.config import SearchConfig

    def message(schema: type[MergeConfig] | type[SearchConfig], data: dict) -> str:
        with pytest.raises(ValidationError) as caught:
            schema.model_validate(data)
        return str(config_error(caught.value, "x.yml", "thing", schema))

    merge = message(MergeConfig, {"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {
        "tokens": {"source": {"source": "a", "forc": True}}}, "slices": [{"sources": [{"model": "a", "x": 1}]}]})
    assert merge.startswith("x.yml: invalid thing:\n")
    # a token named 'source' is a dict key, not the field 'source'
    assert "unknown key 'tokenizer.tokens.source.forc'. Did you mean 'force'? Allowed keys here: source, force" in merge
    assert "unknown key 'slices.0.sources.0.x'. Allowed keys here: model, layer_range, parameters" in merge
    search = message(SearchConfig, {"merge": {}, "evaluator": {"callable": "m:f"}, "search": {
        "groups": [{"name": "g", "filter": "f", "zz": 1}], "parameters": [{"name": "w", "low": 0, "high": 1}]}})
    assert "unknown key 'search.groups.list[GroupSpec].0.zz'. Allowed keys here: name, filter" in search
    assert "'search.groups.literal['blocks','model']': Input should be 'blocks' or 'model'" in search


# -- what `mergelab merge` reads before the config's own checks ------------------------------------------------
# The CLI reads the config three times before load_config: for the inputs' digests (merge/inputs.py), for its
# stages (merge/stages.py), then to merge. Until 2026-12-05 the first two used plain yaml: 3,000 nested '[' ended
# in "unexpected RecursionError ... a bug in mergelab", /dev/zero filled memory until the kernel killed the
# process, and a FIFO blocked it for good.
@pytest.mark.parametrize(("text", "fragment"), [
    ("merge_method: " + "[" * 3_000 + "]" * 3_000, "nested too deeply"),
    ("x:\n" + "".join(" " * i + "- \n" for i in range(1, 3000)), "nested too deeply"),
    (GOOD + "---\n" + GOOD.replace("models:", "merge_method: ties\nmodels:"), "key 'merge_method' appears twice"),
    (GOOD + "---\n" + BOMB, "expands to more than"),
])
def test_the_cli_refuses_what_the_config_loader_refuses_with_exit_code_2(tmp_path: Path, text: str,
                                                                         fragment: str) -> None:
    config = tmp_path / "merge.yml"
    config.write_text(text)
    result = run_cli(config, tmp_path / "out")
    assert_refused(result, tmp_path / "out", fragment)
    assert result.exit_code == 2 and "bug in mergelab" not in result.output


def test_an_oversized_config_is_refused_by_its_size_before_it_is_parsed(tmp_path: Path) -> None:
    from mergelab.safe_yaml import MAX_BYTES

    config = tmp_path / "merge.yml"
    config.write_text(GOOD + "# " + "x" * MAX_BYTES + "\n")
    start = time.process_time()
    result = run_cli(config, tmp_path / "out")
    assert_refused(result, tmp_path / "out", f"{MAX_BYTES + len(GOOD) + 3} bytes, more than a config can need")
    assert time.process_time() - start < 5  # parsed twice first: 7.6 s to refuse 12 MB (`mergelab merge`, 2026-12-05)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_pipe_or_a_device_as_the_config_is_refused_without_reading_it(tmp_path: Path, kind: str) -> None:
    import os
    import threading

    from mergelab.merge.inputs import config_input_files

    if kind == "fifo":
        config = tmp_path / "merge.yml"
        os.mkfifo(config)  # no writer: opening it to read would block for good
    else:
        config = Path("/dev/zero")  # reading it never ends
        if not config.exists():
            pytest.skip("no /dev/zero here")
    found: list[object] = []
    worker = threading.Thread(target=lambda: found.extend([config_input_files(config),
                                                            run_cli(config, tmp_path / "out")]), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "blocked reading the config"
    files, result = found
    assert files == []
    assert_refused(result, tmp_path / "out", str(config), "is not a regular file", "write the config to a file")
    assert result.exit_code == 2


def test_a_key_given_twice_in_a_stage_of_a_multi_stage_config_is_refused(tmp_path: Path) -> None:
    """The stages were parsed with plain yaml and handed on as dicts: the last value won without a word."""
    config = tmp_path / "merge.yml"
    config.write_text("name: soup\n" + GOOD + "---\nmerge_method: ties\n" + GOOD.replace("- model: a", "- model: soup"))
    result = run_cli(config, tmp_path / "out")
    assert_refused(result, tmp_path / "out", "key 'merge_method' appears twice in one mapping (lines 7 and 8)")
    assert result.exit_code == 2
