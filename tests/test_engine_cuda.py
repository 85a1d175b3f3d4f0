"""``mergelab merge --device cuda``: every method merges on a GPU as on the CPU (skipped without CUDA; run on a
lent GPU machine, see benchmarks/gpu_engine.py for the same comparison at 3 × 0.5 and 3 × 2 GB)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import STREAM_PIECE, assert_ok, load_folder, method_config, run_cli, write_config
from mergelab.merge import engine
from mergelab.methods.task_vectors import divide_as_the_cpu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

Families = dict[str, tuple[Path, list[Path]]]
# Every step element-wise, or a selection decided on the CPU (top-k ties, random masks): the CPU's bits
BIT_EQUAL = ["linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties",
             "della", "della_linear", "nearswap"]
# Sums over a whole tensor (norms, dot products) run in the GPU's order: the last bits of float32 may differ
REDUCED = ["slerp", "model_stock", "multislerp", "karcher", "sce", "nuslerp", "arcee_fusion"]
# Decompositions (cuSOLVER against LAPACK) and WUDI's optimizer steps
DECOMPOSED = ["tsv", "iso_c", "iso_cts", "cart", "wudi"]


def _merge(tmp_path: Path, config: dict, name: str, *args: str) -> dict[str, torch.Tensor]:
    out = tmp_path / name
    assert_ok(run_cli(write_config(tmp_path, config, f"{name}.yml"), out, *args))
    return load_folder(out)


def _config(families: Families, method: str, **extra: object) -> dict:
    base, fts = families["llama"]
    fts = fts[:2] if method == "nuslerp" else fts[:1] if method == "arcee_fusion" else fts
    return method_config(method, base, fts, **extra)


def _cpu_and_cuda(tmp_path: Path, config: dict) -> tuple[dict, dict]:
    cpu = _merge(tmp_path, config, "cpu")
    gpu = _merge(tmp_path, config, "cuda", "--device", "cuda")
    assert list(gpu) == list(cpu)
    for name, want in cpu.items():
        assert gpu[name].dtype == want.dtype and gpu[name].shape == want.shape, name
    return cpu, gpu


@pytest.mark.parametrize("method", BIT_EQUAL)
def test_element_wise_top_k_and_random_drop_methods_give_the_cpus_bits_on_cuda(
        families: Families, tmp_path: Path, method: str) -> None:
    cpu, gpu = _cpu_and_cuda(tmp_path, _config(families, method))
    differ = [name for name in cpu if not torch.equal(gpu[name], cpu[name])]
    assert not differ, differ


@pytest.mark.parametrize(("method", "extra"), [
    ("ties", {"parameters": {"scope": "global"}}), ("ties", {"dtype": "bfloat16", "out_dtype": "bfloat16"}),
    ("dare_ties", {"dtype": "bfloat16", "out_dtype": "bfloat16"}), ("linear", {"dtype": "float16"}),
    ("task_arithmetic", {"parameters": {"normalize": True}}),
    ("ties", {"dtype": "bfloat16", "parameters": {"tie_order": "stable"}}),
    ("breadcrumbs", {"dtype": "bfloat16", "parameters": {"tie_order": "stable"}}),
    ("della", {"dtype": "bfloat16", "parameters": {"tie_order": "stable"}})])
def test_global_thresholds_and_half_precision_arithmetic_give_the_cpus_bits_on_cuda(
        families: Families, tmp_path: Path, method: str, extra: dict) -> None:
    cpu, gpu = _cpu_and_cuda(tmp_path, _config(families, method, **extra))
    differ = [name for name in cpu if not torch.equal(gpu[name], cpu[name])]
    assert not differ, differ


@pytest.mark.parametrize("method", REDUCED + DECOMPOSED)
def test_methods_with_whole_tensor_sums_or_decompositions_merge_on_cuda_as_on_the_cpu(
        families: Families, tmp_path: Path, method: str) -> None:
    cpu, gpu = _cpu_and_cuda(tmp_path, _config(families, method))
    rtol, atol = (1e-5, 1e-6) if method in REDUCED else (1e-3, 1e-4)
    for name, want in cpu.items():
        torch.testing.assert_close(gpu[name], want, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "dare_ties"])
def test_pieces_merged_on_cuda_give_the_whole_tensors_merge(families: Families, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    base, fts = families["llama"]
    config = method_config(method, base, fts)
    monkeypatch.setattr(engine, "_PIECE_ENTRIES", 1 << 40)
    whole = _merge(tmp_path, config, "whole", "--device", "cuda")
    monkeypatch.setattr(engine, "_PIECE_ENTRIES", STREAM_PIECE)
    pieces = _merge(tmp_path, config, "pieces", "--device", "cuda")
    assert list(pieces) == list(whole)
    for name, want in whole.items():
        assert torch.equal(pieces[name], want), name


def test_the_merge_record_names_the_gpu_it_ran_on(families: Families, tmp_path: Path) -> None:
    base, fts = families["llama"]
    _merge(tmp_path, method_config("linear", base, fts), "out", "--device", "cuda:0")
    record = json.loads((tmp_path / "out" / "mergelab.json").read_text())
    assert record["device"] == "cuda:0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("divisor", [0.3, 1.5, 3.0])
def test_a_division_on_cuda_gives_the_cpus_quotients(dtype: torch.dtype, divisor: float) -> None:
    # torch's CUDA kernel multiplies by the reciprocal of a Python number: on an H200 (2026-12-04) that moved
    # the last bit of 990,066 of 4 Mi float32 quotients by 0.3, 1,397,690 by 3.0 and 1.5; the CPU divides
    x = (torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)) * 0.002).to(dtype)
    assert torch.equal(divide_as_the_cpu(x.cuda(), divisor).cpu(), x.clone().div_(divisor))


def test_a_large_gpu_merge_loads_the_compiled_loops_for_its_cpu_steps(
        families: Families, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, fts = families["llama"]
    calls: list[int] = []
    monkeypatch.setattr(engine, "_WARM_UP_BYTES", 0)
    monkeypatch.setattr(engine, "warm_up_in_background", lambda: calls.append(1))
    _merge(tmp_path, method_config("ties", base, fts), "out", "--device", "cuda")
    assert calls == [1]
