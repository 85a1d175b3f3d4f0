"""The stage of TIES, Breadcrumbs and DELLA that torch's sort order decides, alone, against issue 16's 5× budget.

    python benchmarks/exact_order_stages.py --size 0.5GB 2GB
    python benchmarks/exact_order_stages.py --size 0.5GB --methods della --report /tmp/stages.md

These three methods keep the entries torch's CPU sort would keep, ties included, so that their bytes are
mergekit's (TIES, Breadcrumbs) or mergelab's own of before (DELLA's coins differ from mergekit's, its ranks
do not): TIES needs each task vector's exact top-k (``sparsify.topk_of_keys``: a histogram of the magnitudes'
bit patterns, then the sort replayed where tied magnitudes straddle the k-th rank), Breadcrumbs the same at two
edges (``band_of_keys``), DELLA every entry's rank within its row (``della.magprune_probabilities``: the whole
introsort replayed row by row). This times that stage alone, on every tensor of both task vectors of
vs_mergekit's models (a base and two fine-tunes, bf16, with its configs' parameters), in
CPU seconds of one thread (the task vectors are made and their keys taken outside the clock), and sets it
beside, in the same run, the direct I/O floor (vs_mergekit's ``io_floor``, the output written with O_DIRECT,
fastest of 3) and the engine itself (``engine_seconds``: ``run_merge`` in a fresh process with ``--direct-io``,
fastest of ``--engine-runs``).

*two-core bound*: the stage's CPU over two cores, which add up on this machine (``core_scaling.py``: 1.86–1.95×
for copies and streamed arithmetic): no schedule on two cores finishes the stage sooner, and the merge cannot
end before it. Where that bound alone is past 5× the floor, the goal cannot be met without giving up the sort's
order (the bytes); where it is under, what is left of the budget is what reading, the task vectors, the vote
or the coins, the sums and writing may take.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # vs_mergekit, beside this file
from vs_mergekit import IDLE_S, build_models, config_for, engine_seconds, io_floor

from mergelab.io.models import open_model
from mergelab.kernels.dispatch import warm_up
from mergelab.methods.della import magprune_probabilities
from mergelab.methods.sparsify import band_of_keys, magnitude_keys, topk_of_keys

GOAL = 5.0  # issue 16: ties, dare_ties, breadcrumbs, della engine ≤ 5× the I/O floor

Params = dict[str, float]
# (what the stage is, whether it reads the magnitude keys, the stage on one task vector with its config parameters)
STAGES: dict[str, tuple[str, bool, Callable[[torch.Tensor, torch.Tensor | None, Params], object]]] = {
    "ties": ("exact top-k: histogram + sort replay at the k-th rank", True,
             lambda delta, keys, p: topk_of_keys(keys, p["density"], overwrite=True)),
    "breadcrumbs": ("exact band: histogram + sort replay at both edges", True,
                    lambda delta, keys, p: band_of_keys(keys, p["density"], p["gamma"], overwrite=True)),
    "della": ("every entry's rank in its row: the row sorts replayed", False,
              lambda delta, keys, p: magprune_probabilities(delta, p["density"], p["epsilon"])),
}


def stage_cpu(method: str, folders: list[Path], params: Params) -> tuple[float, int]:
    """CPU seconds of ``method``'s exact-order stage over every tensor of both task vectors, one thread, and
    the entries it covered; ``params``: a model's parameters in the benchmark's config. The magnitude keys are
    taken before the clock starts (the engine fuses that pass with reading)."""
    _, uses_keys, run = STAGES[method]
    cpu, entries = 0.0, 0
    with open_model(str(folders[0])) as base:
        for folder in folders[1:]:
            with open_model(str(folder)) as tuned:
                for name in tuned.names:
                    delta = tuned.get(name) - base.get(name)
                    keys = magnitude_keys(delta) if uses_keys else None
                    if uses_keys and keys is None:
                        raise SystemExit(f"{folder} {name}: no magnitude keys (a NaN?): nothing to time")
                    keys = keys.clone() if keys is not None else None  # the replay may use them as scratch space
                    start = time.thread_time()
                    rule = run(delta, keys, params)
                    cpu += time.thread_time() - start
                    if rule is None:
                        raise SystemExit(f"{method} {name}: the replay did not apply here; nothing to time")
                    entries += delta.numel()
    return cpu, entries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", nargs="+", default=["0.5GB"], help="vs_mergekit's model sizes")
    ap.add_argument("--methods", nargs="+", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--work", type=Path, default=Path("/tmp/mergelab-bench"))
    ap.add_argument("--engine-runs", type=int, default=2, help="fresh-process engine runs (the fastest shown)")
    ap.add_argument("--report", type=Path, help="append the table (Markdown) to this file")
    args = ap.parse_args()
    if not warm_up():
        raise SystemExit("the compiled loops are off here (numba missing or MERGELAB_KERNELS=0): the stages "
                         "would sort with torch, which is not what the engine runs")
    torch.set_num_threads(1)
    lines = [f"### {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC: `python benchmarks/exact_order_stages.py "
             f"--size {' '.join(args.size)} --methods {' '.join(args.methods)}`", "",
             "| size | method | stage | stage CPU s (one thread) | ns per entry | two-core bound s | bound / direct "
             "floor | goal s (5× floor) | engine direct s | engine / direct floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    floors: list[str] = []
    for size in args.size:
        folders = build_models(args.work / size, size)
        out_bytes = sum(f.stat().st_size for f in folders[0].glob("*.safetensors"))
        floor = min(io_floor(folders, out_bytes, args.work / "scratch", IDLE_S, direct=True) for _ in range(3))
        for method in args.methods:
            config = config_for(method, folders)  # the engine's run and the stage's parameters, one source
            cpu, entries = stage_cpu(method, folders, config["models"][0]["parameters"])
            cfg_path = args.work / size / f"stages-{method}.yml"
            cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
            engine = min(engine_seconds(cfg_path, args.work / size / "stages-out", "cpu", args.work / "hash-cache",
                                        direct_io=True) for _ in range(args.engine_runs))
            bound = cpu / 2
            row = (f"| {size} | {method} | {STAGES[method][0]} | {cpu:.2f} | {cpu / entries * 1e9:.1f} | "
                   f"{bound:.2f} | {bound / floor:.2f} | {GOAL * floor:.2f} | {engine:.2f} | {engine / floor:.2f} |")
            lines.append(row)
            print(row, flush=True)
        floors.append(f"{size}: {floor:.2f} s")
    lines.append(f"\nDirect floors (fastest of 3): {'; '.join(floors)}.\n")
    print(lines[-1], flush=True)
    if args.report is not None:
        with args.report.open("a") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
