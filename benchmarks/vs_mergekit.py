"""mergelab against mergekit on the same merges, in the same run: wall time, peak RSS, output equality.

    python benchmarks/vs_mergekit.py --size 0.5GB 2GB      # 3 models of ~0.5 GB, then of ~2 GB, bf16
    python benchmarks/vs_mergekit.py --size 2GB --methods linear ties
    python benchmarks/vs_mergekit.py --size 7Bx6 --direct-io     # Llama-2-7B's tensors, 6 of its layers

Builds random Llama-style checkpoints (a base and two fine-tunes = base + small noise, bf16, 1 GB shards of
safetensors) once under --work, then for each method runs `mergelab merge` and `mergekit-yaml` as
subprocesses with the same YAML, sampling the RSS of each process tree every 20 ms. The I/O floor is the
time to read every input file once and write one output of the merged size, measured in the same run.
Page cache is warm for every run (inputs are read once before timing). `mergelab merge` runs with the
input-hash cache off (every input hashed, as on a first merge of new files); the *engine* runs with it warm
(a repeated merge of the same files; io/file_hashes.py). The load average of the machine is recorded beside
each method: other processes on the same cores slow every tool. Prints a table of ratios
(mergelab/mergekit, mergelab/floor) per size and writes them all as Markdown to --report
(default benchmarks/results/<date>.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
import yaml
from safetensors import safe_open

from mergelab.io.output_file import open_output_file
from mergelab.io.writer import parse_size, write_state_dict

# This VM (a Firecracker guest with free page reporting: /sys/module/page_reporting) hands memory that stayed free
# for about a second back to its host, and a write into such memory waits for the host to back every page: a new
# 0.47 GiB file took 0.8-1.35 s to write that way and 0.09-0.46 s right after another file was deleted
# (benchmarks/page_backing.py, 2026-12-03 01:05 UTC). A merge's output meets the first kind unless a file was
# deleted just before; the floor's back-to-back runs had met the second, and each engine run a mixture (3 x 2 GB
# linear: 1.81-3.33 s in three runs). Both are timed after IDLE_S seconds of quiet, to meet the same state; the
# floor of back-to-back runs is kept beside it as the *hot* floor. The quiet does not always make memory cold (at
# 3 x 0.5 GB on 2026-12-03 the floor after it still wrote into backed memory), so --direct-io adds the one pair
# the VM's state does not move: the engine with --direct-io over a floor that also writes with O_DIRECT.
IDLE_S = 3.0
# mergelab's `tie_order: stable` (methods/sparsify.py), timed against mergekit's merge of the same method: the
# magnitudes tied at a kept rank's edge are kept by flat index instead of in torch's CPU sort order
STABLE = {"ties_stable": "ties", "breadcrumbs_stable": "breadcrumbs", "della_stable": "della"}
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "slerp", "model_stock", *STABLE)
RANDOM = ("dare_ties", "della")  # random masks: mergekit and mergelab draw them from different generators


# Llama-2-7B's tensor shapes (hidden 4096, MLP 11008, vocabulary 32000, untied head: 6.74 B parameters in 32
# layers); "7Bx6" is 6 of its 32 layers, 2.96 GB per model in bf16: every tensor 7B-sized, so a merge's peak (set
# by its largest tensor, the 131 M-entry embedding and head) and its per-GB rates are those of the whole model
LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "vocab_size": 32000,
             "num_attention_heads": 32, "num_key_value_heads": 32}
_SEVEN_B_LAYERS = re.compile(r"7Bx(\d+)")


def llama_config(size_text: str) -> dict[str, int]:
    """The Llama shape of a benchmark size: ``"0.5GB"``, ``"2GB"`` (hidden 1024 below 1.5 GB, else 2048; as many
    layers as come closest to that many bf16 bytes) or ``"7BxL"`` (Llama-2-7B's shapes, ``L`` of its layers)."""
    seven_b = _SEVEN_B_LAYERS.fullmatch(size_text)
    if seven_b:
        layers = int(seven_b.group(1))
        if not 1 <= layers <= LLAMA2_7B["num_hidden_layers"]:
            raise SystemExit(f"--size {size_text}: a 7B-shaped size takes 1 to 32 layers (7Bx1 ... 7Bx32)")
        return {**LLAMA2_7B, "num_hidden_layers": layers}
    try:
        target_bytes = parse_size(size_text)
    except ValueError as exc:
        raise SystemExit(f"--size {size_text}: {exc}, or 7BxL (Llama-2-7B's shapes, L of its 32 layers)") from None
    hidden = 1024 if target_bytes < 1.5e9 else 2048
    inter, vocab = int(hidden * 2.6875), 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((target_bytes / 2 - fixed) / per_layer))
    return {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers, "vocab_size": vocab,
            "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64}


def build_models(work: Path, size_text: str, seed: int = 0) -> list[Path]:
    import transformers as tf

    shape = llama_config(size_text)
    cfg = tf.LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False, torch_dtype="bfloat16",
                         architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        names = {n: tuple(p.shape) for n, p in tf.LlamaForCausalLM(cfg).state_dict().items()}
    paths = []
    for i, name in enumerate(("base", "ft1", "ft2")):
        folder = work / name
        paths.append(folder)
        if list(folder.glob("*.safetensors")):
            cfg.save_pretrained(folder)
            continue
        g = torch.Generator().manual_seed(seed)  # same base in every model
        noise = torch.Generator().manual_seed(seed + 100 + i)

        def tensors(g: torch.Generator = g, noise: torch.Generator = noise, i: int = i):
            for n, s in names.items():
                t = torch.randn(s, generator=g) * 0.02
                if i:
                    t += torch.randn(s, generator=noise) * 0.002
                yield n, t.to(torch.bfloat16)

        write_state_dict(folder, list(tensors()), max_shard_size="1GB")
        cfg.save_pretrained(folder)
    return paths


def config_for(method: str, paths: list[Path]) -> dict:
    if method in STABLE:
        return {**config_for(STABLE[method], paths), "parameters": {"tie_order": "stable"}}
    base, a, b = (str(p) for p in paths)
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (base, a, b)],
                "dtype": "bfloat16"}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": a}],
                "parameters": {"t": 0.4}, "dtype": "bfloat16"}
    if method == "model_stock":
        return {"merge_method": method, "base_model": base, "dtype": "bfloat16",
                "models": [{"model": m} for m in (a, b)]}
    params = {"weight": 0.5}
    if method in ("ties", "dare_ties", "breadcrumbs", "della"):
        params["density"] = 0.3
    if method == "breadcrumbs":
        params["gamma"] = 0.01
    if method == "della":
        params["epsilon"] = 0.1
    return {"merge_method": method, "base_model": base, "dtype": "bfloat16",
            "models": [{"model": m, "parameters": params} for m in (a, b)]}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (bytes, whole process tree) and CPU seconds (user + system, every process it
    waited for) of a command. CPU seconds change far less than wall seconds when other jobs share the cores."""
    settle()
    cpu_before = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = 0
    ps = psutil.Process(proc.pid)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    stop.set()
    t.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.decode()[-2000:]}")
    return wall, peak, _children_cpu() - cpu_before


_ENGINE_ONLY = """
import sys, time
from mergelab.merge.allocator import recycle_freed_memory
from mergelab.merge.engine import run_merge
from mergelab.kernels.dispatch import warm_up
recycle_freed_memory()  # as the CLI does
warm_up()  # the compiled loops load once per process, like an import (kernels_seconds)
time.sleep(float(sys.argv[4]))  # IDLE_S: the output's memory in the floor's state
start = time.perf_counter()
run_merge(sys.argv[1], sys.argv[2], progress=False, device=sys.argv[3], direct_io=sys.argv[5] == "direct")
print(time.perf_counter() - start)
"""


def engine_seconds(cfg_path: Path, out: Path, device: str, hash_cache: Path, idle_s: float = IDLE_S,
                   direct_io: bool = False) -> float:
    """Seconds of ``run_merge`` alone, timed inside a fresh process after ``idle_s`` of quiet: the CLI's wall
    time less the start of Python and the import of torch (which every torch-based tool pays; see
    ``import_seconds``). Input digests come from the warm ``hash_cache``."""
    shutil.rmtree(out, ignore_errors=True)
    settle()
    done = subprocess.run([sys.executable, "-c", _ENGINE_ONLY, str(cfg_path), str(out), device, str(idle_s),
                           "direct" if direct_io else "buffered"],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "MERGELAB_HASH_CACHE": str(hash_cache)})
    shutil.rmtree(out, ignore_errors=True)
    return float(done.stdout.strip().splitlines()[-1])


def kernels_seconds() -> float:
    """Wall seconds of loading mergelab's compiled loops (numba; once per process, after torch): the CLI does
    it on a thread of its own during a merge of 1 GiB of input or more; *engine* times exclude it."""
    done = subprocess.run([sys.executable, "-c", "import time, torch; from mergelab.kernels.dispatch import warm_up; "
                           "t = time.perf_counter(); warm_up(); print(time.perf_counter() - t)"],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def import_seconds() -> float:
    """Wall seconds of ``python -c 'import torch'``: the part of any torch tool's time no engine can cut."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - start


def settle() -> None:
    """Write back the dirty pages that earlier runs left (outputs written, some deleted since) before a timed
    run: the kernel throttles a writer once dirty pages pass its threshold, so a run paid for the outputs of
    the runs before it (linear's engine at 3 × 2 GB took 4.87 s right after mergekit's run, 1.35 s alone)."""
    os.sync()


def io_floor(paths: list[Path], out_bytes: int, scratch: Path, idle_s: float = 0.0, direct: bool = False) -> float:
    """Seconds to read every input file once and write ``out_bytes`` (the floor for a streamed merge), timed
    after ``idle_s`` of quiet (``IDLE_S``: the output goes into memory the VM has handed back to its host);
    ``direct``: written with ``O_DIRECT`` as ``--direct-io`` writes (io/output_file.py), buffered if refused.

    One 16 MiB buffer serves every read and every write: a fresh zero-filled ``bytearray`` per read and a sliced
    copy of the block per write had made the floor itself 2.3x as long at 3 x 0.5 GB (0.75 s against 0.32 s,
    medians of 5 alternating runs, load ~6; benchmarks/results/linear_stages_2026-12-01.md), so every
    engine/floor ratio measured before 2026-12-01 17:00 UTC is about half what this floor gives."""
    buf = bytearray(os.urandom(1 << 24))
    view = memoryview(buf)
    scratch.mkdir(parents=True, exist_ok=True)
    settle()
    time.sleep(idle_s)
    start = time.perf_counter()
    for p in paths:
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.readinto(buf):
                    pass
    out = open_output_file(scratch / "floor.bin", direct=direct)
    if direct and not out.direct:  # a buffered write labelled as the direct floor would mislead
        out.abandon()
        raise SystemExit(f"O_DIRECT refused under {scratch}: no direct floor there (drop --direct-io or pick "
                         "another --work)")
    for offset in range(0, out_bytes, len(buf)):
        out.write_at(view[: min(out_bytes - offset, len(buf))], offset)
    out.close()
    elapsed = time.perf_counter() - start
    (scratch / "floor.bin").unlink()
    return elapsed


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[k] = h.get_tensor(k)
    return out


def output_differences(a: Path, b: Path) -> tuple[float, float]:
    """The largest absolute difference of two merges' entries, and the fraction of entries that differ."""
    ta, tb = load_all(a), load_all(b)
    if set(ta) != set(tb):
        return float("inf"), 1.0
    differ = sum(int(torch.count_nonzero(ta[k] != tb[k])) for k in ta)
    return (max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta),
            differ / sum(t.numel() for t in ta.values()))


def measure_size(size_text: str, args: argparse.Namespace,
                 on_method: Callable[[str, dict], None] | None = None) -> tuple[str, dict]:
    """Run every method at one model size; the Markdown section and the raw numbers (also passed to
    ``on_method`` after every method)."""
    from mergelab.io.file_hashes import DEFAULT_DIGEST, DIGEST_ALGORITHMS, cached_digest, file_digest

    shape = _shape_text(size_text)  # a size it cannot read stops here, before any folder is made
    work = args.work / size_text
    work.mkdir(parents=True, exist_ok=True)
    print(f"building 3 Llama-style bf16 models ({shape}) in {work} ...", flush=True)
    paths = build_models(work, size_text)
    inputs = [f for p in paths for f in sorted(p.glob("*.safetensors"))]
    in_bytes = sum(f.stat().st_size for f in inputs)
    out_bytes = sum(f.stat().st_size for f in paths[0].glob("*.safetensors"))
    io_floor(paths, 0, work / "scratch")  # warm the page cache once
    # The fastest of several: the floor is a lower bound, and 10 back-to-back runs at 3 × 0.5 GB took 0.29-1.75 s
    # on this VM (2026-12-02 15:20 UTC; the median of 3 had given 0.24 s and 0.63 s an hour apart). Back to back,
    # each run writes into the memory the last one freed (hot); after IDLE_S, into memory handed back (IDLE_S).
    floor_hot = min(io_floor(paths, out_bytes, work / "scratch") for _ in range(5))
    floor = min(io_floor(paths, out_bytes, work / "scratch", idle_s=args.idle) for _ in range(3))
    floor_direct = min((io_floor(paths, out_bytes, work / "scratch", idle_s=args.idle, direct=True)
                        for _ in range(3 if args.direct_io else 0)), default=float("nan"))
    floors = (floor, floor_hot, floor_direct)
    print(f"  I/O floor {floor:.2f} s after {args.idle:g} s of quiet, {floor_hot:.2f} s back to back, "
          f"{floor_direct:.2f} s with O_DIRECT", flush=True)
    torch_import = statistics.median(import_seconds() for _ in range(3))
    kernels_s = statistics.median(kernels_seconds() for _ in range(3))
    hash_cache = work / "hash-cache"
    hash_s: dict[str, float] = {}
    for algorithm in DIGEST_ALGORITHMS:  # what a cold hash costs (the cache folder may be warm from an earlier run)
        start = time.perf_counter()
        for f in inputs:
            file_digest(f, algorithm)
        hash_s[algorithm] = time.perf_counter() - start
    for f in inputs:  # warm the engine runs' digest cache
        cached_digest(f, DEFAULT_DIGEST, hash_cache)
    mergekit_bin = shutil.which("mergekit-yaml")
    mergelab_bin = [sys.executable, "-m", "mergelab.cli"]
    cold_hashes = {**os.environ, "MERGELAB_HASH_CACHE": "off"}
    rows = []
    # mergekit's run of a method whose stable variant is measured later serves both rows (its output kept until then)
    kept_mergekit: dict[str, tuple[tuple[float, int], float]] = {}
    for i, method in enumerate(args.methods):
        cfg_path = work / f"{method}.yml"
        cfg_path.write_text(yaml.safe_dump(config_for(method, paths)))
        mergekit_method = STABLE.get(method, method)
        needed_later = any(STABLE.get(m) == mergekit_method for m in args.methods[i + 1:])
        mergekit_cfg = work / f"{mergekit_method}.yml"
        mergekit_cfg.write_text(yaml.safe_dump(config_for(mergekit_method, paths)))
        results, cpu_s = {}, {}
        # One untimed run first: numba compiles a checkout's loops into its cache on their first use, once,
        # and that run had been the timed one in a fresh worktree (3 x 0.5 GB, 2026-12-04 23:53: TIES 14.40 s
        # and 17.3 CPU s, Model Stock 8.01 s, against 5-6 s and ~3.3 s warm, the peak raised by the compiler)
        shutil.rmtree(work / "out-warm", ignore_errors=True)
        run_measured([*mergelab_bin, "merge", str(cfg_path), "-o", str(work / "out-warm"), "--quiet", "--no-hash",
                      "--device", args.device])
        shutil.rmtree(work / "out-warm", ignore_errors=True)
        load_before = os.getloadavg()[0]
        for tool in ("mergelab", "mergekit"):
            if tool == "mergekit" and mergekit_method in kept_mergekit:
                results[tool], cpu_s[tool] = kept_mergekit[mergekit_method]
                print(f"  {method:16s} {tool:9s} as for {mergekit_method}", flush=True)
                continue
            out = work / f"out-{tool}-{mergekit_method if tool == 'mergekit' else method}"
            walls, peaks, cpus = [], [], []
            for _ in range(args.repeats):
                shutil.rmtree(out, ignore_errors=True)
                if tool == "mergelab":
                    cmd = [*mergelab_bin, "merge", str(cfg_path), "-o", str(out), "--quiet", "--device", args.device]
                else:
                    if mergekit_bin is None:
                        raise SystemExit("mergekit-yaml not found: pip install mergekit==0.1.5")
                    cmd = [mergekit_bin, str(mergekit_cfg), str(out), "--no-write-model-card", "--no-copy-tokenizer",
                           "--quiet", "--random-seed", "0"]
                    if args.device != "cpu":
                        cmd += ["--device", args.device]
                wall, peak, cpu = run_measured(cmd, env=cold_hashes if tool == "mergelab" else None)
                walls.append(wall)
                peaks.append(peak)
                cpus.append(cpu)
            results[tool] = (statistics.median(walls), max(peaks))
            cpu_s[tool] = statistics.median(cpus)
            if tool == "mergekit" and needed_later:
                kept_mergekit[mergekit_method] = (results[tool], cpu_s[tool])
            print(f"  {method:16s} {tool:9s} {results[tool][0]:7.2f} s  peak RSS {results[tool][1] / 2**20:8.0f} MiB"
                  f"  CPU {cpu_s[tool]:7.2f} s", flush=True)
        # The fastest of several, as for the floor: the same 2 GB buffered write took 0.63-7.05 s of CPU in 8
        # back-to-back runs on this VM (2026-12-02 19:55 UTC), so one engine run against the floor's fastest
        # compared a slow write with a fast one. Every run is kept in the record.
        engine_runs = [engine_seconds(cfg_path, work / f"out-engine-{method}", args.device, hash_cache, args.idle)
                       for _ in range(args.engine_repeats)]
        engine = min(engine_runs)
        direct_runs = [engine_seconds(cfg_path, work / f"out-engine-{method}", args.device, hash_cache, args.idle,
                                      direct_io=True) for _ in range(args.engine_repeats if args.direct_io else 0)]
        diff, differing = output_differences(work / f"out-mergelab-{method}",
                                             work / f"out-mergekit-{mergekit_method}")
        (ml_t, ml_m), (mk_t, mk_m) = results["mergelab"], results["mergekit"]
        rows.append({"method": method, "mergelab_s": ml_t, "mergekit_s": mk_t, "time_ratio": ml_t / mk_t,
                     "floor_ratio": ml_t / floor, "engine_s": engine, "engine_runs_s": engine_runs,
                     "engine_floor_ratio": engine / floor, "engine_hot_floor_ratio": engine / floor_hot,
                     "engine_direct_runs_s": direct_runs,
                     "mergelab_rss_mib": ml_m / 2**20, "mergekit_rss_mib": mk_m / 2**20,
                     "rss_ratio": ml_m / mk_m, "max_abs_diff": diff, "differing_fraction": differing,
                     "mergelab_cpu_s": cpu_s["mergelab"],
                     "mergekit_cpu_s": cpu_s["mergekit"],
                     "load": (load_before, os.getloadavg()[0])})
        print(f"  {method:16s} engine    {engine:7.2f} s  ({engine / floor:.2f}x floor, {engine / floor_hot:.2f}x "
              f"hot floor; slowest of {len(engine_runs)} {max(engine_runs):.2f} s)"
              + (f"; --direct-io {min(direct_runs):.2f} s ({min(direct_runs) / floor_direct:.2f}x direct floor)"
                 if direct_runs else ""), flush=True)
        shutil.rmtree(work / f"out-mergelab-{method}", ignore_errors=True)
        if not needed_later:
            shutil.rmtree(work / f"out-mergekit-{mergekit_method}", ignore_errors=True)
        if on_method is not None:  # the report so far: a long run cut short still leaves its numbers
            on_method(*_section(size_text, in_bytes, floors, torch_import, kernels_s, hash_s, rows, args))
    return _section(size_text, in_bytes, floors, torch_import, kernels_s, hash_s, rows, args)


def _shape_text(size_text: str) -> str:
    shape = llama_config(size_text)
    return (f"hidden {shape['hidden_size']}, MLP {shape['intermediate_size']}, {shape['num_hidden_layers']} layers, "
            f"vocabulary {shape['vocab_size']}")


def _section(size_text: str, in_bytes: int, floors: tuple[float, float, float], torch_import: float,
             kernels_s: float, hash_s: dict[str, float], rows: list[dict],
             args: argparse.Namespace) -> tuple[str, dict]:
    floor, floor_hot, floor_direct = floors
    header = (f"Merging 3 models of {in_bytes / 3 / 1e9:.2f} GB each (bf16, Llama-style: "
              f"{_shape_text(size_text)}; safetensors in 1 GB shards), "
              f"device {args.device}, {os.cpu_count()} CPUs, torch {torch.__version__}. I/O floor (read inputs once + "
              f"write one output, warm cache; the fastest of 3 runs, each after {args.idle:g} s of quiet, when this "
              f"VM has handed freed memory back to its host, as a merge meets it): {floor:.2f} s; *hot* floor "
              f"(the fastest of 5 back-to-back runs, each writing into the memory the last one freed): "
              f"{floor_hot:.2f} s; *direct* floor (as the floor, the output written with O_DIRECT): "
              f"{floor_direct:.2f} s. `import torch` alone: "
              f"{torch_import:.2f} s. Loading mergelab's compiled loops (numba, after torch): {kernels_s:.2f} s. "
              "Digests of all inputs (cold, one thread): "
              + ", ".join(f"{a} {s:.2f} s" for a, s in hash_s.items()) + " (mergelab's default: blake3). "
              "*mergelab s*: `mergelab merge` with the hash "
              "cache off (every input hashed), after one untimed run (numba compiles a checkout's loops once, on "
              "their first use); *engine* = `run_merge` timed inside the process (no interpreter start, "
              "imports or loading of the compiled loops), digests from the warm hash cache, the fastest of "
              f"{args.engine_repeats} runs, each after {args.idle:g} s of quiet like the floor (*slowest*: the "
              "slowest of them); *direct*: the same with `--direct-io`, over the direct floor. "
              "*load*: 1-minute load average before/after the method (2 cores: above 2 means other processes were "
              "waiting for them). *ties_stable*, *breadcrumbs_stable*, *della_stable*: mergelab's `tie_order: stable` "
              "(tied magnitudes ordered by flat index, no sort replayed) against mergekit's merge of the "
              "method (the same run of it as that method's row).\n\n")
    table = ("| method | mergelab s | mergekit s | time mergelab/mergekit | mergelab/floor | engine s | engine/floor "
             "| engine/hot floor | engine slowest s | direct s | direct/floor | CPU s mergelab / mergekit "
             "| mergelab peak RSS MiB | mergekit peak RSS MiB | RSS mergelab/mergekit | max abs diff | load |\n"
             + "|---" * 17 + "|\n")
    for r in rows:
        diff = "random masks differ" if STABLE.get(r["method"], r["method"]) in RANDOM else f"{r['max_abs_diff']:.3g}"
        if r["method"] in STABLE and STABLE[r["method"]] not in RANDOM:
            diff += f" ({100 * r['differing_fraction']:.2g} % of entries differ from mergekit's)"
        fastest = min(r["engine_direct_runs_s"], default=None)
        direct = "– | –" if fastest is None else f"{fastest:.2f} | {fastest / floor_direct:.2f}"
        table += (f"| {r['method']} | {r['mergelab_s']:.2f} | {r['mergekit_s']:.2f} | {r['time_ratio']:.2f} | "
                  f"{r['floor_ratio']:.2f} | {r['engine_s']:.2f} | {r['engine_floor_ratio']:.2f} | "
                  f"{r['engine_hot_floor_ratio']:.2f} | {max(r['engine_runs_s']):.2f} | {direct} | "
                  f"{r['mergelab_cpu_s']:.1f} / {r['mergekit_cpu_s']:.1f} | "
                  f"{r['mergelab_rss_mib']:.0f} | {r['mergekit_rss_mib']:.0f} | "
                  f"{r['rss_ratio']:.2f} | {diff} | {r['load'][0]:.1f}/{r['load'][1]:.1f} |\n")
    summary = {"size": size_text, "floor_s": floor, "floor_hot_s": floor_hot, "floor_direct_s": floor_direct,
               "idle_s": args.idle, "torch_import_s": torch_import, "kernels_load_s": kernels_s,
               "hash_s": hash_s, "rows": rows}
    return f"## 3 × {size_text}\n\n" + header + table, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", nargs="+", default=["0.5GB"],
                    help="approximate size of each model (bf16), or 7BxL: Llama-2-7B's shapes with L of its 32 layers")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mergelab-bench"))
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool and method (median reported)")
    ap.add_argument("--engine-repeats", type=int, default=3,
                    help="engine-only runs per method (the fastest reported, as for the I/O floor)")
    ap.add_argument("--idle", type=float, default=IDLE_S,
                    help="seconds of quiet before each timed floor and engine run (see IDLE_S)")
    ap.add_argument("--direct-io", action="store_true", help="also time the engine with --direct-io")
    ap.add_argument("--report", type=Path, default=None, help="Markdown output (default benchmarks/results/<date>.md)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    run_start = time.time()
    today = time.strftime("%Y-%m-%d", time.gmtime(run_start))
    report = args.report or Path(__file__).parent / "results" / f"{today}.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/vs_mergekit.py " + " ".join(sys.argv[1:])
    sections: list[str] = []
    summaries: list[dict] = []
    # a day's file holds that day's earlier runs and notes: this run is appended, never written over them
    before = report.read_text().rstrip() + "\n\n" if report.exists() else ""
    heading = "## mergelab vs mergekit" if before else f"# mergelab vs mergekit, {today}"
    json_path = report.with_suffix(".json")
    earlier = json.loads(json_path.read_text()) if json_path.exists() else []

    def write(section: str, summary: dict) -> None:
        done = len(sections)  # sections of the sizes already finished, then this size so far
        started = time.strftime("%H:%M UTC", time.gmtime(run_start))
        report.write_text(before + f"{heading} ({started})\n\n`{command}`\n\n" + "\n".join([*sections, section]))
        json_path.write_text(json.dumps([*earlier, *summaries[:done], summary], indent=2))

    for size_text in args.size:
        section, summary = measure_size(size_text, args, on_method=write)
        print("\n" + section, flush=True)
        write(section, summary)
        sections.append(section)
        summaries.append(summary)
    print(f"wrote {report}")

if __name__ == "__main__":
    main()
