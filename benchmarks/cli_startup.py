"""Start-up time of the light commands (`mergelab --help`, `--version`, `methods`): goal ≤ 0.5 s.

    python benchmarks/cli_startup.py --repeats 10

Runs each command as a fresh process (the installed `mergelab` console script, PYTHONPATH as given) and
reports the minimum and median wall seconds, beside `python -c pass` (the interpreter alone) and
`python -c 'import torch'` (what these commands used to pay). The machine's load average is printed with
them: other processes sharing the cores slow every start. tests/test_cli_startup.py checks the cause
(nothing heavy imported) without timing anything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = (["--help"], ["--version"], ["methods"], ["methods", "ties"])


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    mergelab = shutil.which("mergelab") or sys.exit("the mergelab console script is not on PATH")
    cases = [("python -c pass", [sys.executable, "-c", "pass"]),
             ("python -c 'import torch'", [sys.executable, "-c", "import torch"])]
    cases += [(f"mergelab {' '.join(c)}", [mergelab, *c]) for c in COMMANDS]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")
    print("| command | min s | median s |\n|---|---:|---:|")
    for label, cmd in cases:
        times = [wall(cmd) for _ in range(args.repeats)]
        print(f"| `{label}` | {min(times):.3f} | {statistics.median(times):.3f} |", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
