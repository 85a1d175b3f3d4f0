"""What a second core adds on this machine: one thread against two, side by side, for the kinds of work a merge does.

    python benchmarks/core_scaling.py                 # the inputs of vs_mergekit's 3 x 0.5 GB models
    python benchmarks/core_scaling.py --size 2GB --rounds 3

The engine's wall time cannot be less than its work over what the cores deliver together, and two cores deliver
twice one core's work only where the work does not wait on memory. Each round times, on one thread and then split
over two threads (the same bytes or the same entries in all):

- *copy*: reading every input file of the merge out of the page cache with ``readinto`` into one reused buffer
  per thread (what the I/O floor and the engine's reader do);
- *stream*: the fused weighted sum of three bfloat16 inputs into a bfloat16 output (the compiled ``linear``
  loop, as the engine runs it on 1 Mi-entry pieces), over inputs too large for the caches;
- *in cache*: the same loop over one piece that stays in the core's cache, again and again.

*speedup* is the one-thread wall time over the two-thread wall time (2.00: the cores add up); *CPU two/one* is the
CPU time the same work took on two threads over one (above 1: each thread was slowed by the other, on memory it
shares). The models and their files are vs_mergekit's (made once under --work).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # vs_mergekit, beside this file
from vs_mergekit import build_models, settle

_PIECE = 1 << 20  # entries per piece, as the engine streams an element-wise merge (merge/engine.py)


def timed(jobs: list[Callable[[], None]]) -> tuple[float, float]:
    """Wall seconds of running ``jobs`` each on its own thread, all at once, and their CPU seconds together."""
    cpu = [0.0] * len(jobs)

    def run(k: int) -> None:
        start = time.thread_time()
        jobs[k]()
        cpu[k] = time.thread_time() - start

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, sum(cpu)


def copy_job(files: list[Path], part: int = 0, parts: int = 1) -> Callable[[], None]:
    """Read part ``part`` of ``parts`` equal byte ranges of every file."""
    def job() -> None:
        buf = bytearray(_PIECE * 2)  # one bf16 piece
        for f in files:
            size = f.stat().st_size
            start, stop = size * part // parts, size * (part + 1) // parts
            with open(f, "rb") as fh:
                fh.seek(start)
                while start < stop:
                    view = memoryview(buf)[: min(len(buf), stop - start)]
                    got = fh.readinto(view)
                    if not got:
                        break
                    start += got
    return job


def sum_job(module: object, inputs: tuple[np.ndarray, ...], out: np.ndarray, a: int, b: int,
            repeats: int = 1) -> Callable[[], None]:
    weights, scale = np.full(len(inputs), 1 / 3, np.float32), np.float32(1.0)

    def job() -> None:
        for _ in range(repeats):
            for s in range(a, b, _PIECE):
                e = min(b, s + _PIECE)
                module.linear_loop(tuple(x[s:e] for x in inputs), weights, scale, out[s:e])  # type: ignore[attr-defined]
    return job


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.5GB", help="vs_mergekit's model size whose files are copied")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mergelab-bench"))
    ap.add_argument("--rounds", type=int, default=5, help="alternations of one and two threads (medians shown)")
    args = ap.parse_args()

    from mergelab.kernels.dispatch import loops, warm_up
    if not warm_up():
        raise SystemExit("the compiled loops are off here (numba missing or MERGELAB_KERNELS=0): nothing to time")
    module = loops()
    folders = build_models(args.work / args.size, args.size)
    files = sorted(f for folder in folders for f in folder.glob("*.safetensors"))
    entries = 64 * _PIECE  # 128 MiB per bf16 input: far past the 480 MiB L3 when four are streamed
    rng = np.random.default_rng(0)
    inputs = tuple(rng.integers(0x3C00, 0x3F00, entries, dtype=np.uint16) for _ in range(3))
    for x in inputs:
        x.setflags(write=False)
    out = np.empty(entries, np.uint16)
    half = entries // 2
    work: dict[str, tuple[list[Callable[[], None]], list[Callable[[], None]]]] = {
        "copy": ([copy_job(files)], [copy_job(files, 0, 2), copy_job(files, 1, 2)]),
        "stream": ([sum_job(module, inputs, out, 0, entries)],
                   [sum_job(module, inputs, out, 0, half), sum_job(module, inputs, out, half, entries)]),
        "in cache": ([sum_job(module, inputs, out, 0, _PIECE, repeats=64)],
                     [sum_job(module, inputs, out, 0, _PIECE // 2, repeats=64),
                      sum_job(module, inputs, out, _PIECE // 2, _PIECE, repeats=64)]),
    }
    copied = sum(f.stat().st_size for f in files)
    for one, _ in work.values():  # page cache and memory warmed for every job
        timed(one)
    print(f"copy: {len(files)} files, {copied / 1e9:.2f} GB; stream: 3 x {entries:,} bf16 entries; in cache: "
          f"3 x {_PIECE:,} entries, 64 times; {args.rounds} rounds, one and two threads alternating")
    print("| work | one thread s | two threads s | speedup | CPU s one / two | CPU two/one |")
    print("|---|---|---|---|---|---|")
    for name, (one, two) in work.items():
        runs: list[tuple[float, float, float, float]] = []
        for _ in range(args.rounds):
            settle()
            w1, c1 = timed(one)
            w2, c2 = timed(two)
            runs.append((w1, w2, c1, c2))
        w1, w2, c1, c2 = (statistics.median(r[k] for r in runs) for k in range(4))
        speedups = sorted(r[0] / r[1] for r in runs)
        print(f"| {name} | {w1:.3f} | {w2:.3f} | {w1 / w2:.2f} ({speedups[0]:.2f}-{speedups[-1]:.2f}) | "
              f"{c1:.3f} / {c2:.3f} | {c2 / c1:.2f} |", flush=True)


if __name__ == "__main__":
    main()
