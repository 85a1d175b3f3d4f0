"""The engine on a CUDA GPU beside the engine on the CPU of the same machine, in one run, on the same files.

    python benchmarks/gpu_engine.py --size 0.5GB 2GB          # needs a CUDA GPU; writes <date>-gpu.md/.json

Builds the random Llama-style checkpoints of ``vs_mergekit.py`` (a base and two fine-tunes, bf16, 1 GB shards),
times the I/O floor (read every input once, write one output), then for each method runs ``run_merge`` in this
process on ``cpu`` and on ``cuda`` (the compiled CPU loops loaded and a CUDA context made before any timing, the
input digests from a warm cache), and compares the two outputs tensor by tensor: how many are bit-equal and the
largest difference. Prints a table and writes it as Markdown and JSON to ``--report``.

The GPU path moves each tensor's inputs to the GPU, merges there and moves the result back; it does not stream
the whole-tensor passes (top-k rules, scalar passes) in pieces as the CPU path does, and merges one tensor at a
time. This benchmark measures what that path costs on real hardware; CPU CI never runs it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from vs_mergekit import METHODS, RANDOM, build_models, config_for, io_floor

from mergelab.io.file_hashes import cached_digest
from mergelab.kernels.dispatch import warm_up
from mergelab.merge.engine import run_merge


def compare_outputs(a: Path, b: Path) -> dict[str, float | int]:
    """Two merged folders, tensor by tensor: how many tensors, how many bit-equal, the entries that differ,
    the largest absolute difference and the largest in units in the last place (:func:`_ordered`)."""
    equal, total, entries, worst, ulps = 0, 0, 0, 0.0, 0
    for fa in sorted(a.glob("*.safetensors")):
        with safe_open(str(fa), "pt") as ha, safe_open(str(b / fa.name), "pt") as hb:
            for name in ha.keys():  # noqa: SIM118 (safe_open is not a dict)
                x, y = ha.get_tensor(name), hb.get_tensor(name)
                total += 1
                if torch.equal(x, y):
                    equal += 1
                    continue
                entries += int((x != y).sum())
                worst = max(worst, float((x.float() - y.float()).abs().max()))
                if x.is_floating_point():
                    ulps = max(ulps, int((_ordered(x) - _ordered(y)).abs().max()))
    return {"tensors": total, "bit_equal": equal, "entries_differing": entries, "max_abs_diff": worst,
            "max_ulps": ulps}


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Float bit patterns as integers in the floats' order (-0.0 and 0.0 both 0): their difference counts the
    representable numbers between two values, across zero too."""
    bits = x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]).long()
    magnitude = bits & ((1 << (8 * x.element_size() - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def timed_merge(cfg: Path, out: Path, device: str) -> tuple[float, int]:
    """Seconds of one ``run_merge`` and the peak GPU memory it allocated (0 on the CPU)."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run_merge(cfg, out, progress=False, device=device)
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated() if device != "cpu" else 0


def gpu_facts() -> dict[str, str]:
    smi = shutil.which("nvidia-smi")
    driver = ""
    if smi:
        done = subprocess.run([smi, "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True)
        driver = done.stdout.strip()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"gpu": gpu, "driver_and_memory": driver, "torch": torch.__version__,
            "cuda": str(torch.version.cuda), "cpus": str(os.cpu_count()), "machine": platform.machine()}


def measure_size(size_text: str, args: argparse.Namespace, on_method: Callable[[dict], None]) -> dict:
    """Every method at one model size; ``on_method`` gets the size's numbers so far after each method."""
    work = args.work / size_text
    work.mkdir(parents=True, exist_ok=True)
    print(f"building 3 Llama-style bf16 models ({size_text}) in {work} ...", flush=True)
    paths = build_models(work, size_text)
    inputs = [f for p in paths for f in sorted(p.glob("*.safetensors"))]
    out_bytes = sum(f.stat().st_size for f in paths[0].glob("*.safetensors"))
    io_floor(paths, 0, work / "scratch")  # warm the page cache once
    floor = min(io_floor(paths, out_bytes, work / "scratch") for _ in range(3))
    hash_cache = work / "hash-cache"
    os.environ["MERGELAB_HASH_CACHE"] = str(hash_cache)
    for f in inputs:
        cached_digest(f, cache=hash_cache)
    print(f"  I/O floor {floor:.2f} s", flush=True)
    rows: list[dict] = []
    numbers = {"size": size_text, "input_bytes": sum(f.stat().st_size for f in inputs), "floor_s": floor, "rows": rows}
    for method in args.methods:
        cfg = work / f"{method}.yml"
        cfg.write_text(yaml.safe_dump(config_for(method, paths)))
        with_cpu = args.cpu_sizes is None or size_text in args.cpu_sizes
        cpu_runs = [timed_merge(cfg, work / "out-cpu", "cpu")[0] for _ in range(args.cpu_repeats if with_cpu else 0)]
        gpu = [timed_merge(cfg, work / "out-cuda", args.device) for _ in range(args.repeats)]
        same = compare_outputs(work / "out-cpu", work / "out-cuda") if cpu_runs else {
            "tensors": 0, "bit_equal": 0, "entries_differing": 0, "max_abs_diff": float("nan"), "max_ulps": 0}
        row = {"method": method, "cpu_runs_s": cpu_runs, "cuda_runs_s": [s for s, _ in gpu],
               "cuda_peak_mib": max(p for _, p in gpu) / 2**20, **same}
        rows.append(row)
        cpu_s = min(cpu_runs, default=float("nan"))
        print(f"  {method:16s} cpu {cpu_s:6.2f} s ({cpu_s / floor:5.2f}x floor)  "
              f"cuda {min(row['cuda_runs_s']):6.2f} s ({min(row['cuda_runs_s']) / floor:5.2f}x floor; runs "
              f"{', '.join(f'{s:.2f}' for s in row['cuda_runs_s'])})  GPU peak {row['cuda_peak_mib']:7.0f} MiB  "
              f"bit-equal {same['bit_equal']}/{same['tensors']}, {same['entries_differing']} entries differ, "
              f"max |diff| {same['max_abs_diff']:.3g} ({same['max_ulps']} ulps)", flush=True)
        for d in ("out-cpu", "out-cuda"):
            shutil.rmtree(work / d, ignore_errors=True)
        on_method(numbers)  # a run cut short keeps the methods it finished
    return numbers


def markdown(facts: dict[str, str], cuda_init_s: float, kernels_s: float, sizes: list[dict]) -> str:
    lines = [f"## GPU engine, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
             "",
             f"{facts['gpu']} (driver, memory: {facts['driver_and_memory']}), torch {facts['torch']} (CUDA "
             f"{facts['cuda']}), {facts['cpus']} CPUs. `python benchmarks/gpu_engine.py`: `run_merge` in one "
             f"process, cpu (a method's first run compiles its loops) then cuda per method; CUDA context made before "
             f"timing ({cuda_init_s:.2f} s), compiled CPU loops {facts['compiled_cpu_loops']} before timing "
             f"({kernels_s:.2f} s). *bit-equal*: output tensors identical between the cpu and cuda merges "
             f"({', '.join(RANDOM)} draw masks on the CPU on both).", ""]
    for s in sizes:
        lines += [f"### 3 × {s['size']} ({s['input_bytes'] / 1e9:.2f} GB of input), I/O floor {s['floor_s']:.2f} s",
                  "", "| method | cpu s (fastest) | cpu/floor | cuda s (fastest) | cuda/floor | cuda runs s "
                  "| GPU peak MiB | bit-equal tensors | entries differing | max abs diff (ulps) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            cpu, gpu = min(r["cpu_runs_s"], default=float("nan")), min(r["cuda_runs_s"])
            lines.append(f"| {r['method']} | {cpu:.2f} | {cpu / s['floor_s']:.2f} | {gpu:.2f} | "
                         f"{gpu / s['floor_s']:.2f} | {', '.join(f'{x:.2f}' for x in r['cuda_runs_s'])} | "
                         f"{r['cuda_peak_mib']:.0f} | {r['bit_equal']}/{r['tensors']} | {r['entries_differing']} | "
                         f"{r['max_abs_diff']:.3g} ({r['max_ulps']}) |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", nargs="+", default=["0.5GB", "2GB"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mergelab-gpu-bench"))
    ap.add_argument("--repeats", type=int, default=2, help="cuda runs per method (the fastest reported)")
    # the first CPU merge of a method in a fresh install compiles its loops (numba, once per signature, then
    # cached): SLERP at 3 x 0.5 GB took 4.67 s then 1.01 s with an empty NUMBA_CACHE_DIR on the 2-core VM
    # (2026-12-04), and every CPU number of the first H200 runs was such a first merge
    ap.add_argument("--cpu-repeats", type=int, default=2, help="CPU runs per method (the fastest reported)")
    ap.add_argument("--cpu-sizes", nargs="+", help="sizes at which the CPU also merges (default: every size)")
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU (cpu: a dry run of this script)")
    ap.add_argument("--report", type=Path,
                    default=Path(__file__).parent / "results" / f"{dt.date.today():%Y-%m-%d}-gpu.md")
    args = ap.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: this benchmark compares the engine on a GPU with the CPU")
    start = time.perf_counter()
    if args.device != "cpu":
        torch.zeros(1, device=args.device)
        torch.cuda.synchronize()
    cuda_init_s = time.perf_counter() - start
    start = time.perf_counter()
    loaded = warm_up()
    kernels_s = time.perf_counter() - start
    facts = {**gpu_facts(), "compiled_cpu_loops": "loaded" if loaded else "not loaded (numba missing or off)"}
    print(facts, f"CUDA context {cuda_init_s:.2f} s, compiled loops {kernels_s:.2f} s", flush=True)
    done: list[dict] = []

    def write(current: dict) -> None:
        sizes = [*done, current]
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(markdown(facts, cuda_init_s, kernels_s, sizes) + "\n")
        args.report.with_suffix(".json").write_text(json.dumps(
            {"facts": facts, "cuda_init_s": cuda_init_s, "kernels_s": kernels_s, "sizes": sizes}, indent=1))

    for size in args.size:
        done.append(measure_size(size, args, write))
    # why the CPU side may be slower on this machine than on the 2-core one: a compiled loop whose check
    # against torch failed here runs as eager torch, and a torch whose sort differs from the replay sorts
    from mergelab.kernels import dispatch
    from mergelab.methods.std_sort import matches_torch_sort

    failed = sorted(f"{n}/{d}" for (n, d), ok in dispatch._verdicts.items() if not ok)
    with args.report.open("a") as report:
        report.write(f"Compiled CPU loops that failed their check against torch here (eager torch instead): "
                     f"{', '.join(failed) or 'none'}; torch's CPU sort replayed exactly: {matches_torch_sort()}; "
                     f"torch threads {torch.get_num_threads()}, CPU capability "
                     f"{torch.backends.cpu.get_cpu_capability()}.\n")
    print(args.report.read_text())


if __name__ == "__main__":
    main()
