"""Where the engine's time goes on its threads: CPU seconds of each thread of one merge, beside the I/O floor.

    python benchmarks/engine_threads.py                          # every method of vs_mergekit, 3 × 0.5 GB
    python benchmarks/engine_threads.py --size 2GB --methods linear ties
    python benchmarks/engine_threads.py --size 0.5GB --report    # and append the table to results/<date>.md

The models and configs are benchmarks/vs_mergekit.py's (made once under --work). Each method runs in a fresh
process: ``run_merge`` with every input's digest from the warm digest cache (the *engine* of vs_mergekit),
allocator tuned as the CLI tunes it. Every thread's CPU time (``time.thread_time``) is taken as it ends,
grouped by the engine's thread names: the reader (``mergelab-read``: copies each piece out of the page
cache), the merge threads (``mergelab-merge``: the method and the NaN/Inf scan of its result), the writer
(``mergelab-write``), the whole-tensor passes (``mergelab-pass``: SLERP's and Model Stock's scalars, TIES'
rules; the next tensor's while this one's pieces merge), the threads that find two models' top-k rules at once
(``mergelab-topk``), the threads that draw DARE's and DELLA's coins one piece ahead (``mergelab-coins``) and
the main thread (everything else: hand-offs, the plan, the record).

Reading the table: the engine's wall time cannot be less than its busiest stage, nor than its total CPU over
the 2 cores. Where the wall time is near CPU / 2, the cores are the limit and only less CPU helps; where it is
near one stage's CPU, that stage is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # vs_mergekit, beside this file
from vs_mergekit import IDLE_S, METHODS, build_models, config_for, io_floor, settle

GROUPS = ("MainThread", "mergelab-read", "mergelab-merge", "mergelab-pass", "mergelab-topk", "mergelab-coins",
          "mergelab-write", "mergelab-hash")


def _group(thread_name: str) -> str:
    return next((g for g in GROUPS if thread_name.startswith(g)), "other")


def one_merge(cfg_path: Path, out: Path, direct_io: bool = False, idle_s: float = 0.0) -> dict[str, float]:
    """Run one merge in this process: wall seconds, process CPU seconds and CPU seconds per thread group.
    ``idle_s``: seconds of quiet before the merge (vs_mergekit.IDLE_S: the memory the output goes into is then
    what the VM has handed back to its host, as the floor's)."""
    from mergelab.kernels.dispatch import warm_up
    from mergelab.merge.allocator import recycle_freed_memory
    from mergelab.merge.engine import run_merge

    recycle_freed_memory()
    warm_up()  # the compiled loops load once per process, like an import: not part of the merge's threads
    per_group: dict[str, float] = defaultdict(float)
    lock = threading.Lock()
    run = threading.Thread.run

    def timed_run(self: threading.Thread) -> None:
        try:
            run(self)
        finally:
            with lock:
                per_group[_group(self.name)] += time.thread_time()

    threading.Thread.run = timed_run  # type: ignore[method-assign]
    time.sleep(idle_s)
    wall, cpu, main = time.perf_counter(), time.process_time(), time.thread_time()
    run_merge(cfg_path, out, progress=False, direct_io=direct_io)
    per_group["MainThread"] += time.thread_time() - main
    result = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    return result | {g: per_group.get(g, 0.0) for g in (*GROUPS, "other")}


def measure(method: str, work: Path, extra: list[str]) -> dict[str, float]:
    paths = [work / n for n in ("base", "ft1", "ft2")]
    cfg_path = work / f"{method}.yml"
    cfg_path.write_text(yaml.safe_dump(config_for(method, paths), sort_keys=False))
    out = work / "threads-out"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "MERGELAB_HASH_CACHE": str(work / "hash-cache")}
    # warm the digests and the page cache: one merge first, not timed
    for _ in range(2):
        shutil.rmtree(out, ignore_errors=True)
        settle()
        proc = subprocess.run([sys.executable, __file__, "--one", str(cfg_path), "--out", str(out), *extra], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{method}: {proc.stderr[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(size: str, in_bytes: int, floor: float, rows: dict[str, dict[str, float]]) -> str:
    lines = [f"## {size}: CPU seconds per thread of one merge (3 models, {in_bytes / 1e9:.2f} GB of input; "
             f"floor {floor:.2f} s)", "",
             "| method | wall s | × floor | CPU s | CPU / 2 cores ÷ floor | main | read | merge | pass | top-k "
             "| coins | write |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, r in rows.items():
        lines.append(f"| {method} | {r['wall']:.2f} | {r['wall'] / floor:.2f} | {r['cpu']:.2f} | "
                     f"{r['cpu'] / 2 / floor:.2f} | {r['MainThread']:.2f} | {r['mergelab-read']:.2f} | "
                     f"{r['mergelab-merge']:.2f} | {r['mergelab-pass']:.2f} | {r['mergelab-topk']:.2f} | "
                     f"{r.get('mergelab-coins', 0.0):.2f} | {r['mergelab-write']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.5GB", help="approximate size of each model (bf16)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mergelab-bench"))
    ap.add_argument("--report", type=Path, nargs="?", const=True, default=None,
                    help="append the table to this Markdown file (no value: results/<date>.md)")
    ap.add_argument("--direct-io", action="store_true", help="merge with run_merge(direct_io=True)")
    ap.add_argument("--idle", type=float, default=IDLE_S,
                    help="seconds of quiet before each timed merge and floor (vs_mergekit.IDLE_S)")
    ap.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one_merge(args.one, args.out, args.direct_io, args.idle)))
        return
    work = args.work / args.size
    paths = build_models(work, args.size)
    in_bytes = sum(f.stat().st_size for p in paths for f in p.glob("*.safetensors"))
    out_bytes = sum(f.stat().st_size for f in paths[0].glob("*.safetensors"))
    floor = min(io_floor(paths, out_bytes, work / "scratch", idle_s=args.idle) for _ in range(3))
    extra = ["--idle", str(args.idle)] + (["--direct-io"] if args.direct_io else [])
    rows = {}
    for method in args.methods:
        rows[method] = measure(method, work, extra)
        r = rows[method]
        print(f"  {method:16s} wall {r['wall']:6.2f} s  CPU {r['cpu']:6.2f} s  main {r['MainThread']:.2f}  "
              f"read {r['mergelab-read']:.2f}  merge {r['mergelab-merge']:.2f}  pass {r['mergelab-pass']:.2f}  "
              f"top-k {r['mergelab-topk']:.2f}  coins {r.get('mergelab-coins', 0.0):.2f}  "
              f"write {r['mergelab-write']:.2f}", flush=True)
    text = table(args.size, in_bytes, floor, rows)
    print(text)
    if args.report is not None:
        report = args.report if args.report is not True else \
            Path(__file__).resolve().parent / "results" / f"{time.strftime('%Y-%m-%d')}.md"
        with report.open("a") as f:
            f.write(f"\n`python benchmarks/engine_threads.py {' '.join(sys.argv[1:])}` ({time.strftime('%H:%M')} UTC, "
                    f"load {os.getloadavg()[0]:.1f})\n\n{text}")


if __name__ == "__main__":
    main()
