"""Element-wise methods stream large tensors in flat pieces: same bytes out, bounded reads, NaN counts summed.
So do TIES and Breadcrumbs (after their rank rules) and the methods with a scalar pass (SLERP, Model Stock,
DARE, DELLA in pieces of whole rows), after a first pass.

Also the I/O pieces that make it possible (flat-range reads, part-wise writes), the fast non-finite check
and the allocator tuning of the CLI.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cli_helpers import (
    STREAM_PIECE,
    assert_ok,
    assert_refused,
    assert_same_safetensors,
    leftovers,
    load_folder,
    method_config,
    run_cli,
    save_model_folder,
    weighted_config,
    write_config,
)
from mergelab.errors import CompatibilityError
from mergelab.io.readers import TensorMeta, open_checkpoint
from mergelab.io.safetensors_file import SafetensorsFile
from mergelab.io.writer import ShardPlan, StreamingSafetensorsWriter, write_state_dict
from mergelab.merge import engine
from mergelab.merge import params as params_module
from mergelab.merge.core import merge_tensor, tensor_scalars, vouched_scalars
from mergelab.merge.params import resolve_parameters
from mergelab.merge.plan import count_nonfinite
from mergelab.methods import all_methods, get_method, model_stock, row_sums, slerp, task_vectors
from mergelab.methods.registry import FlatSource, VouchedMerge
from mergelab.methods.sparsify import TopK, magnitude_keys
from mergelab.methods.task_vectors import arithmetic_dtype, task_vector

Families = dict[str, tuple[Path, list[Path]]]
ELEMENTWISE = [m for m in all_methods() if m.elementwise]
WITH_SCALAR_PASS = [m for m in all_methods() if m.scalar_pass is not None]


def _merge(tmp_path: Path, config: dict[str, Any], name: str, *args: str) -> Path:
    out = tmp_path / name
    assert_ok(run_cli(write_config(tmp_path, config, f"{name}.yml"), out, *args))
    return out


def test_elementwise_registry_is_linear_task_arithmetic_nearswap_and_passthrough() -> None:
    # a method flagged by mistake would be merged piece by piece with wrong results: keep the list explicit
    assert sorted(m.name for m in ELEMENTWISE) == ["linear", "nearswap", "passthrough", "task_arithmetic"]


@pytest.mark.parametrize("method", [m.name for m in ELEMENTWISE])
def test_elementwise_flag_holds_for_the_function(method: str) -> None:
    """Merging flat slices gives exactly the slices of the whole merge, for odd slice sizes."""
    m = next(x for x in ELEMENTWISE if x.name == method)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(13, 11, generator=g).to(torch.bfloat16)
    n = 3 if m.max_models is None else m.max_models
    tensors = [base + 0.1 * torch.randn(13, 11, generator=g).to(torch.bfloat16) for _ in range(n)]
    settings = [{"weight": w} for w in (0.2, 0.5, 0.9)] if "weight" in m.model_params else [{}] * n
    global_settings = {"t": 0.05} if method == "nearswap" else {}

    name = "model.layers.0.mlp.up_proj.weight"
    params = resolve_parameters(m, name, 0.0, global_settings, settings)

    def run(ts: list[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
        return merge_tensor(m, name, ts, base=b, params=params, seed=0)

    whole = run(tensors, base).reshape(-1)
    flat = [t.reshape(-1) for t in tensors]
    pieces = [run([t[a:a + 5] for t in flat], base.reshape(-1)[a:a + 5]) for a in range(0, base.numel(), 5)]
    assert torch.equal(torch.cat(pieces), whole)


def test_methods_with_a_topk_pass_are_breadcrumbs_and_ties() -> None:
    # their large tensors are merged piece by piece with each model's rank rule: keep the list explicit
    assert [m.name for m in all_methods() if m.topk_pass is not None] == ["breadcrumbs", "breadcrumbs_ties", "ties"]


def test_breadcrumbs_streams_without_rescale_only() -> None:
    # the rescale divides by the L1 norms of each whole task vector before and after its mask: merged whole
    for method in ("breadcrumbs", "breadcrumbs_ties"):
        applies = get_method(method).topk_pass.applies  # type: ignore[union-attr]
        assert applies({"rescale": False}) and not applies({"rescale": True})


def _matrix_for(piece: int) -> tuple[int, int]:
    """The matrix merged whole and in pieces of ``piece`` entries: rows that the pieces cross, several pieces
    of each size. Pieces of one entry cut a smaller one: a merge per entry of 41 x 53 took 5-9 s per case."""
    return (11, 13) if piece == 1 else (41, 53)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(("densities", "gammas"), [((0.05, 0.5, 0.9), (0.01, 0.1, 0.0)),
                                                   ((0.0, 1.0, 0.3), (0.2, 0.2, 1.0)), ((0.3, 0.7), (0.3, 0.01))],
                         ids=["low", "edges", "two"])
@pytest.mark.parametrize("piece", [1, 37, 1000])
def test_breadcrumbs_pieces_with_rank_rules_give_the_whole_merge_bit_for_bit(
        method: str, dtype: torch.dtype, densities: tuple[float, ...], gammas: tuple[float, ...],
        piece: int) -> None:
    # task vectors of a few hundred distinct magnitudes: tied keys straddle the band's edges (the rules hold
    # 25 lists of tied entries over the cases of 41 x 53, 13 over those of 11 x 13, for pieces of one entry)
    m = get_method(method)
    assert m.topk_pass is not None
    g = torch.Generator().manual_seed(len(densities))
    shape = _matrix_for(piece)
    base = torch.randn(shape, generator=g).to(dtype)
    tensors = [(base + (0.002 * torch.randn(shape, generator=g)).bfloat16()).to(dtype) for _ in densities]
    name = "model.layers.0.mlp.up_proj.weight"
    settings = [{"weight": 0.3 + 0.4 * i, "density": d, "gamma": y}
                for i, (d, y) in enumerate(zip(densities, gammas, strict=True))]
    params = resolve_parameters(m, name, 0.0, {}, settings)
    rules = []
    for t, model_params in zip(tensors, params.model_params, strict=True):  # as engine._topk_rules finds them
        delta = task_vector(t, base, arithmetic_dtype(base)).reshape(-1)
        keys = magnitude_keys(delta)
        # the engine's positions scratch is reused: dirty here
        scratch = np.full(base.numel() * 8, 0xAB, np.uint8)
        rule = m.topk_pass.of_keys(keys.clone(), model_params, scratch) if keys is not None else None
        rules.append(rule if rule is not None else TopK(None, kept=m.topk_pass.of_delta(delta, model_params)))
    whole = merge_tensor(m, name, tensors, base=base, params=params, seed=0).reshape(-1)
    flat = [t.reshape(-1) for t in tensors]
    pieces = [merge_tensor(m, name, [t[a:a + piece] for t in flat], base=base.reshape(-1)[a:a + piece],
                           params=params, seed=0, topk=rules, offset=a) for a in range(0, base.numel(), piece)]
    assert torch.cat(pieces).view(torch.uint8).equal(whole.view(torch.uint8))


def test_methods_with_a_scalar_pass_are_dare_della_model_stock_and_slerp() -> None:
    # their large tensors are merged piece by piece with the scalar pass's result: keep the list explicit
    assert [m.name for m in WITH_SCALAR_PASS] == ["dare_linear", "dare_ties", "della", "della_linear", "model_stock",
                                                  "slerp"]


def test_dare_and_della_stream_with_the_density_rescale_or_none_not_the_l1_one() -> None:
    # the L1 rescale divides by a norm of each whole dropped task vector: merged whole
    for method in ("dare_linear", "dare_ties", "della", "della_linear"):
        applies = get_method(method).scalar_pass.applies  # type: ignore[union-attr]
        assert applies({"rescale": True, "rescale_mode": "density"}, torch.bfloat16)
        assert applies({"rescale": False, "rescale_mode": "l1"}, torch.float32)
        assert not applies({"rescale": True, "rescale_mode": "l1"}, torch.float32)


def test_model_stock_streams_one_ratio_per_tensor_in_float32_or_bfloat16_arithmetic() -> None:
    applies = get_method("model_stock").scalar_pass.applies  # type: ignore[union-attr]
    replayed = row_sums.replicates(torch.float32) and row_sums.replicates(torch.bfloat16)
    assert applies({"filter_wise": False}, torch.float32) is replayed
    assert applies({"filter_wise": False}, torch.bfloat16) is replayed
    assert not applies({"filter_wise": True}, torch.float32)  # a ratio per row: merged whole
    assert not applies({"filter_wise": False}, torch.float16)  # sums not replayed: merged whole
    assert not applies({"filter_wise": False}, torch.float64)


def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scalar passes read 50 entries at a time: several chunks per tensor, their edges not the pieces'."""
    monkeypatch.setattr(slerp, "_CHUNK", 50)
    monkeypatch.setattr(model_stock, "_CHUNK", 50)


@pytest.mark.parametrize("method", [m.name for m in WITH_SCALAR_PASS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_scalar_pass_then_flat_pieces_give_the_whole_merge_bit_for_bit(
        method: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    m = next(x for x in WITH_SCALAR_PASS if x.name == method)
    _small_chunks(monkeypatch)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(13, 17, generator=g).to(dtype)
    n = 1 if m.max_models == 1 else 3
    tensors = [(base + 0.3 * torch.randn(13, 17, generator=g)).to(dtype) for _ in range(n)]
    name = "model.layers.0.mlp.up_proj.weight"
    params = resolve_parameters(m, name, 0.0, {"t": 0.3} if method == "slerp" else {}, [{}] * n)
    whole = merge_tensor(m, name, tensors, base=base, params=params, seed=0).reshape(-1)
    scalars = tensor_scalars(m, name, FlatSource.of(base, tensors), params=params)
    flat = [t.reshape(-1) for t in tensors]
    unit = m.scalar_pass.unit  # type: ignore[union-attr]
    n = 37 if unit is None else 2 * unit(tuple(base.shape))  # DELLA: two whole rows
    pieces = [merge_tensor(m, name, [t[a:a + n] for t in flat], base=base.reshape(-1)[a:a + n], params=params,
                           seed=0, scalars=scalars, offset=a) for a in range(0, base.numel(), n)]
    assert torch.cat(pieces).view(torch.uint8).equal(whole.view(torch.uint8))


@pytest.mark.parametrize("size", [1, 5, 37, 1000, 77777])
@pytest.mark.parametrize("seed", [0, 3, 2**40 + 7])
def test_a_cpu_generator_drawn_in_consecutive_ranges_gives_the_whole_draw(size: int, seed: int) -> None:
    # what streaming DARE rests on: its masks drawn piece by piece are the whole tensor's masks
    n = 200_003
    whole = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    parts = [torch.rand(min(size, n - a), generator=g, dtype=torch.float32) for a in range(0, n, size)]
    assert torch.cat(parts).view(torch.int32).equal(whole.view(torch.int32))


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("densities", [(0.05, 0.5, 0.9), (0.0, 1.0, 0.05), (0.3, 0.7)], ids=["low", "edges", "two"])
@pytest.mark.parametrize("piece", [1, 37, 1000])
def test_dare_pieces_drawn_in_order_give_the_whole_merge_bit_for_bit(
        method: str, dtype: torch.dtype, densities: tuple[float, ...], piece: int) -> None:
    m = get_method(method)
    g = torch.Generator().manual_seed(len(densities))
    shape = _matrix_for(piece)
    base = torch.randn(shape, generator=g).to(dtype)
    tensors = [(base + 0.3 * torch.randn(shape, generator=g)).to(dtype) for _ in densities]
    name = "model.layers.0.mlp.up_proj.weight"
    settings = [{"weight": 0.3 + 0.4 * i, "density": d} for i, d in enumerate(densities)]
    params = resolve_parameters(m, name, 0.0, {}, settings)
    flat = [t.reshape(-1) for t in tensors]
    for seed in (0, 11):
        whole = merge_tensor(m, name, tensors, base=base, params=params, seed=seed).reshape(-1)
        scalars = tensor_scalars(m, name, FlatSource.of(base, tensors), params=params, seed=seed)
        pieces = [merge_tensor(m, name, [t[a:a + piece] for t in flat], base=base.reshape(-1)[a:a + piece],
                               params=params, seed=seed, scalars=scalars, offset=a)
                  for a in range(0, base.numel(), piece)]
        assert torch.cat(pieces).view(torch.uint8).equal(whole.view(torch.uint8)), seed


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("densities", [(0.2, 0.5, 0.8), (0.0, 1.0, 0.3), (0.3, 0.7)], ids=["low", "edges", "two"])
@pytest.mark.parametrize(("shape", "rows"), [((41, 53), [1, 3, 40]), ((6, 5, 3, 2), [1, 4])], ids=["2d", "4d"])
def test_della_pieces_of_whole_rows_drawn_in_order_give_the_whole_merge_bit_for_bit(
        method: str, dtype: torch.dtype, densities: tuple[float, ...], shape: tuple[int, ...],
        rows: list[int]) -> None:
    # keep probabilities from the magnitude ranks within each row (dim 1; a 4-D tensor's rows are strided,
    # inside one slice along dim 0), ties included: bf16 magnitudes of a few hundred values
    m = get_method(method)
    g = torch.Generator().manual_seed(len(densities))
    base = torch.randn(shape, generator=g).to(dtype)
    tensors = [(base + (0.01 * torch.randn(shape, generator=g)).bfloat16()).to(dtype) for _ in densities]
    name = "model.layers.0.mlp.up_proj.weight"
    settings = [{"weight": 0.3 + 0.4 * i, "density": d, "epsilon": min(d, 1 - d, 0.15) / 2}
                for i, d in enumerate(densities)]
    params = resolve_parameters(m, name, 0.0, {}, settings)
    flat = [t.reshape(-1) for t in tensors]
    slab = math.prod(shape[1:])
    for seed, per_piece in itertools.product((0, 11), rows):
        piece = per_piece * slab
        whole = merge_tensor(m, name, tensors, base=base, params=params, seed=seed).reshape(-1)
        scalars = tensor_scalars(m, name, FlatSource.of(base, tensors), params=params, seed=seed)
        pieces = [merge_tensor(m, name, [t[a:a + piece] for t in flat], base=base.reshape(-1)[a:a + piece],
                               params=params, seed=seed, scalars=scalars, offset=a)
                  for a in range(0, base.numel(), piece)]
        assert torch.cat(pieces).view(torch.uint8).equal(whole.view(torch.uint8)), (seed, per_piece)


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_carried_generators_refuse_pieces_out_of_order_or_repeated(method: str) -> None:
    # the generators advance with every draw: a piece merged out of order or twice would draw other coins
    m = get_method(method)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    tensors = [base + 0.1 * torch.randn(6, 10, generator=g) for _ in range(2)]
    name = "model.layers.0.mlp.up_proj.weight"
    params = resolve_parameters(m, name, 0.0, {}, [{"density": 0.5, "epsilon": 0.1}] * 2)
    flat = [t.reshape(-1) for t in tensors]

    def merge(scalars: Any, a: int, b: int) -> torch.Tensor:
        return merge_tensor(m, name, [t[a:b] for t in flat], base=base.reshape(-1)[a:b], params=params, seed=0,
                            scalars=scalars, offset=a)

    def fresh() -> Any:
        return tensor_scalars(m, name, FlatSource.of(base, tensors), params=params)

    expected = "must be merged in order, each once: the next one starts at flat entry"
    with pytest.raises(ValueError, match=f"{expected} 0 of 60, got 20 entries at 20"):
        merge(fresh(), 20, 40)  # the first piece skipped
    scalars = fresh()
    merge(scalars, 0, 20)
    with pytest.raises(ValueError, match=f"{expected} 20 of 60, got 20 entries at 0"):
        merge(scalars, 0, 20)  # the same piece again
    merge(scalars, 20, 60)
    with pytest.raises(ValueError, match=f"{expected} 60 of 60, got 20 entries at 40"):
        merge(scalars, 40, 60)  # after the last piece
    scalars = fresh()  # a new scalar pass merges the tensor again, with the whole draw's coins
    whole = merge_tensor(m, name, tensors, base=base, params=params, seed=0).reshape(-1)
    assert torch.equal(torch.cat([merge(scalars, 0, 30), merge(scalars, 30, 60)]), whole)


def test_della_refuses_pieces_that_cut_a_row() -> None:
    m = get_method("della")
    base = torch.zeros(6, 10)
    tensors = [base + 0.1, base - 0.2]
    name = "model.layers.0.mlp.up_proj.weight"
    params = resolve_parameters(m, name, 0.0, {}, [{"density": 0.5, "epsilon": 0.1}] * 2)
    scalars = tensor_scalars(m, name, FlatSource.of(base, tensors), params=params)
    with pytest.raises(ValueError, match=r"must hold whole slices along dim 0 \(10 entries each\), got 15 entries"):
        merge_tensor(m, name, [t.reshape(-1)[:15] for t in tensors], base=base.reshape(-1)[:15], params=params,
                     seed=0, scalars=scalars, offset=0)


def _whole_and_streamed(tmp_path: Path, config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Merge ``config`` with whole tensors, then in pieces of ``STREAM_PIECE`` entries after a scalar pass whose
    chunks (50 entries) cross the pieces' edges: the files must be the same bytes."""
    _small_chunks(monkeypatch)
    monkeypatch.setattr(engine, "_PIECE_ENTRIES", 1 << 40)
    whole = engine.run_merge(config, tmp_path / "whole", progress=False, hash_inputs=False).out_dir
    monkeypatch.setattr(engine, "_PIECE_ENTRIES", STREAM_PIECE)
    pieces = engine.run_merge(config, tmp_path / "pieces", progress=False, hash_inputs=False).out_dir
    assert_same_safetensors(whole, pieces)


@pytest.mark.parametrize("extra", [{}, {"dtype": "bfloat16", "out_dtype": "bfloat16"}, {"dtype": "float16"},
                                   {"dtype": "float64"}], ids=["float32", "bf16", "fp16", "fp64"])
def test_slerp_streamed_after_its_scalar_pass_same_bytes_as_whole(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any]) -> None:
    base, fts = families["llama"]
    config = {"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(fts[0])}],
              "parameters": {"t": 0.3}, **extra}
    _whole_and_streamed(tmp_path, config, monkeypatch)


@pytest.mark.parametrize("other", ["parallel", "antiparallel", "zero", "zero_base"])
def test_slerp_streamed_same_bytes_for_parallel_antiparallel_and_zero_models(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other: str) -> None:
    # the degenerate angles: LERP where |cos| is near 1, a unit norm where a norm is near 0
    base, _ = families["llama"]
    state = load_folder(base)
    make = {"parallel": lambda t: 2.5 * t, "antiparallel": lambda t: -t, "zero": torch.zeros_like,
            "zero_base": lambda t: t}[other]
    b = save_model_folder(tmp_path / "other", {k: make(v) for k, v in state.items()}, base)
    if other == "zero_base":
        base = save_model_folder(tmp_path / "zeros", {k: torch.zeros_like(v) for k, v in state.items()}, base)
    config = {"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(b)}],
              "parameters": {"t": 0.7}}
    _whole_and_streamed(tmp_path, config, monkeypatch)


@pytest.mark.parametrize("extra", [{}, {"dtype": "bfloat16", "out_dtype": "bfloat16"}, {"dtype": "float16"},
                                   {"parameters": {"filter_wise": True}}],
                         ids=["float32", "bf16", "fp16-whole", "filter-wise-whole"])
@pytest.mark.filterwarnings("ignore:model_stock. interpolation ratio")
def test_model_stock_streamed_after_its_scalar_pass_same_bytes_as_whole(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any]) -> None:
    base, fts = families["llama"]
    config = {"merge_method": "model_stock", "base_model": str(base), "models": [{"model": str(p)} for p in fts],
              **extra}
    _whole_and_streamed(tmp_path, config, monkeypatch)


@pytest.mark.parametrize("models", ["identical", "zero", "opposed"])
@pytest.mark.filterwarnings("ignore:model_stock. interpolation ratio")
def test_model_stock_streamed_same_bytes_for_identical_zero_and_opposed_task_vectors(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, models: str) -> None:
    # cos φ = 1 (t = 1), norms 0 (the clamp, cos 0: t = 0), cos φ = −1 (the singular guard at N = 2)
    base, fts = families["llama"]
    state, tuned = load_folder(base), load_folder(fts[0])
    second = {"identical": tuned, "zero": state, "opposed": {k: 2 * v - tuned[k] for k, v in state.items()}}[models]
    pair = [fts[0] if models != "zero" else save_model_folder(tmp_path / "first", state, base),
            save_model_folder(tmp_path / "second", second, base)]
    config = {"merge_method": "model_stock", "base_model": str(base), "models": [{"model": str(p)} for p in pair]}
    _whole_and_streamed(tmp_path, config, monkeypatch)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "della"])
def test_a_stable_tie_order_streamed_gives_the_whole_merges_bytes_and_other_bytes_than_the_sorts(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    # bfloat16 arithmetic: a few hundred magnitudes per task vector, tied ones straddle the kept ranks' edges
    base, fts = families["llama"]
    config = method_config(method, base, fts, dtype="bfloat16", out_dtype="bfloat16")
    config["parameters"] = {"tie_order": "stable"}
    _whole_and_streamed(tmp_path, config, monkeypatch)
    stable = load_folder(tmp_path / "whole")
    config["parameters"] = {"tie_order": "sort"}
    sort = load_folder(engine.run_merge(config, tmp_path / "sort", progress=False, hash_inputs=False).out_dir)
    assert any(not torch.equal(stable[k], sort[k]) for k in sort)  # the tie order reaches the output


def test_an_unknown_tie_order_is_refused_with_the_two_it_knows(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    config = method_config("ties", base, fts)
    config["parameters"] = {"tie_order": "random"}
    out = tmp_path / "out"
    assert_refused(run_cli(write_config(tmp_path, config), out), out, "tie_order", "sort", "stable")


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
@pytest.mark.parametrize("extra", [{}, {"out_dtype": "bfloat16"}], ids=["float32", "bf16-out"])
def test_streamed_in_pieces_same_bytes_as_whole(families: Families, sharded_family: tuple[Path, list[Path]],
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
                                                extra: dict[str, Any]) -> None:
    for arch, (base, fts) in {"llama": families["llama"], "sharded": sharded_family}.items():
        config = weighted_config(method, base, fts, **extra)
        monkeypatch.setattr(engine, "_PIECE_ENTRIES", 1 << 40)
        whole = _merge(tmp_path, config, f"{arch}-whole", "--max-shard-size", "30KB")
        monkeypatch.setattr(engine, "_PIECE_ENTRIES", STREAM_PIECE)  # pieces cross rows and end mid-row
        pieces = _merge(tmp_path, config, f"{arch}-pieces", "--max-shard-size", "30KB")
        files = sorted(p.name for p in whole.glob("*.safetensors"))
        assert len(files) >= 2 and files == sorted(p.name for p in pieces.glob("*.safetensors"))
        for f in files:
            assert (whole / f).read_bytes() == (pieces / f).read_bytes(), (arch, f)


def test_pieces_bound_every_read_for_elementwise_methods_ties_slerp_model_stock_dare_della_and_breadcrumbs(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, fts = families["llama"]
    largest = max(m.nbytes for m in (open_checkpoint(base).meta(n) for n in open_checkpoint(base).names))
    reads: list[int] = []
    real_read = SafetensorsFile._read

    def spy(self: SafetensorsFile, name: str, offset: int, nbytes: int) -> torch.Tensor:
        reads.append(nbytes)
        return real_read(self, name, offset, nbytes)

    monkeypatch.setattr(SafetensorsFile, "_read", spy)
    piece = 256  # entries: a fourth of the largest matrices, 8 or 4 rows
    monkeypatch.setattr(engine, "_PIECE_ENTRIES", piece)
    monkeypatch.setattr(engine, "_KEPT_BYTES", 0)  # no tensor small enough to keep (the next test keeps them)
    _merge(tmp_path, weighted_config("linear", base, fts), "linear")
    assert reads and max(reads) == piece * 4  # float32 inputs: no read larger than one piece
    reads.clear()
    _merge(tmp_path, {**weighted_config("ties", base, fts), "parameters": {"density": 0.5}}, "ties")
    assert max(reads) == piece * 4  # TIES too: its top-k rules are found from pieces first
    reads.clear()
    monkeypatch.setattr(slerp, "_CHUNK", piece)
    monkeypatch.setattr(model_stock, "_CHUNK", piece)
    _merge(tmp_path, {"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(fts[0])}],
                      "parameters": {"t": 0.4}}, "slerp")
    assert max(reads) == piece * 4  # SLERP: its scalar pass reads chunks, its merge pieces
    reads.clear()
    _merge(tmp_path, {"merge_method": "model_stock", "base_model": str(base),
                      "models": [{"model": str(p)} for p in fts]}, "model_stock")
    assert max(reads) == piece * 4  # Model Stock likewise
    reads.clear()
    _merge(tmp_path, {**weighted_config("dare_ties", base, fts), "parameters": {"density": 0.5}}, "dare_ties")
    assert max(reads) == piece * 4  # DARE: its masks are drawn piece by piece
    reads.clear()
    _merge(tmp_path, {**weighted_config("dare_ties", base, fts), "parameters": {"density": 0.5, "rescale_mode": "l1"}},
           "dare_ties_l1")
    assert max(reads) == largest  # with the L1 rescale (a norm of each whole dropped task vector): whole
    reads.clear()
    _merge(tmp_path, {**weighted_config("della", base, fts), "parameters": {"density": 0.5, "epsilon": 0.1}}, "della")
    assert max(reads) == piece * 4  # DELLA: pieces of whole rows (here 4 rows of 64 or 8 of 32 entries)
    reads.clear()
    _merge(tmp_path, {**weighted_config("breadcrumbs_ties", base, fts), "parameters": {"density": 0.5, "gamma": 0.1}},
           "breadcrumbs_ties")
    assert max(reads) == piece * 4  # Breadcrumbs: its rank rules are found from pieces first, as TIES'
    reads.clear()
    _merge(tmp_path, {**weighted_config("breadcrumbs", base, fts), "parameters": {"density": 0.5, "rescale": True}},
           "breadcrumbs_rescale")
    assert max(reads) == largest  # with the rescale (L1 norms of each whole task vector): whole


@pytest.mark.parametrize("method", ["slerp", "model_stock", "dare_ties"])
def test_a_small_tensor_is_read_once_by_its_scalar_pass_and_its_pieces_are_cut_from_that_read(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    base, fts = families["llama"]
    config = method_config(method, base, fts)
    read: dict[tuple[Path, str], int] = {}
    real_read = SafetensorsFile._read

    def spy(self: SafetensorsFile, name: str, offset: int, nbytes: int) -> torch.Tensor:
        read[self.path, name] = read.get((self.path, name), 0) + nbytes
        return real_read(self, name, offset, nbytes)

    monkeypatch.setattr(SafetensorsFile, "_read", spy)
    monkeypatch.setattr(engine, "_PIECE_ENTRIES", 256)
    monkeypatch.setattr(slerp, "_CHUNK", 200)  # the pass's chunks cross the pieces' edges
    monkeypatch.setattr(model_stock, "_CHUNK", 200)
    kept = _merge(tmp_path, config, "kept")
    sizes = _tensor_sizes(base, *fts)
    read_by_merge = {key: sizes[key] for key in read}
    # every tensor of every input read exactly once, though SLERP's pass reads each chunk twice and the pieces
    # read the inputs again; DARE's pass reads nothing, so its pieces read as usual: also once
    assert read == read_by_merge
    monkeypatch.setattr(engine, "_KEPT_BYTES", 0)
    read.clear()
    again = _merge(tmp_path, config, "read_again")
    assert sum(read.values()) > sum(read_by_merge.values()) or method == "dare_ties"
    assert_same_safetensors(kept, again)


@pytest.mark.parametrize("method", ["slerp", "model_stock"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [None, "nan in a model", "inf in the base", "a difference past the dtype's range"])
def test_scalar_passes_vouch_for_their_inputs_only_where_every_norm_they_summed_is_finite(
        method: str, dtype: torch.dtype, bad: str | None) -> None:
    m = get_method(method)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 33, generator=g).to(dtype)
    n = 1 if method == "slerp" else 2
    tensors = [(base.float() + 0.1 * torch.randn(64, 33, generator=g)).to(dtype) for _ in range(n)]
    if bad == "nan in a model":
        tensors[-1][5, 7] = float("nan")
    elif bad == "inf in the base":
        base[0, 0] = float("inf")
    elif bad == "a difference past the dtype's range":  # every entry finite: the proof fails, the scan decides
        base[3, 3], tensors[0][3, 3] = 3e38, -3e38
    name = "model.layers.0.mlp.up_proj.weight"
    params = resolve_parameters(m, name, 0.0, {"t": 0.3} if method == "slerp" else {}, [{}] * n)
    got = vouched_scalars(m, name, FlatSource.of(base, tensors), params=params)
    assert got.inputs_finite is (bad is None)
    if bad is None:  # what the pieces get is the unvouched pass's value
        value = tensor_scalars(m, name, FlatSource.of(base, tensors), params=params)
        assert all(torch.equal(a, b) for a, b in zip(torch.atleast_1d(got.value), torch.atleast_1d(value),
                                                     strict=True))


@dataclasses.dataclass
class _ScanSpy:
    """What a merge scanned for NaN/Inf (entries per scan) and how many pieces merged with the whole tensor's
    ``whole`` keyword (streamed: ``scalars`` or ``topk``) or without (merged whole), in which tensors."""

    whole: str
    scans: list[int] = dataclasses.field(default_factory=list)
    streamed: int = 0
    merged_whole: int = 0
    streamed_tensors: set[str] = dataclasses.field(default_factory=set)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_count, real_merge = engine.count_nonfinite, engine.vouched_merge_tensor

        def count_spy(t: torch.Tensor) -> int:
            self.scans.append(t.numel())
            return real_count(t)

        def merge_spy(*args: Any, **kwargs: Any) -> VouchedMerge:
            if self.whole in kwargs:
                self.streamed += 1
                self.streamed_tensors.add(args[1])
            else:
                self.merged_whole += 1
            return real_merge(*args, **kwargs)

        monkeypatch.setattr(engine, "count_nonfinite", count_spy)
        monkeypatch.setattr(engine, "vouched_merge_tensor", merge_spy)


def _spied_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, Any],
                 whole: str) -> tuple[_ScanSpy, Path]:
    """The merge of ``config`` in pieces of 256 entries, watched by a :class:`_ScanSpy`, and its output."""
    spy = _ScanSpy(whole)
    spy.install(monkeypatch)
    monkeypatch.setattr(engine, "_PIECE_ENTRIES", 256)
    out = _merge(tmp_path, config, "vouched")
    assert spy.streamed > 0 and spy.merged_whole > 0
    return spy, out


@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_pieces_cut_from_inputs_their_pass_proved_finite_skip_the_inputs_nonfinite_scan(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    base, fts = families["llama"]
    config = method_config(method, base, fts)
    inputs = 2 if method == "slerp" else 1 + len(fts)  # the base and the models merged into it
    # a streamed piece gets its tensor's scalars; a small tensor merges whole
    spy, vouched = _spied_merge(tmp_path, monkeypatch, config, "scalars")
    scans, streamed_tensors, streamed, whole = spy.scans, spy.streamed_tensors, spy.streamed, spy.merged_whole
    # every merged result scanned; the inputs of the whole tensors only, never those of a streamed piece
    assert len(scans) == streamed + whole * (1 + inputs)
    scans.clear()
    # nothing kept: the pieces are read from the files again, and those read after their pass ended skip the
    # scan too; every piece from a tensor's third on is (its read starts after the first piece waited for the
    # pass), the first two may be read while it runs
    monkeypatch.setattr(engine, "_KEPT_BYTES", 0)
    reread = _merge(tmp_path, config, "reread")
    assert streamed + whole * (1 + inputs) <= len(scans) <= (streamed + whole * (1 + inputs)
                                                             + 2 * inputs * len(streamed_tensors))
    assert len(scans) < (streamed + whole) * (1 + inputs)  # before 2026-12-04 every input here was scanned
    assert_same_safetensors(vouched, reread)
    scans.clear()
    real_vouched = engine.vouched_scalars

    def proves_nothing(*args: Any, **kwargs: Any) -> Any:
        return dataclasses.replace(real_vouched(*args, **kwargs), inputs_finite=False)

    monkeypatch.setattr(engine, "vouched_scalars", proves_nothing)  # nothing vouched: every input scanned
    scanned = _merge(tmp_path, config, "scanned")
    assert len(scans) == (streamed + whole) * (1 + inputs)
    assert_same_safetensors(vouched, scanned)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_top_k_pieces_read_after_their_keys_proved_the_inputs_finite_skip_the_inputs_nonfinite_scan(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    # every model's keys are |model - base|: all below +Inf's only where both are finite (an Inf or NaN in
    # either makes the difference Inf or NaN), so the rules' pass vouches for every input of the tensor
    base, fts = families["llama"]
    config = method_config(method, base, fts)
    inputs = 1 + len(fts)
    spy, vouched = _spied_merge(tmp_path, monkeypatch, config, "topk")
    scans, streamed_tensors, streamed, whole = spy.scans, spy.streamed_tensors, spy.streamed, spy.merged_whole
    # every result scanned, the inputs of the whole tensors, and of the pieces read before their pass ended:
    # each tensor's first two at most (the reader reads ahead while the main thread waits for the pass)
    assert streamed + whole * (1 + inputs) <= len(scans) <= (streamed + whole * (1 + inputs)
                                                             + 2 * inputs * len(streamed_tensors))
    assert len(scans) < (streamed + whole) * (1 + inputs)  # before 2026-12-04 every input here was scanned
    scans.clear()

    def proves_nothing(*args: Any, **kwargs: Any) -> Any:
        found = task_vectors.checked_task_vector_keys(*args, **kwargs)
        return None if found is None else (found[0], False)

    monkeypatch.setattr(engine, "checked_task_vector_keys", proves_nothing)  # nothing vouched: all scanned
    scanned = _merge(tmp_path, config, "scanned")
    assert len(scans) == (streamed + whole) * (1 + inputs)
    assert_same_safetensors(vouched, scanned)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_pieces_whose_one_pass_found_every_task_vector_finite_skip_the_inputs_nonfinite_scan(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    # its one compiled pass reads every entry of every task vector |model − base|, dropped ones included: all
    # finite only where both inputs are, so it vouches for every input of the piece it merged
    base, fts = families["llama"]
    config = method_config(method, base, fts)
    inputs = 1 + len(fts)
    spy, vouched = _spied_merge(tmp_path, monkeypatch, config, "scalars")
    scans, streamed, whole = spy.scans, spy.streamed, spy.merged_whole
    assert len(scans) == streamed + whole  # every merged result, no input (before this change: every input too)
    scans.clear()
    real = engine.vouched_merge_tensor

    def proves_nothing(*args: Any, **kwargs: Any) -> VouchedMerge:
        return dataclasses.replace(real(*args, **kwargs), inputs_finite=False)

    monkeypatch.setattr(engine, "vouched_merge_tensor", proves_nothing)  # nothing vouched: scanned after the merge
    scanned = _merge(tmp_path, config, "scanned")
    assert len(scans) == (streamed + whole) * (1 + inputs)
    assert_same_safetensors(vouched, scanned)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("in_base", [False, True], ids=["model", "base"])
@pytest.mark.parametrize("where", [(0, 0), (-1, -1)], ids=["first-piece", "last-piece"])
def test_a_nonfinite_entry_in_a_della_streamed_tensor_is_named_with_its_input_even_where_its_coin_drops_it(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: float, in_base: bool,
        where: tuple[int, int]) -> None:
    # density 0.05: most coins drop the entry, whose value then leaves no trace in the result; the pass's flag
    # (or the scan after it) still names the input, and nothing is written
    base, fts = families["llama"]
    name = "model.layers.1.mlp.down_proj.weight"
    state = load_folder(base if in_base else fts[1])
    state[name][where] = bad
    path = save_model_folder(tmp_path / "bad", state, base if in_base else fts[1])
    monkeypatch.setattr(engine, "_PIECE_ENTRIES", 256)
    config = method_config("della", path if in_base else base, [fts[0], *([fts[1]] if in_base else [path]), fts[2]])
    for model in config["models"]:
        model["parameters"].update({"density": 0.05, "epsilon": 0.04})
    out = tmp_path / "out"
    text = assert_refused(run_cli(write_config(tmp_path, config), out), out,
                          f"{path}: tensor '{name}' has 1 NaN/Inf value(s)")
    assert "produced it from finite inputs" not in text and text.count("NaN/Inf value(s)") == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("in_base", [False, True], ids=["model", "base"])
def test_a_nonfinite_entry_in_a_top_k_streamed_tensor_is_named_with_its_input(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: float, in_base: bool) -> None:
    base, fts = families["llama"]
    name = "model.layers.1.mlp.down_proj.weight"
    state = load_folder(base if in_base else fts[1])
    state[name][-1, -1] = bad  # the last piece: read after the pass, whose keys saw it and proved nothing
    path = save_model_folder(tmp_path / "bad", state, base if in_base else fts[1])
    monkeypatch.setattr(engine, "_PIECE_ENTRIES", 256)
    config = method_config("ties", path if in_base else base, [fts[0], *([fts[1]] if in_base else [path]), fts[2]])
    out = tmp_path / "out"
    text = assert_refused(run_cli(write_config(tmp_path, config), out), out,
                          f"{path}: tensor '{name}' has 1 NaN/Inf value(s)")
    assert "produced it from finite inputs" not in text


@pytest.mark.parametrize("where", [(1, 2), (-1, -1)], ids=["first-piece", "last-piece"])
@pytest.mark.parametrize("kept_bytes", [None, 0], ids=["kept", "read-again"])
@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_a_nan_in_a_tensor_kept_by_its_scalar_pass_is_reported_naming_the_input(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
        kept_bytes: int | None, where: tuple[int, int]) -> None:
    if kept_bytes is not None:  # the pieces read from the files again after the pass (no proof: a NaN was summed)
        monkeypatch.setattr(engine, "_KEPT_BYTES", kept_bytes)
        monkeypatch.setattr(engine, "_PIECE_ENTRIES", 256)
    base, fts = families["llama"]
    state = load_folder(fts[0])
    name = "model.layers.0.self_attn.q_proj.weight"
    state[name][where] = float("nan")
    bad = save_model_folder(tmp_path / "bad", state, fts[0])
    out = tmp_path / "out"
    result = run_cli(write_config(tmp_path, method_config(method, base, [bad, *fts[1:]])), out)
    # the family's random task vectors make Model Stock warn of ratios outside [0, 1] before the error
    assert result.exit_code not in (0, None) and "Traceback" not in result.output, result.output
    error = result.output[result.output.index("error:"):]
    assert f"{bad}: tensor '{name}' has 1 NaN/Inf value(s)" in error, error
    # the pieces merged before the bad one were spread its NaN by the tensor's scalars: the input is the cause
    assert "from finite inputs" not in error, error
    assert not out.exists() and leftovers(out) == []


def _tensor_sizes(*folders: Path) -> dict[tuple[Path, str], int]:
    """The bytes of each tensor of each safetensors file in ``folders``."""
    sizes = {}
    for path in (f for folder in folders for f in sorted(folder.glob("*.safetensors"))):
        file = SafetensorsFile(path)
        sizes.update({(path, name): e.nbytes for name, e in file.entries.items()})
        file.close()
    return sizes


@pytest.mark.parametrize("extra", [{}, {"dtype": "bfloat16", "out_dtype": "bfloat16"},
                                   {"dtype": "float16", "parameters": {"consensus": "count", "lambda": 0.8}}],
                         ids=["float32", "bf16", "fp16-count"])
def test_ties_streamed_after_its_top_k_same_bytes_as_whole(families: Families, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            extra: dict[str, Any]) -> None:
    base, fts = families["llama"]
    config = weighted_config("ties", base, fts, **extra)
    for i, m in enumerate(config["models"]):
        m["parameters"]["density"] = [0.3, 0.6, 0.05][i % 3]
    monkeypatch.setattr(engine, "_PIECE_ENTRIES", 1 << 40)
    whole = _merge(tmp_path, config, "whole")
    monkeypatch.setattr(engine, "_PIECE_ENTRIES", STREAM_PIECE)  # pieces cross rows and end mid-row
    pieces = _merge(tmp_path, config, "pieces")
    assert_same_safetensors(whole, pieces)


# per-model parameters of the methods streamed after a pass over each whole tensor: densities 0 and 1 included
_PER_MODEL = {"dare": {"density": [0.3, 1.0, 0.05, 0.0]},
              "della": {"density": [0.3, 1.0, 0.2, 0.0], "epsilon": [0.1, 0.15, 0.05, 0.0]},
              "breadcrumbs": {"density": [0.3, 1.0, 0.05, 0.0], "gamma": [0.05, 0.2, 0.0, 0.1]}}


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs",
                                    "breadcrumbs_ties"])
@pytest.mark.parametrize("extra", [{}, {"dtype": "bfloat16", "out_dtype": "bfloat16", "seed": 5},
                                   {"dtype": "float16", "parameters": {"lambda": 0.8, "normalize": True}},
                                   {"dtype": "float64"}, {"parameters": {"rescale": False}},
                                   {"parameters": {"rescale": True}}],
                         ids=["float32", "bf16-seed5", "fp16-normalize", "fp64", "no-rescale", "rescale"])
def test_streamed_after_a_pass_over_each_tensor_same_bytes_as_whole(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
        extra: dict[str, Any]) -> None:
    # DARE: generators carried from piece to piece; DELLA too, in pieces of whole rows (its 1-D tensors whole);
    # Breadcrumbs: rank rules found first (float64: masks made whole from the task vector); with Breadcrumbs'
    # rescale (L1 norms of whole task vectors) merged whole
    base, fts = families["llama"]
    config = weighted_config(method, base, fts, **extra)
    for i, m in enumerate(config["models"]):
        m["parameters"].update({k: v[i % 4] for k, v in _PER_MODEL[method.split("_")[0]].items()})
    _whole_and_streamed(tmp_path, config, monkeypatch)


def test_nonfinite_counts_are_summed_over_the_pieces_of_a_tensor(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, fts = families["llama"]
    state = load_folder(fts[0])
    name = "model.embed_tokens.weight"
    state[name][0, 0] = float("nan")
    state[name][-1, -1] = float("inf")  # far apart: different pieces
    bad = save_model_folder(tmp_path / "bad", state, fts[0])
    monkeypatch.setattr(engine, "_PIECE_ENTRIES", 16)
    out = tmp_path / "out"
    text = assert_refused(run_cli(write_config(tmp_path, weighted_config("linear", base, [bad, fts[1]])), out),
                          out, f"{bad}: tensor '{name}' has 2 NaN/Inf value(s)")
    assert text.count("NaN/Inf value(s)") == 1


# -- the I/O underneath ---------------------------------------------------------------------------------------
def test_flat_reads_match_whole_tensors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    state = {"a": torch.randn(5, 7, generator=g), "b": torch.randn(9, generator=g).to(torch.bfloat16),
             "c": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    write_state_dict(tmp_path / "st", state)
    torch.save(state, tmp_path / "model.bin")
    for path in (tmp_path / "st", tmp_path / "model.bin"):
        reader = open_checkpoint(path)
        for name, t in state.items():
            flat = t.reshape(-1)
            for a, b in ((0, flat.numel()), (3, 4), (2, 2), (flat.numel() - 1, flat.numel())):
                got = reader.get_flat(name, a, b)
                assert got.dtype == t.dtype and torch.equal(got, flat[a:b]), (path.name, name, a, b)
        reader.close()
    f = SafetensorsFile(tmp_path / "st" / "model.safetensors")
    with pytest.raises(IndexError, match="'a'"):
        f.get_flat("a", 30, 36)
    f.close()


def test_writer_parts_make_the_same_file_and_are_checked(tmp_path: Path) -> None:
    t = torch.randn(6, 5)
    metas = {"x": TensorMeta((6, 5), torch.float32), "y": TensorMeta((2,), torch.float32)}
    write_state_dict(tmp_path / "whole", {"x": t, "y": torch.ones(2)})
    (tmp_path / "parts").mkdir()
    w = StreamingSafetensorsWriter(tmp_path / "parts", ShardPlan.build(metas, 1 << 30))
    for a in range(0, 30, 7):
        w.write_part("x", t.reshape(-1)[a:a + 7])
    w.write("y", torch.ones(2))
    w.close()
    assert (tmp_path / "parts" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()

    (tmp_path / "bad").mkdir()
    w = StreamingSafetensorsWriter(tmp_path / "bad", ShardPlan.build(metas, 1 << 30))
    with pytest.raises(RuntimeError, match="does not fit"):
        w.write_part("x", torch.zeros(31))
    with pytest.raises(RuntimeError, match="does not fit"):
        w.write_part("x", torch.zeros(3, dtype=torch.float64))
    w.write_part("x", torch.zeros(10))
    with pytest.raises(RuntimeError, match="partly written"):
        w.write("x", t)
    with pytest.raises(RuntimeError, match="out of order"):
        w.write_part("y", torch.zeros(1))
    with pytest.raises(RuntimeError, match="output incomplete"):
        w.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                   torch.float8_e4m3fn])
def test_count_nonfinite_is_exact(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    # float8_e4m3fn has no infinity (casting one saturates): only NaN there
    values = [float("nan")] * 3 if dtype == torch.float8_e4m3fn else [float("nan"), float("inf"), -float("inf")]
    for bad in (0, 1, 5):
        t = torch.randn(1000, generator=g)
        where = torch.randperm(1000, generator=g)[:bad]
        t[where] = torch.tensor(values).repeat(2)[:bad]
        t = t.to(dtype)
        assert count_nonfinite(t) == int((~torch.isfinite(t.float())).sum()) == bad
    assert count_nonfinite(torch.empty(0, dtype=dtype)) == 0
    big = torch.finfo(dtype).max
    assert count_nonfinite(torch.tensor([big, -big], dtype=dtype)) == 0  # large but finite
    assert count_nonfinite(torch.arange(5)) == 0


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_allocator_tuning_applies_under_glibc() -> None:
    # in a child process: the setting is process-wide and permanent
    code = "from mergelab.merge.allocator import recycle_freed_memory as r; print(r())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"


_ARENA_PROBE = """
import ctypes, ctypes.util, sys, threading
import torch
from mergelab.merge.allocator import recycle_freed_memory
if sys.argv[1] == "tuned":
    assert recycle_freed_memory()
meet = threading.Barrier(4)
def allocate():  # four threads holding 1 MiB blocks at once (below the mmap threshold: from arenas)
    meet.wait()
    held = [torch.ones(1 << 18) for _ in range(10)]
    meet.wait()
threads = [threading.Thread(target=allocate) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.open_memstream.restype = ctypes.c_void_p
text, size = ctypes.c_char_p(), ctypes.c_size_t()
stream = ctypes.c_void_p(libc.open_memstream(ctypes.byref(text), ctypes.byref(size)))
libc.malloc_info(0, stream)
libc.fclose(stream)
print(text.value.decode().count("<heap nr="))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_allocator_tuning_keeps_one_arena_for_every_thread() -> None:
    # every arena keeps up to the trim threshold of freed memory: with the engine's merge and top-k threads,
    # one arena each raised TIES' peak by a sixth, two by 5 % (merge/allocator.py)
    def arenas(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", _ARENA_PROBE, mode], capture_output=True, text=True,
                                  check=True).stdout)

    assert arenas("default") > 1  # the probe can see more than one
    assert arenas("tuned") == 1


def test_parameters_are_resolved_once_per_tensor_however_many_pieces(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # plan_merge resolves each tensor's parameters once; the engine merges every piece with those values
    base, fts = families["llama"]
    calls: list[str] = []
    real = params_module._resolve

    def spy(param: Any, scopes: Any, tensor_name: str, t: float, where: str) -> Any:
        calls.append(tensor_name)
        return real(param, scopes, tensor_name, t, where)

    monkeypatch.setattr(params_module, "_resolve", spy)
    monkeypatch.setattr(engine, "_PIECE_ENTRIES", STREAM_PIECE)
    _merge(tmp_path, weighted_config("linear", base, fts), "linear")
    reader = open_checkpoint(base)
    floating = [n for n in reader.names if reader.meta(n).dtype.is_floating_point]
    per_tensor = 1 + len(fts)  # linear: 'normalize' once, 'weight' per model
    assert sorted(set(calls)) == sorted(floating)
    assert len(calls) == per_tensor * len(floating)  # before: once per piece (18,456 calls in pieces of 7)


def test_a_scalar_pass_that_fails_is_reported_naming_the_tensor_and_nothing_is_written(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, fts = families["llama"]
    real_scalars = engine.vouched_scalars
    failing = "model.layers.1.mlp.up_proj.weight"

    def scalars(method: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        if name == failing:
            raise ValueError("no finite angle between these two tensors")
        return real_scalars(method, name, *args, **kwargs)

    monkeypatch.setattr(engine, "vouched_scalars", scalars)
    monkeypatch.setattr(engine, "_PIECE_ENTRIES", 64)  # streamed, its inputs kept by the pass that fails
    config = {"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(fts[0])}],
              "parameters": {"t": 0.4}}
    with pytest.raises(CompatibilityError, match=f"cannot merge tensor '{re.escape(failing)}': no finite angle"):
        engine.run_merge(config, tmp_path / "out", progress=False, hash_inputs=False)
    assert list(tmp_path.iterdir()) == []


def test_a_source_that_reads_ahead_gives_the_same_chunks_reading_at_most_one_ahead_on_another_thread() -> None:
    import threading

    base, tensors = torch.arange(10.0), [torch.arange(10.0) * 2, torch.arange(10.0) * 3]
    whole = FlatSource.of(base, tensors)
    reads: list[tuple[int, str]] = []

    def read(a: int, b: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        reads.append((a, threading.current_thread().name))
        return whole.read(a, b)

    ahead = FlatSource(whole.shape, read, read_ahead=True)
    got = []
    for k, (b, ts) in enumerate(ahead.chunks(4)):  # [0, 4), [4, 8), [8, 10)
        assert len(reads) <= k + 2  # this chunk and the next one, no more
        got.append((b, ts))
    expected = list(whole.chunks(4))
    assert len(got) == len(expected) == 3
    for (b, ts), (eb, ets) in zip(got, expected, strict=True):
        assert torch.equal(b, eb) and all(torch.equal(t, e) for t, e in zip(ts, ets, strict=True))
    assert [a for a, _ in reads] == [0, 4, 8]
    assert all(name.startswith("mergelab-pass-read") for _, name in reads)
    # a caller that stops early leaves no read running past the one ahead
    reads.clear()
    chunks = ahead.chunks(2)
    next(chunks)
    chunks.close()
    assert [a for a, _ in reads] == [0, 2]
