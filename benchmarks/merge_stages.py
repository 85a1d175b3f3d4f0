"""Where one merge's CPU goes, stage by stage: ``run_merge`` of vs_mergekit's models, its stages' calls timed.

    python benchmarks/merge_stages.py --size 2GB --methods ties ties_stable della della_stable
    PYTHONPATH=/path/to/other/checkout/src python benchmarks/merge_stages.py --size 0.5GB --methods della

Each stage is a function of the engine or of a method (reading a tensor's bytes, the NaN/Inf scan, DELLA's ranks,
TIES' sort replay...), wrapped so that every call adds its ``time.thread_time()`` to the stage: CPU seconds
summed over the threads that ran it (the reader, the two merge threads, the passes), beside the merge's wall
time and its process CPU. Stages nest (DELLA's coins include its ranks) and what no stage names (the engine's
own bookkeeping, torch's allocations) is in the process CPU only. The merge runs twice in one process with
``--direct-io`` (the first loads and checks the compiled loops); the second is reported. glibc's malloc is tuned
as the CLI tunes it (``merge.allocator.recycle_freed_memory``; until 2026-12-05 it was not, and a merge's
buffers above 128 KiB were unmapped and faulted in again). The models are
vs_mergekit's (built under ``--work`` if absent), the configs its ``config_for``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import shutil
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_mergekit import METHODS, build_models, config_for

# stage -> (module, function or Class.method); "name()" wraps the function that name returns (DELLA's coins)
STAGES = {
    "reading": ("mergelab.io.safetensors_file", "SafetensorsFile._read"),
    "writing": ("mergelab.io.writer", "StreamingSafetensorsWriter.write_part"),
    "writing whole tensors": ("mergelab.io.writer", "StreamingSafetensorsWriter.write"),
    "NaN/Inf scans": ("mergelab.merge.engine", "count_nonfinite"),
    "task vectors (DELLA)": ("mergelab.methods.della", "task_vector"),
    "keep probabilities and coins (DELLA, ranks included)": ("mergelab.methods.della", "entry_coins()"),
    "ranks, stable (DELLA)": ("mergelab.methods.della", "stable_ranks"),
    "ranks, sort replayed (DELLA)": ("mergelab.methods.della", "argsort_ranks"),
    "drop, rescale and merge in one pass (DELLA)": ("mergelab.methods.della", "dropped_consensus"),
    "magnitude keys (TIES, Breadcrumbs)": ("mergelab.merge.engine", "checked_task_vector_keys"),
    "keys' histogram": ("mergelab.methods.sparsify", "_histogram"),
    "sort replay at the k-th rank (TIES)": ("mergelab.methods.sparsify", "kept_ties"),
    "sort replay at both edges (Breadcrumbs)": ("mergelab.methods.sparsify", "band_ties"),
    "tied keys' scan (stable)": ("mergelab.methods.sparsify", "equal_positions"),
    "masked sums": ("mergelab.methods.task_vectors", "masked_task_arithmetic"),
    "weighted sum (linear)": ("mergelab.methods.linear", "linear_sum"),
    "weighted task vectors added to the base (task arithmetic)": ("mergelab.methods.task_vectors",
                                                                  "task_arithmetic_sum"),
    "norms and dot products, one pass (Model Stock)": ("mergelab.kernels.row_reductions", "OffsetSums.add"),
    "t · average + (1 − t) · base (Model Stock)": ("mergelab.methods.model_stock", "model_stock_apply"),
    "norms (SLERP)": ("mergelab.kernels.row_reductions", "ChunkSums.norms"),
    "normalised dot product (SLERP)": ("mergelab.kernels.row_reductions", "ChunkSums.normalized_dot"),
    "interpolation (SLERP)": ("mergelab.methods.slerp", "slerp_apply"),
}


class StageClock:
    """CPU seconds per stage, added by every thread that runs one."""

    def __init__(self) -> None:
        self.spent: Counter[str] = Counter()
        self._lock = threading.Lock()

    def timed(self, stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                with self._lock:
                    self.spent[stage] += time.thread_time() - start
        return wrapper

    def install(self) -> None:
        for stage, (module_name, target) in STAGES.items():
            module = importlib.import_module(module_name)
            if target.endswith("()"):
                name = target[:-2]
                made = getattr(module, name)

                def factory(*args: Any, _made: Callable[..., Any] = made, _stage: str = stage, **kwargs: Any) -> Any:
                    return self.timed(_stage, _made(*args, **kwargs))
                setattr(module, name, factory)
            elif "." in target:
                cls_name, attr = target.split(".")
                cls = getattr(module, cls_name)
                setattr(cls, attr, self.timed(stage, getattr(cls, attr)))
            else:
                setattr(module, target, self.timed(stage, getattr(module, target)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.5GB", help="approximate size of each model (bf16), as vs_mergekit's")
    ap.add_argument("--methods", nargs="+", default=["ties", "della_stable"], choices=METHODS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mergelab-bench"))
    args = ap.parse_args()
    from mergelab.merge import engine
    from mergelab.merge.allocator import recycle_freed_memory

    recycle_freed_memory()  # as the CLI does: freed buffers recycled, not unmapped and faulted in again
    warnings.simplefilter("ignore")  # Model Stock's t outside [0, 1] on these random fine-tunes, once per tensor

    clock = StageClock()
    clock.install()
    paths = build_models(args.work / args.size, args.size)
    out = args.work / "stages-out"
    for method in args.methods:
        for _ in range(2):  # the first loads and checks the compiled loops
            clock.spent.clear()
            shutil.rmtree(out, ignore_errors=True)
            time.sleep(2)
            wall, cpu = time.perf_counter(), time.process_time()
            engine.run_merge(config_for(method, paths), out, progress=False, hash_inputs=False, direct_io=True)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        shutil.rmtree(out, ignore_errors=True)
        stages = {k: round(v, 3) for k, v in sorted(clock.spent.items(), key=lambda kv: -kv[1]) if v >= 0.0005}
        print(json.dumps({"size": args.size, "method": method, "wall_s": round(wall, 2), "process_cpu_s": round(cpu, 2),
                          "stage_cpu_s": stages}, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
