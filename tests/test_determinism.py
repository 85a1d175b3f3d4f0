"""The same config and seed give the same bytes whatever the thread count, for every registered method.

Reductions (norms, dot products, sums) and LAPACK calls split their work by thread and add the partial
results in that order, so without care SLERP, Model Stock and CART differed in the last bits between one and
two threads. Tensors here are larger than torch's parallel grain (32768 entries), so more than one thread
really is used.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import mergelab
from mergelab.methods import MergeMethod, all_methods
from mergelab.methods.registry import REQUIRED

SHAPES = {"layers.0.mlp.weight": (384, 256), "layers.1.mlp.weight": (256, 300), "layers.0.norm.weight": (70_000,),
          "scale": ()}


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _inputs(method: MergeMethod) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    n = max(method.min_models, 3) if method.max_models is None else method.max_models
    models = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    params = {}
    for p in method.global_params.values():
        if p.default is REQUIRED:
            params[p.name] = 0.3 if p.kind is float else 1
    stats = None
    if method.needs_stats:
        if method.name == "regmean":
            stats = {k: [(lambda a: a.T @ a)(torch.randn(64, s[1], generator=g)) for _ in models]
                     for k, s in SHAPES.items() if len(s) == 2}
        else:  # diagonal statistics (Fisher): one positive value per entry
            stats = {k: [torch.rand(s, generator=g) + 0.1 for _ in models] for k, s in SHAPES.items()}
    model_parameters = [{"density": 0.6} if method.param("density") else {} for _ in models]
    return {"state_dicts": models, "method": method.name, "base": base if method.base != "ignored" else None,
            "parameters": params, "model_parameters": model_parameters, "seed": 3, "stats": stats}


@pytest.mark.parametrize("method", all_methods(), ids=lambda m: m.name)
def test_every_method_gives_the_same_bytes_on_one_and_two_threads(method: MergeMethod,
                                                                   restore_threads: None) -> None:
    inputs = _inputs(method)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(mergelab.merge_state_dicts(**inputs))
    one, two = results
    for name in one:
        assert one[name].view(torch.uint8).equal(two[name].view(torch.uint8)) if one[name].dim() else \
            one[name].reshape(1).view(torch.uint8).equal(two[name].reshape(1).view(torch.uint8)), name


@pytest.mark.parametrize("method", ["slerp", "model_stock", "cart"])
def test_engine_output_files_identical_on_one_and_two_threads(families: dict[str, tuple[Path, list[Path]]],
                                                              tmp_path: Path, method: str,
                                                              restore_threads: None) -> None:
    base, fts = families["llama"]
    models = fts[:1] if method == "slerp" else fts
    config = {"merge_method": method, "base_model": str(base), "models": [{"model": str(p)} for p in models],
              "parameters": {"t": 0.4} if method == "slerp" else {}}
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(mergelab.merge(config, tmp_path / f"threads-{threads}", progress=False, hash_inputs=False))
    for f in sorted(p.name for p in outs[0].out_dir.glob("*.safetensors")):
        assert (outs[0].out_dir / f).read_bytes() == (outs[1].out_dir / f).read_bytes(), f


def test_the_engine_streams_on_one_torch_thread_and_gives_the_callers_count_back(
        families: dict[str, tuple[Path, list[Path]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        restore_threads: None) -> None:
    # On torch's 2 threads the second OpenMP thread spin-waited between the stream's small ops: linear over
    # 3 × 0.5 GB took 21 CPU s instead of 1.6 (benchmarks/linear_stages.py --stages pipelined_threads ...)
    from mergelab.merge import engine

    seen: list[int] = []
    real = engine.count_nonfinite

    def spy(t: torch.Tensor) -> int:  # runs on the merge and reader threads
        seen.append(torch.get_num_threads())
        return real(t)

    monkeypatch.setattr(engine, "count_nonfinite", spy)
    base, fts = families["llama"]
    torch.set_num_threads(2)
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(p)} for p in fts]}
    mergelab.merge(config, tmp_path / "out", progress=False, hash_inputs=False)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
