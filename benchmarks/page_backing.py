"""What writing a new output costs on this machine, by how long its memory has been free.

    python benchmarks/page_backing.py                 # 0.5 GB, pauses 0 ... 5 s
    python benchmarks/page_backing.py --size 2GB --repeats 3

A merge writes its output into page-cache pages taken from free memory. On a virtual machine whose balloon
driver reports free memory to the host (Linux free page reporting: ``/sys/module/page_reporting`` exists, and
``page_reporting_order`` gives the smallest block reported), a block free for about a second is handed back,
and the next write into it waits for the host to back every page again. This script writes the same bytes
(one reused 2 MiB piece at a time, through the engine's own output files) into a new file after freeing a file
of the same size and pausing 0 ... 5 s, then after the longest pause with the writes split over two threads, and
with ``O_DIRECT`` (no page cache: the device's speed), and prints each beside the write right after the free.

Measured here (2026-12-03, Firecracker guest, 2 vCPUs, ``page_reporting_order`` 9; 0.47 GiB): with raw
``pwrite`` calls from one aligned buffer (this script's first version; medians of 3) 0.31 s right after the free
(0.08-0.56), 0.76 s after 3 s, 0.80 s after 5 s, 1.00 s with two threads, 0.20 s with ``O_DIRECT``
(benchmarks/results/2026-12-03.md); through the output files (``--pauses 0 3 --repeats 2``) 0.24 s, 1.36 s,
1.47 s and 0.29 s (``O_DIRECT`` now including the staging copy the engine pays).
"""

from __future__ import annotations

import argparse
import errno
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from mergelab.io.output_file import open_output_file
from mergelab.io.writer import parse_size

_PIECE = 1 << 21  # 2 MiB: the engine's 1 Mi-entry bf16 pieces


def write_file(path: Path, nbytes: int, *, threads: int = 1, direct: bool = False) -> float:
    """Wall seconds to write ``nbytes`` into a new file at ``path`` in 2 MiB pieces, through the engine's own
    output files (io/output_file.py: ``pwrite`` calls, or ``O_DIRECT`` blocks as ``--direct-io`` writes them).
    Raises ``OSError`` where ``O_DIRECT`` is asked for and refused."""
    if direct and threads != 1:
        raise ValueError("the O_DIRECT file is written by one thread (its staging buffer is shared)")
    piece = memoryview(os.urandom(_PIECE))
    offsets = list(range(0, nbytes, _PIECE))
    start = time.perf_counter()
    out = open_output_file(path, direct=direct)
    if direct and not out.direct:
        out.abandon()
        raise OSError(errno.EINVAL, "O_DIRECT refused by the file system", str(path))
    try:
        def run(share: list[int]) -> None:
            for off in share:
                out.write_at(piece[: min(_PIECE, nbytes - off)], off)

        workers = [threading.Thread(target=run, args=(offsets[k::threads],)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        out.close()
    except BaseException:
        out.abandon()
        raise
    return time.perf_counter() - start


def free_then_write(folder: Path, nbytes: int, pause_s: float, **how: object) -> float:
    """Write a file of ``nbytes`` and delete it (its pages become free memory, backed by the host), wait
    ``pause_s``, then time the write of a new file of the same size."""
    freed = folder / "freed.bin"
    write_file(freed, nbytes)
    freed.unlink()
    time.sleep(pause_s)
    target = folder / "timed.bin"
    try:
        return write_file(target, nbytes, **how)  # type: ignore[arg-type]
    finally:
        target.unlink(missing_ok=True)


def page_reporting() -> str:
    order = Path("/sys/module/page_reporting/parameters/page_reporting_order")
    if not order.exists():
        return "free page reporting: not in this kernel"
    return f"free page reporting: on, page_reporting_order {order.read_text().strip()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.5GB")
    ap.add_argument("--pauses", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 3.0, 5.0])
    ap.add_argument("--repeats", type=int, default=2, help="runs per case (median and range printed)")
    ap.add_argument("--folder", type=Path, default=Path("/tmp/mergelab-bench/page-backing"))
    args = ap.parse_args()
    nbytes = parse_size(args.size)
    args.folder.mkdir(parents=True, exist_ok=True)
    print(f"{nbytes / 2**30:.2f} GiB per write, {os.cpu_count()} CPUs; {page_reporting()}", flush=True)
    longest = max(args.pauses)
    cases: list[tuple[str, float, dict[str, object]]] = [(f"pause {p:g} s", p, {}) for p in args.pauses]
    cases.append((f"pause {longest:g} s, two threads", longest, {"threads": 2}))
    cases.append((f"pause {longest:g} s, O_DIRECT", longest, {"direct": True}))
    baseline = None
    for label, pause, how in cases:
        try:
            runs = [free_then_write(args.folder, nbytes, pause, **how) for _ in range(args.repeats)]
        except OSError as err:  # O_DIRECT on a file system without it
            print(f"  {label:28s} not measured: {err}", file=sys.stderr)
            continue
        median = statistics.median(runs)
        baseline = baseline or median
        print(f"  {label:28s} {median:6.2f} s  ({min(runs):.2f}-{max(runs):.2f})  {median / baseline:5.1f}x "
              f"the write right after the free", flush=True)


if __name__ == "__main__":
    main()
