"""Where a streamed linear merge spends its time above the I/O floor: the engine's work, stage by stage.

    python benchmarks/linear_stages.py                      # 3 models of ~0.5 GB (bf16), linear, 3 repeats
    python benchmarks/linear_stages.py --size 2GB --report  # and append the table to results/linear_stages_<date>.md
    python benchmarks/linear_stages.py --size 20MB          # a smoke run, seconds
    python benchmarks/linear_stages.py --stages pipelined engine_warm --baseline /other/checkout/src
                                                            # each stage on both trees, baseline first

The inputs are benchmarks/vs_mergekit.py's (``build_models``: a base and two fine-tunes, Llama-style, bf16,
made once under --work) and so is the config (``config_for``: ``dtype: bfloat16``). Every stage below runs in
a fresh process (the allocator tuned as the CLI tunes it), timed inside it after the imports, with the page
cache warm; the stages take turns, one repeat of every stage after another, so that the machine's load hits
every column alike. Each is the median of ``--repeats`` runs of wall seconds and of process CPU seconds (user +
system, every thread of the process): the CPU column changes far less than the wall column when other jobs
share the cores. Stages 2-6 add one step of the engine's per-piece work at a time, one step after the other on
one thread, torch's included (see ``_sequential``); stage 7 is the engine's own code for the same work, pipelined
on its threads, with torch's default threads:

1. floor: vs_mergekit's ``io_floor`` (read every input file once, write one output of the merged size);
2. read: every piece of every input through the engine's reader (``engine._pieces``: 1 Mi-entry flat pieces
   of large tensors, whole small ones; ``CheckpointReader.get_flat``/``get``), nothing else;
3. + prepared: each piece as the method gets it (``core.prepared``: the config's compute dtype). With
   ``dtype: bfloat16`` that is no conversion at all: ``linear_merge`` accumulates in float32 by mixed-dtype
   ``add_`` (the bf16→f32 conversion happens inside the sum's kernel), so this column measures the call;
4. + method: ``core.merge_tensor`` (prepared + the method's own function: a float32 weighted sum, the
   division by the weights' sum, back to bf16) and the cast to the output dtype, as ``engine._merge_all``;
5. + scans: the NaN/Inf checks the engine runs unless ``--allow-nonfinite`` (``plan.count_nonfinite``): of the
   result, and of every input piece unless the method propagates NaN/Inf (``MergeMethod.propagates_nonfinite``:
   linear and task arithmetic, whose inputs are scanned only once a result is not finite);
6. + write: ``StreamingSafetensorsWriter.write_part``/``write`` into a fresh folder, and its ``close``;
7. pipelined: ``engine._stream``, the engine's own loop over the same work (reader thread, merge, writer
   thread): everything but hashing and the run's bookkeeping (plan, config files, record, install);
8. engine, hashes warm: ``run_merge`` with every input's digest from the warm cache (io/file_hashes.py);
9. engine, hashes cold: ``run_merge`` hashing every input (blake3, on its hash threads beside the merge).

What could not be isolated without copying engine code: stages 2-6 are a loop of this script's (the engine's
``load`` and merge loop are closures inside ``_merge_all``), calling the engine's functions in the engine's
order on one thread; stage 7 runs the engine's loop itself, so 7 - 6 is what the engine's threads overlap
(wall) and cost (CPU). Opening the readers (``plan_merge``) is outside the timing of stages 2-7 and inside 8-9.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # vs_mergekit, beside this file
from vs_mergekit import build_models, config_for, io_floor

from mergelab.io.writer import parse_size

STAGES = {
    "floor": "I/O floor (read inputs once, write one output)",
    "read": "read every piece (engine reader)",
    "prepared": "+ prepared (compute dtype)",
    "method": "+ method (merge_tensor, to out dtype)",
    "scans": "+ NaN/Inf scans (as the engine: result; inputs unless the method propagates NaN/Inf)",
    "write": "+ write (StreamingSafetensorsWriter)",
    "pipelined": "engine._stream (the same, on the engine's threads)",
    "engine_warm": "run_merge, input hashes from the warm cache",
    "engine_cold": "run_merge, blake3 of every input",
}
# Not run by default (``--stages ... pipelined_threads pipelined_unscanned``): what the engine's one torch thread
# and its scans change. On torch's 2 threads the stream's small ops left the second OpenMP thread spin-waiting
# between them: 21.2 CPU s against 1.6 for 3 × 0.5 GB unscanned, load 4–5, 2026-12-01.
EXTRA_STAGES = {
    "pipelined_threads": "engine._stream on torch's default threads (the engine takes one)",
    "pipelined_unscanned": "engine._stream without NaN/Inf scans (--allow-nonfinite)",
    "pipelined_threads_unscanned": "engine._stream on torch's default threads, without scans",
}
ALL_STAGES = {**STAGES, **EXTRA_STAGES}
_SEQUENTIAL = ("read", "prepared", "method", "scans", "write")
_SHARD_BYTES = parse_size("5GB")  # run_merge's default --max-shard-size


class _Clock:
    """Wall seconds, process CPU seconds (user + system, every thread) and minor page faults of a block."""

    def __enter__(self) -> _Clock:
        self._start = (time.perf_counter(), *_cpu())
        return self

    def __exit__(self, *exc: object) -> None:
        wall, cpu, faults = self._start
        cpu1, faults1 = _cpu()
        self.result = {"wall": time.perf_counter() - wall, "cpu": cpu1 - cpu, "faults": faults1 - faults}


def _cpu() -> tuple[float, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_minflt


def _sequential(stage: str, cfg_path: Path, out: Path) -> dict[str, float]:
    """Stages 2-6: the engine's per-piece work up to ``stage``, one step after another on this thread."""
    import torch

    from mergelab.io.readers import CheckpointReader
    from mergelab.io.writer import ShardPlan, StreamingSafetensorsWriter
    from mergelab.merge import engine
    from mergelab.merge.config import load_config
    from mergelab.merge.core import merge_tensor, prepared
    from mergelab.merge.plan import count_nonfinite, plan_merge

    upto = _SEQUENTIAL.index(stage)
    cfg, folder = load_config(cfg_path)
    plan = plan_merge(cfg, folder)
    writer = None
    if upto >= _SEQUENTIAL.index("write"):
        out.mkdir(parents=True)
        writer = StreamingSafetensorsWriter(out, ShardPlan.build(plan.out_metas, _SHARD_BYTES),
                                            metadata={"format": "pt", "mergelab_method": cfg.merge_method})
    # One torch thread: alone on the main thread, 2 OpenMP threads made these 1 Mi-entry ops ~20x slower
    # in CPU and wall under load ~5 (measured: 80 pieces of linear, 5.7 s against 0.29 s on one thread),
    # which the engine, with its reader and writer threads awake beside the merge, did not show.
    torch.set_num_threads(1)
    with _Clock() as clock:
        for piece in engine._pieces(plan, engine._PIECE_ENTRIES, None, cfg.compute_dtype):
            def get(reader: CheckpointReader, piece: engine._Piece = piece) -> torch.Tensor:  # as the engine's load
                if piece.stop is None:
                    return reader.get(piece.name)
                return reader.get_flat(piece.name, piece.start, piece.stop)

            base = get(plan.base) if plan.base is not None else None
            readers, _ = plan.inputs_for(piece.name)
            tensors = [get(r) for r in readers]
            inputs = ([base] if base is not None else []) + tensors
            if stage == "prepared":
                for x in inputs:
                    prepared(x, None, cfg.compute_dtype)
            if upto < _SEQUENTIAL.index("method"):
                continue
            merged = merge_tensor(plan.method, piece.name, tensors, base=base, params=plan.params.get(piece.name),
                                  seed=cfg.seed, compute_dtype=cfg.compute_dtype, offset=piece.start)
            merged = merged.to(plan.out_metas[piece.name].dtype)
            if upto >= _SEQUENTIAL.index("scans"):
                # getattr: a --baseline checkout from before the flag scanned every input
                for t in [merged] if getattr(plan.method, "propagates_nonfinite", False) else [*inputs, merged]:
                    count_nonfinite(t)
            if writer is not None:
                (writer.write if piece.stop is None else writer.write_part)(piece.name, merged)
        if writer is not None:
            writer.close()
    plan.close()
    return clock.result


def _pipelined(cfg_path: Path, out: Path, *, torch_threads: bool = False, scans: bool = True) -> dict[str, float]:
    import contextlib

    from mergelab.merge import engine
    from mergelab.merge.config import load_config
    from mergelab.merge.plan import plan_merge

    if torch_threads:  # undo the engine's one thread: torch's default (one per core)
        engine.one_thread = contextlib.nullcontext
    cfg, folder = load_config(cfg_path)
    plan = plan_merge(cfg, folder)
    out.mkdir(parents=True)
    with _Clock() as clock:
        engine._stream(plan, out, cfg, None, _SHARD_BYTES, allow_nonfinite=not scans, show_progress=False)
    plan.close()
    return clock.result


def _engine(cfg_path: Path, out: Path) -> dict[str, float]:
    from mergelab.merge.engine import run_merge

    with _Clock() as clock:
        run_merge(cfg_path, out, progress=False)
    return clock.result


def _floor(work: Path, out: Path) -> dict[str, float]:
    paths = [work / n for n in ("base", "ft1", "ft2")]
    out_bytes = sum(f.stat().st_size for f in paths[0].glob("*.safetensors"))
    with _Clock() as clock:
        wall = io_floor(paths, out_bytes, out)
    return {**clock.result, "wall": wall}  # io_floor's own clock: without its scratch file's unlink


def one_stage(stage: str, work: Path, cfg_path: Path, out: Path) -> dict[str, float]:
    """Run one stage in this process (the allocator tuned as the CLI tunes it): its wall seconds, CPU
    seconds and minor page faults, measured around the stage's work only (no imports, no plan)."""
    from mergelab.merge.allocator import recycle_freed_memory

    recycle_freed_memory()
    if stage == "floor":
        return _floor(work, out)
    if stage in _SEQUENTIAL:
        return _sequential(stage, cfg_path, out)
    if stage.startswith("pipelined"):
        return _pipelined(cfg_path, out, torch_threads="threads" in stage, scans="unscanned" not in stage)
    return _engine(cfg_path, out)


def _run_stage(stage: str, work: Path, cfg_path: Path, out: Path, src: str | None = None) -> dict[str, float]:
    """``stage`` in a fresh process; ``src``: another checkout's src folder to import mergelab from."""
    shutil.rmtree(out, ignore_errors=True)
    cache = "off" if stage == "engine_cold" else str(work / "hash-cache")
    env = {**os.environ, "MERGELAB_HASH_CACHE": cache}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__, "--one-stage", stage, "--work", str(work), "--cfg",
                           str(cfg_path), "--out", str(out)], capture_output=True, text=True, env=env)
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"stage {stage} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


BASELINE = " (baseline)"


def measure(size_text: str, method: str, stages: list[str], repeats: int, root: Path,
            baseline: str | None = None) -> dict:
    from mergelab.io.file_hashes import cached_digest

    work = root / size_text
    work.mkdir(parents=True, exist_ok=True)
    print(f"3 Llama-style bf16 models ({size_text}) in {work} ...", flush=True)
    paths = build_models(work, size_text)
    inputs = [f for p in paths for f in sorted(p.glob("*.safetensors"))]
    in_bytes = sum(f.stat().st_size for f in inputs)
    cfg_path = work / f"stages-{method}.yml"
    cfg_path.write_text(yaml.safe_dump(config_for(method, paths)))
    for f in inputs:  # warm the digest cache of stage 8 (and the page cache)
        cached_digest(f, cache=work / "hash-cache")
    out = work / "stages-out"
    trees = ([(BASELINE, baseline)] if baseline is not None else []) + [("", None)]
    load_before, runs = os.getloadavg(), {s + label: [] for s in stages for label, _ in trees}
    for r in range(repeats):
        for stage in stages:
            for label, src in trees:
                runs[stage + label].append(_run_stage(stage, work, cfg_path, out, src))
                m = runs[stage + label][-1]
                print(f"  repeat {r + 1}  {stage + label:12s} wall {m['wall']:7.2f} s  CPU {m['cpu']:7.2f} s  "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
    rows = {s: {k: statistics.median(m[k] for m in runs[s]) for k in ("wall", "cpu", "faults")} for s in runs}
    return {"size": size_text, "method": method, "in_gb": in_bytes / 1e9, "repeats": repeats, "rows": rows,
            "runs": runs, "load": (load_before, os.getloadavg()), "baseline": baseline}


def markdown(result: dict, command: str) -> str:
    rows, gb = result["rows"], result["in_gb"]
    floor = rows.get("floor")
    (b1, b5, _), (a1, a5, _) = result["load"]
    lines = [f"## {result['method']}, 3 × {result['size']} ({gb:.2f} GB of input), "
             f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC",
             "",
             f"`{command}`; {os.cpu_count()} CPUs; load average (1 / 5 min) {b1:.1f} / {b5:.1f} before, "
             f"{a1:.1f} / {a5:.1f} after. Median of {result['repeats']} runs per stage, stages taking turns. "
             "*CPU s*: user + system of the stage's process, every thread. *+CPU s/GB*: this stage's CPU "
             "seconds less the previous stage's of the same tree (stages 3-6 add one step to the one before; 7-9 "
             "compare with 6, 7, 8), per GB of input; *(baseline)*: the same stage on --baseline's checkout. "
             "Minor faults: pages the kernel zero-filled or mapped for the process.",
             "",
             "| # | stage | wall s | × floor (wall) | CPU s | × floor (CPU) | +CPU s/GB | minor faults |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    previous: dict[str, float | None] = {}  # per tree: the CPU seconds of its previous stage
    for row, m in rows.items():
        stage = row.removesuffix(BASELINE)
        tree = row[len(stage):]
        i = list(ALL_STAGES).index(stage) + 1
        ratio = f"{m['wall'] / floor['wall']:.2f}" if floor else "-"
        cpu_ratio = f"{m['cpu'] / floor['cpu']:.2f}" if floor and floor["cpu"] > 0 else "-"
        before = previous.get(tree)
        step = f"{(m['cpu'] - before) / gb:+.2f}" if before is not None else f"{m['cpu'] / gb:.2f}"
        lines.append(f"| {i} | {ALL_STAGES[stage]}{tree} | {m['wall']:.2f} | {ratio} | {m['cpu']:.2f} | "
                     f"{cpu_ratio} | {step} | {m['faults']:.0f} |")
        previous[tree] = None if stage == "floor" else m["cpu"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.5GB", help="approximate size of each model (bf16), e.g. 0.5GB, 2GB, 20MB")
    ap.add_argument("--method", default="linear", choices=("linear", "task_arithmetic"))
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(ALL_STAGES))
    ap.add_argument("--repeats", type=int, default=3, help="runs per stage (median reported)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mergelab-bench"))
    ap.add_argument("--report", type=Path, nargs="?", const=True, default=None,
                    help="append the Markdown table to this file (default benchmarks/results/linear_stages_<date>.md)")
    ap.add_argument("--baseline", help="src folder of another mergelab checkout: every stage also runs on it, "
                    "first, and its rows are marked (baseline)")
    ap.add_argument("--one-stage", choices=list(ALL_STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--cfg", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_stage:  # a child process: one stage, its numbers as JSON
        print(json.dumps(one_stage(args.one_stage, args.work, args.cfg, args.out)))
        return
    command = "python benchmarks/linear_stages.py " + " ".join(sys.argv[1:])
    result = measure(args.size, args.method, args.stages, args.repeats, args.work, args.baseline)
    section = markdown(result, command)
    print("\n" + section)
    if args.report is not None:
        today = time.strftime("%Y-%m-%d", time.gmtime())
        report = Path(__file__).parent / "results" / f"linear_stages_{today}.md" if args.report is True \
            else args.report
        raw = report.with_suffix(".json")
        earlier = json.loads(raw.read_text()) if report.exists() and raw.exists() else []
        with open(report, "a") as fh:
            fh.write(("\n" if report.stat().st_size else f"# Linear merge, stage by stage, {today}\n\n") + section)
        raw.write_text(json.dumps([*earlier, {**result, "command": command}], indent=2))
        print(f"appended to {report}")


if __name__ == "__main__":
    main()
