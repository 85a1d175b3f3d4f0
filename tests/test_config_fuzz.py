"""Fuzzed merge configs: whatever the YAML holds, mergelab answers with one of its own errors, never a traceback.

Configs are made by mutating a valid one (a key set to a plausible or implausible value, a key removed, a
typo'd key added, at the top level, in a model entry or in a parameter block) and from scratch. For
``load_config`` the error must be a :class:`~mergelab.errors.MergeLabError` whose message names one of
the keys that were changed; through the CLI the run must either merge or print one clean error.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cli_helpers import leftovers, run_cli, write_config
from mergelab.errors import ConfigError
from mergelab.merge.config import load_config

Families = dict[str, tuple[Path, list[Path]]]

TOP_KEYS = ["merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "seed", "name"]
TYPOS = ["modles", "merge_metod", "paramters", "base", "model", "weight", "density", "", "Models", "dtype "]
PARAM_KEYS = ["weight", "density", "lambda", "normalize", "consensus", "scope", "int8_mask", "t", "gamma",
              "rank_ratio", "filter_wise", "densty", "value", "filter"]
WORDS = ["linear", "ties", "dare_ties", "slerp", "tie", "bf16", "float16", "float8", "global", "tensor", "union",
         "base", "sum", "count", "mlp", "self_attn", "*", "0.5", "1e-3", "nan", "abc", "~/nowhere", "/dev/null",
         "layers.0", "None", "true"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.sampled_from(WORDS),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(TOP_KEYS + TYPOS + PARAM_KEYS), st.text(max_size=6))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(keys, inner, max_size=3),
        st.builds(lambda f, v: {"filter": f, "value": v}, st.one_of(st.sampled_from(WORDS), scalars), inner),
    ),
    max_leaves=8,
)
# Values a user might well write: numbers in range, gradients, conditionals on real tensor-name parts.
plausible = st.one_of(
    st.floats(0, 1), st.integers(0, 3), st.booleans(), st.sampled_from(WORDS),
    st.lists(st.floats(0, 1), min_size=1, max_size=3),
    st.lists(st.builds(lambda f, v: {"filter": f, "value": v}, st.sampled_from(["mlp", "self_attn", "*", "norm"]),
                       st.floats(0, 1)), min_size=1, max_size=2).map(lambda c: [*c, {"value": 0.5}]),
)


def _valid(base: Path, fts: list[Path]) -> dict[str, Any]:
    return {"merge_method": "ties", "base_model": str(base), "seed": 1, "parameters": {"lambda": 1.0},
            "models": [{"model": str(p), "parameters": {"density": 0.5, "weight": 0.8}} for p in fts]}


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """A few mutations of ``valid``; returns the config and the names of the keys that were touched."""
    config = copy.deepcopy(valid)
    touched: set[str] = set()
    for _ in range(draw(st.integers(1, 2))):
        where = draw(st.sampled_from(["top", "drop", "model", "model-params", "model-params", "params", "params"]))
        key = draw(st.one_of(st.sampled_from(TOP_KEYS + TYPOS), keys) if where in ("top", "drop", "model")
                   else st.one_of(st.sampled_from(PARAM_KEYS), keys))
        value = draw(st.one_of(plausible, values))
        if where == "top":
            config[key] = value
        elif where == "drop":
            key = draw(st.sampled_from(TOP_KEYS))
            config.pop(key, None)
        else:
            models = config.get("models")
            if where == "params" or not isinstance(models, list) or not models or not isinstance(models[0], dict):
                block = config.get("parameters")
                if not isinstance(block, dict):
                    config["parameters"] = block = {}
                block[key] = value
                touched.add("parameters")
            else:
                entry = models[draw(st.integers(0, len(models) - 1))]
                if where == "model":
                    entry[key] = value
                else:
                    if not isinstance(entry.get("parameters"), dict):
                        entry["parameters"] = {}
                    entry["parameters"][key] = value
                    touched.add("parameters")
                touched.add("models")
        touched.add(key)
    return config, touched


def _names_a_key(message: str, keys: set[str]) -> bool:
    """Whether ``message`` names one of ``keys`` as a word of its own.

    An empty key, or one with control characters (which the terminal output drops), counts as named.
    """
    for key in keys:
        if not key.strip() or not key.isprintable():
            return True
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", message):
            return True
    return False


# 50 examples each in CI; MERGELAB_FUZZ_EXAMPLES=2000 for a longer hunt.
FUZZ = settings(max_examples=int(os.environ.get("MERGELAB_FUZZ_EXAMPLES", "50")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def valid_config(families: Families) -> dict[str, Any]:
    base, fts = families["llama"]
    return _valid(base, fts)


def test_valid_config_is_valid(valid_config: dict[str, Any]) -> None:
    load_config(valid_config)


@FUZZ
@given(data=st.data())
def test_load_config_mutations(valid_config: dict[str, Any], data: st.DataObject) -> None:
    config, touched = data.draw(mutated(valid_config))
    try:
        load_config(config)
    except ConfigError as exc:
        message = str(exc)
        assert "Traceback" not in message
        assert _names_a_key(message, touched), f"{message!r} names none of {sorted(touched)}"
    # any other exception propagates and fails the test: load_config raises only ConfigError


@FUZZ
@given(config=st.dictionaries(keys, values, max_size=6))
def test_load_config_random_dicts(config: dict[str, Any]) -> None:
    try:
        load_config(config)
    except ConfigError as exc:
        assert _names_a_key(str(exc), {*map(str, config), "merge_method"}), str(exc)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=64).map(lambda b: b.decode("latin-1"))))
def test_load_config_random_yaml_text(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.yml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc)


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_cli_mutations(valid_config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
                       data: st.DataObject) -> None:
    """Through ``mergelab merge``: a merge, or a clean ``error:`` message; never a traceback or a raw exception."""
    config, touched = data.draw(mutated(valid_config))
    work = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    try:
        out = work / "out"
        result = run_cli(write_config(work, config), out)
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        text = result.output.strip()
        assert "Traceback" not in text
        event("merged" if result.exit_code == 0 else
              "config error" if "invalid merge config" in text else "refused after reading the config")
        if result.exit_code == 0:
            assert (out / "mergelab.json").is_file()
        else:
            assert text.startswith("error:"), text
            assert not out.exists() and leftovers(out) == []
            if "invalid merge config" in text:
                assert _names_a_key(text, touched), f"{text!r} names none of {sorted(touched)}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
