"""``mergelab merge --dry-run``: the plan, checked, without reading any tensor data.

The estimates follow the engine's memory model (engine.py's docstring) and this project's CPU benchmark at
Llama-2-7B's tensor shapes (``benchmarks/results/2026-12-05-fifth.md``: ``python benchmarks/vs_mergekit.py --size
7Bx6``, 3 × 2.95 GB bf16, 2 idle cores, ``mergelab merge`` end to end with every input hashed): linear 4.81 s,
task arithmetic 3.71 s, DARE-TIES 8.83 s, Model Stock 7.68 s for 8.86 GB of input, SLERP 8.00 s for 5.91 GB
(13:20 UTC run); TIES 16.22 s, Breadcrumbs 15.86 s, DELLA 35.83 s (14:05 UTC run, on the engine of that hour).
They are orders of magnitude for planning, not promises: disks, cores and dtypes change them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergelab.errors import ConfigError
from mergelab.io.writer import ShardPlan, parse_size
from mergelab.merge.config import MergeConfig, load_config
from mergelab.merge.engine import (
    _PIECE_ENTRIES,
    _SCALAR_PASSES_AHEAD,
    _input_bytes,
    _KeptInputs,
    _loads_kernels,
    _merge_threads,
    _passes_first,
    _pieces,
    _streams_with_scalars,
    _streams_with_topk,
    _topk_side_by_side,
    _work_space_beside,
    rank_bytes_per_entry,
)
from mergelab.merge.plan import plan_merge

# Seconds per GB of input on the benchmark machine (see the module docstring).
_SECONDS_PER_GB = {"linear": 0.54, "task_arithmetic": 0.42, "ties": 1.8, "dare_ties": 1.0, "breadcrumbs": 1.8,
                   "della": 4.0, "slerp": 1.35, "model_stock": 0.87}
_DEFAULT_SECONDS_PER_GB = 15.0  # methods not benchmarked: about TIES' cost (two passes, sorting)
_TORCH_BASELINE = 300 * 2**20  # resident size of Python + torch before any tensor (measured ~290 MiB)
# what the compiled loops add where the engine loads them (mergelab.kernels; measured 2026-12-02: scipy.linalg
# 18 MiB, numba 52, the loops from numba's cache 49)
_KERNELS_RESIDENT = 120 * 2**20


@dataclass
class MergeSummary:
    method: str
    inputs: list[str]
    tensors: int
    merged_tensors: int
    shards: int
    output_bytes: int
    input_bytes: int
    largest_tensor: str
    largest_bytes: int
    peak_memory_bytes: int
    seconds: float
    taken_from_base: dict[str, list[str]]

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("method", self.method),
            ("inputs", ", ".join(self.inputs)),
            ("tensors", f"{self.tensors} ({self.merged_tensors} merged, the rest copied)"),
            ("output", f"{_size(self.output_bytes)} in {self.shards} shard(s)"),
            ("input read", _size(self.input_bytes)),
            ("largest tensor", f"{self.largest_tensor} ({_size(self.largest_bytes)})"),
            ("peak memory (estimate)", f"about {_size(self.peak_memory_bytes)}"),
            ("time on 2 CPU cores (estimate)", f"about {self.seconds:.2g} s"),
            *([("taken from the base", "; ".join(f"{k}: {len(v)} tensor(s)" for k, v in
                                                  self.taken_from_base.items()))] if self.taken_from_base else []),
        ]


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"


def summarize_merge(config: str | Path | dict[str, Any] | MergeConfig, *, max_shard_size: int | str = "5GB",
                    take_missing_from: str | None = None) -> MergeSummary:
    """Plan the merge of ``config`` (every check a real merge makes) and estimate its cost."""
    cfg, folder = load_config(config)
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise ConfigError(f"--max-shard-size: {exc}") from None
    plan = plan_merge(cfg, folder, take_missing_from=take_missing_from)
    try:
        metas = plan.out_metas
        shards = ShardPlan.build(metas, shard_bytes)
        largest = max(metas, key=lambda n: metas[n].nbytes)
        in_meta = plan.reference.meta(largest)
        n_inputs = len(plan.readers)
        input_bytes = _input_bytes(plan)
        unit = in_meta.nbytes
        after_topk = _streams_with_topk(plan, largest, None)
        if plan.method.elementwise or after_topk or _streams_with_scalars(plan, largest, None, cfg.compute_dtype):
            unit = min(unit, _PIECE_ENTRIES * in_meta.dtype.itemsize)
        numel = unit // in_meta.dtype.itemsize
        # (inputs + 2) pieces in flight (reader thread, merge, writer thread) plus float32 work space: one
        # accumulator for element-wise methods, about three tensors' worth for the sparsifying ones; TIES
        # streamed after its top-k holds the rank work space of the largest tensor for the models found side by
        # side, and about a byte per entry more (peaks of `mergelab merge` TIES in bf16, 2026-12-04: 590-601 MiB at
        # 3 x 0.5 GB, one model's 4 bytes per entry of 32.8 M; 1022-1055 MiB at 3 x 2 GB, two of 65.5 M), plus the
        # other tensors' work space where the largest tensors' passes run first beside them (in-process, 2026-12-05:
        # 3 x 2 GB 878-886 MiB, estimated 869 MB; Llama-2-7B's shapes with 6 layers, in place, 1027-1067 MiB,
        # estimated 1.11 GB)
        work = numel * 4 * (1 if plan.method.elementwise else 3)
        if after_topk:
            per_entry = rank_bytes_per_entry(plan, largest, cfg.compute_dtype)
            side_by_side = _topk_side_by_side(plan, largest, _merge_threads(plan, None), cfg.compute_dtype)
            work = in_meta.numel * (10 if per_entry is None else side_by_side * (per_entry + 1))
            pieces = _pieces(plan, _PIECE_ENTRIES, None, cfg.compute_dtype)
            first = _passes_first(plan, pieces, cfg.compute_dtype)
            if first:  # the other tensors' rules are found beside the largest tensors' passes, run first
                work += _work_space_beside(plan, pieces, first, cfg.compute_dtype)
        peak = _TORCH_BASELINE + (n_inputs + 2) * unit + work
        if plan.method.scalar_pass is not None:  # small tensors' inputs kept by their passes for their pieces
            kept = [sum(_KeptInputs.sizes(plan, n)) for n in plan.names
                    if _streams_with_scalars(plan, n, None, cfg.compute_dtype) and _KeptInputs.fits(plan, n)]
            peak += (1 + _SCALAR_PASSES_AHEAD) * max(kept, default=0)
        if _loads_kernels(plan):
            peak += _KERNELS_RESIDENT
        seconds = input_bytes / 1e9 * _SECONDS_PER_GB.get(cfg.merge_method, _DEFAULT_SECONDS_PER_GB)
        merged = sum(1 for n in plan.names if plan.reference.meta(n).dtype.is_floating_point)
        labels = ([f"{cfg.base_model} (base)"] if plan.base is not None else []) + plan.labels
        return MergeSummary(cfg.merge_method, labels, len(plan.names), merged, len(shards.shards),
                            sum(m.nbytes for m in metas.values()), input_bytes, largest, metas[largest].nbytes,
                            peak, seconds, plan.taken_from_base)
    finally:
        plan.close()
