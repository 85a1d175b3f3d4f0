"""Methods that propagate NaN/Inf let the engine scan only their merged result, and it still names the bad input.

``MergeMethod.propagates_nonfinite`` promises that a NaN or ±Inf in any input entry makes the merged entry
non-finite, whatever the weights (0 included), λ, dtype or normalisation. The engine then skips the input
scans (0.13–0.16 CPU s per GB of linear's ~1.4, benchmarks/linear_stages.py) until a merged piece is not
finite, and scans that piece's inputs to name the culprit: the user sees the same message as before.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from cli_helpers import assert_ok, assert_refused, load_folder, run_cli, save_model_folder, write_config
from mergelab.merge import engine
from mergelab.merge.core import merge_tensor
from mergelab.merge.params import resolve_parameters
from mergelab.methods import all_methods

Families = dict[str, tuple[Path, list[Path]]]
PROPAGATING = [m for m in all_methods() if m.propagates_nonfinite]
NAME = "model.layers.0.mlp.up_proj.weight"


def test_the_methods_that_promise_propagation_are_linear_and_task_arithmetic() -> None:
    # a method flagged by mistake would let a bad input through unnamed: keep the list explicit
    assert sorted(m.name for m in PROPAGATING) == ["linear", "task_arithmetic"]


_WEIGHTS = ([0.5, 0.3, 0.2], [0.0, 1.0, 1.0], [1.0, -0.5, 0.0], [2.0, 2.0, -3.5])
_GLOBALS = ({}, {"normalize": True}, {"normalize": False}, {"lambda": 0.0}, {"lambda": -2.0})


@pytest.mark.parametrize("method", [m.name for m in PROPAGATING])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("compute_dtype", [None, torch.float32, torch.bfloat16])
def test_a_nonfinite_input_entry_makes_its_merged_entry_nonfinite(
        method: str, dtype: torch.dtype, compute_dtype: torch.dtype | None) -> None:
    m = next(x for x in PROPAGATING if x.name == method)
    g = torch.Generator().manual_seed(7)
    clean_base = torch.randn(6, 5, generator=g).to(dtype)
    clean = [clean_base + 0.1 * torch.randn(6, 5, generator=g).to(dtype) for _ in range(3)]
    # the base takes part only where the method uses it (linear ignores it)
    holders = range(-1 if m.base != "ignored" else 0, 3)
    for weights, settings, holder, value in itertools.product(_WEIGHTS, _GLOBALS, holders,
                                                              (float("nan"), float("inf"), -float("inf"))):
        if settings.get("normalize", method == "linear") and abs(sum(weights)) < 1e-6:
            continue  # refused by the method: weights summing to zero cannot be normalised
        settings = {k: v for k, v in settings.items() if k in m.global_params}
        base, tensors = clean_base.clone(), [t.clone() for t in clean]
        (base if holder == -1 else tensors[holder])[2, 3] = value
        params = resolve_parameters(m, NAME, 0.0, settings, [{"weight": w} for w in weights])
        merged = merge_tensor(m, NAME, tensors, base=base, params=params, seed=0, compute_dtype=compute_dtype)
        where = (weights, settings, holder, value)
        assert not torch.isfinite(merged[2, 3]), where
        assert int((~torch.isfinite(merged)).sum()) == 1, where  # element-wise: only that entry


def test_opposite_infinities_at_one_entry_stay_nonfinite() -> None:
    m = next(x for x in PROPAGATING if x.name == "linear")
    a, b = torch.zeros(4), torch.zeros(4)
    a[1], b[1] = float("inf"), -float("inf")
    params = resolve_parameters(m, NAME, 0.0, {}, [{"weight": 1.0}, {"weight": 1.0}])
    assert torch.isnan(merge_tensor(m, NAME, [a, b], base=None, params=params, seed=0)[1])


def _linear(models: list[Path], weights: list[float], **extra: Any) -> dict[str, Any]:
    return {"merge_method": "linear", **extra,
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(models, weights, strict=True)]}


def _scan_log(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of entries of every tensor the engine scans for NaN/Inf, in order."""
    seen: list[int] = []
    real = engine.count_nonfinite

    def spy(t: torch.Tensor) -> int:
        seen.append(t.numel())
        return real(t)

    monkeypatch.setattr(engine, "count_nonfinite", spy)
    return seen


def test_a_clean_linear_merge_scans_only_its_results(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, fts = families["llama"]
    seen = _scan_log(monkeypatch)
    out = tmp_path / "out"
    assert_ok(run_cli(write_config(tmp_path, _linear(fts, [0.2, 0.3, 0.5])), out))
    sizes = [t.numel() for t in load_folder(out).values() if t.is_floating_point()]
    assert sorted(seen) == sorted(sizes)  # one scan per merged tensor, none of the 3 × inputs


def test_ties_still_scans_every_input(families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # TIES trims entries away, so a NaN in a trimmed entry would not show in its result
    base, fts = families["llama"]
    seen = _scan_log(monkeypatch)
    config = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5},
              "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in fts]}
    assert_ok(run_cli(write_config(tmp_path, config), tmp_path / "out"))
    outputs = [t.numel() for t in load_folder(tmp_path / "out").values() if t.is_floating_point()]
    assert len(seen) == 5 * len(outputs)  # base, 3 models and the result of every tensor


@pytest.mark.parametrize("piece_entries", [16, 1 << 22], ids=["in-pieces", "whole"])
def test_bad_inputs_are_named_with_their_counts_even_at_weight_zero(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece_entries: int) -> None:
    # the first bad tensor is found in a merged piece; the pieces already read ahead, and every later one,
    # are then scanned as before, so the second model's bad tensor further on is named too
    _, fts = families["llama"]
    first, second = load_folder(fts[0]), load_folder(fts[1])
    early, late = "model.embed_tokens.weight", "model.norm.weight"
    first[early][0, 0] = float("nan")
    first[early][-1, -1] = -float("inf")
    second[late][3] = float("inf")
    a = save_model_folder(tmp_path / "a", first, fts[0])
    b = save_model_folder(tmp_path / "b", second, fts[1])
    monkeypatch.setattr(engine, "_PIECE_ENTRIES", piece_entries)
    out = tmp_path / "out"
    text = assert_refused(run_cli(write_config(tmp_path, _linear([a, b, fts[2]], [0.0, 1.0, 1.0])), out), out,
                          f"{a}: tensor '{early}' has 2 NaN/Inf value(s)",
                          f"{b}: tensor '{late}' has 1 NaN/Inf value(s)")
    assert "produced it from finite inputs" not in text
    assert text.count("NaN/Inf value(s)") == 2


def test_finite_inputs_that_overflow_are_blamed_on_the_method(
        families: Families, tmp_path: Path) -> None:
    _, fts = families["llama"]
    states = [load_folder(p) for p in fts[:2]]
    name = "model.norm.weight"
    for s in states:
        s[name][5] = 40000.0  # finite in float16 (max 65504), their sum is not
    models = [save_model_folder(tmp_path / f"m{i}", s, fts[i]) for i, s in enumerate(states)]
    config = _linear(models, [1.0, 1.0], dtype="float16", out_dtype="float16", parameters={"normalize": False})
    out = tmp_path / "out"
    text = assert_refused(run_cli(write_config(tmp_path, config), out), out,
                          f"merged output: tensor '{name}' has 1 NaN/Inf value(s)",
                          "method 'linear' produced it from finite inputs")
    assert str(models[0]) not in text and str(models[1]) not in text
