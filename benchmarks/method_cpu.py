"""CPU seconds per GB of input of each method's arithmetic on one tensor, on one thread.

    python benchmarks/method_cpu.py --entries 8Mi
    python benchmarks/method_cpu.py --entries 8Mi --baseline /path/to/other/checkout/src
    python benchmarks/method_cpu.py --entries 8Mi --methods ties della

With ``--baseline``, each method is measured on both source trees in turn (each in a fresh process with
that tree first on ``PYTHONPATH``, the baseline first), so the two columns share the machine's load:
the before/after comparison of a change in one run.

A base and two fine-tunes of one bf16 tensor (base ~ N(0, 0.02²), fine-tune = base + N(0, 0.002²): the
shapes of benchmarks/vs_mergekit.py), merged by each method's pure function in bf16 as the benchmark's
configs ask (``dtype: bfloat16``), under the engine's ``one_thread``. Reports process CPU seconds (user +
system, which another job on the same cores changes far less than wall seconds) per GB of input, the
number to multiply by a model's input size for the arithmetic part of a merge's time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path

import torch

from mergelab.io.writer import parse_size
from mergelab.merge.allocator import recycle_freed_memory
from mergelab.merge.core import one_thread
from mergelab.methods.breadcrumbs import breadcrumbs_merge
from mergelab.methods.dare import dare_merge
from mergelab.methods.della import della_merge
from mergelab.methods.linear import linear_merge
from mergelab.methods.model_stock import model_stock_merge
from mergelab.methods.slerp import slerp_merge
from mergelab.methods.sparsify import magnitude_mask
from mergelab.methods.task_arithmetic import task_arithmetic_merge
from mergelab.methods.ties import ties_merge

BF16 = torch.bfloat16


def cases(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> dict[str, tuple[int, Callable[[], object]]]:
    """name -> (number of input tensors read, the call)."""
    def rows(t: torch.Tensor) -> torch.Tensor:  # DELLA ranks within rows: rows of a Llama hidden size
        return t.view(-1, 4096) if t.numel() % 4096 == 0 else t.view(1, -1)

    return {
        "linear": (2, lambda: linear_merge([a, b], [0.5, 0.5])),
        "task_arithmetic": (3, lambda: task_arithmetic_merge(base, [a, b], [0.5, 0.5], dtype=BF16)),
        "ties": (3, lambda: ties_merge(base, [a, b], [0.5, 0.5], [0.3, 0.3], dtype=BF16)),
        "ties: one top-k mask": (2, lambda: magnitude_mask(a - base, 0.3)),
        "dare_ties": (3, lambda: dare_merge(base, [a, b], [0.5, 0.5], [0.3, 0.3], seed=0, consensus="sum",
                                            normalize=True, dtype=BF16)),
        "breadcrumbs": (3, lambda: breadcrumbs_merge(base, [a, b], [0.5, 0.5], [0.3, 0.3], [0.01, 0.01],
                                                     dtype=BF16)),
        "della": (3, lambda: della_merge(rows(base), [rows(a), rows(b)], [0.5, 0.5], [0.3, 0.3], [0.1, 0.1], seed=0,
                                         dtype=BF16)),
        "slerp": (2, lambda: slerp_merge(0.4, base, a)),
        "model_stock": (3, lambda: model_stock_merge(base, [a, b], dtype=BF16)),
    }


def measure(n: int, repeats: int, only: Collection[str] | None = None) -> dict[str, float]:
    """Median CPU seconds per GB of input of each method (or of those in ``only``)."""
    recycle_freed_memory()
    g = torch.Generator().manual_seed(0)
    base32 = torch.randn(n, generator=g) * 0.02
    base = base32.to(BF16)
    a = (base32 + torch.randn(n, generator=g) * 0.002).to(BF16)
    b = (base32 + torch.randn(n, generator=g) * 0.002).to(BF16)
    del base32
    results = {}
    with one_thread():
        for name, (inputs, call) in cases(base, a, b).items():
            if only is not None and name not in only:
                continue
            call()  # warm the allocator
            cpu = []
            for _ in range(repeats):
                start = time.process_time()
                call()
                cpu.append(time.process_time() - start)
            results[name] = statistics.median(cpu) / (inputs * n * 2 / 1e9)
    return results


def _in_process(src: str, args: argparse.Namespace, name: str) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, __file__, "--entries", args.entries, "--repeats", str(args.repeats),
                          "--methods", name, "--json"], env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", default="8Mi", help="entries of the tensor (e.g. 8Mi = 8·2**20)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", help="src folder of another mergelab checkout to compare with")
    ap.add_argument("--methods", nargs="+", help="measure only these (default: every method)")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    n = parse_size(args.entries.replace("Mi", "MiB"))
    if args.json:
        print(json.dumps(measure(n, args.repeats, args.methods)))
        return
    print(f"{n} bf16 entries per tensor; load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    if args.baseline is None:
        print("| method | CPU s per GB of input |\n|---|---:|")
        for name, per_gb in measure(n, args.repeats, args.methods).items():
            print(f"| {name} | {per_gb:.1f} |", flush=True)
    else:
        here = str(Path(__file__).resolve().parents[1] / "src")
        print(f"baseline: {args.baseline}; this: {here}")
        print("| method | CPU s per GB, baseline | CPU s per GB, this | this / baseline |\n|---|---:|---:|---:|")
        for name in cases(*[torch.zeros(1, dtype=BF16)] * 3):
            if args.methods and name not in args.methods:
                continue
            before, after = _in_process(args.baseline, args, name), _in_process(here, args, name)
            print(f"| {name} | {before:.1f} | {after:.1f} | {after / before:.2f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
