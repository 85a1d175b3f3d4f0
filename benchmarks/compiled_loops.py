"""The compiled loops (mergelab/kernels) beside the torch/numpy code they replace: CPU ms per call, one thread.

    python benchmarks/compiled_loops.py            # print the table
    python benchmarks/compiled_loops.py --report   # and append it to benchmarks/results/<date>.md

Each row times both on the same inputs in this one process (best of 5 rounds, ``time.thread_time``), checks
that they give the same bits, and prints the ratio: the numbers move with the machine's load, the ratio
much less. Inputs are a streamed piece as the engine merges it: 1 Mi entries of three bfloat16 models close to
a base (their task vectors' magnitudes tie by the thousand, as a fine-tune's do); the sort replay runs on the
8 Mi magnitude keys of one such task vector at density 0.3; DELLA's rows view the piece as 1024 × 1024. The
first row is the one-time cost of loading the loops (numba's import and its cache), which the engine pays on a
thread of its own ahead of a large merge.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ENTRIES = 1 << 20


def best_ms(fn: Callable[[], object], rounds: int = 5, calls: int = 4) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - start) / calls)
    return best * 1e3


def load_seconds() -> float:
    code = ("import time, torch; from mergelab.kernels.dispatch import warm_up; t = time.perf_counter(); "
            "warm_up(); print(time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    width = {torch.bfloat16: torch.int16, torch.float32: torch.int32}.get(a.dtype, a.dtype)  # integer keys as they are
    return a.dtype == b.dtype and torch.equal(a.view(width), b.view(width))


def rows() -> list[tuple[str, float, float, bool]]:
    from mergelab.kernels import dispatch
    from mergelab.methods import std_sort
    from mergelab.methods.linear import _linear_torch, linear_merge
    from mergelab.methods.sparsify import band_of_keys, magnitude_keys, topk_of_keys
    from mergelab.methods.task_vectors import (
        _masked_by_rules_torch,
        _weighted_task_vectors,
        generalized_task_arithmetic,
        masked_by_rules,
        task_vector,
        task_vector_keys,
    )

    if not dispatch.warm_up():
        raise SystemExit("the compiled loops did not load (numba missing, or MERGELAB_KERNELS=0)")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(ENTRIES, generator=g) * 0.02
    models = [(base + torch.randn(ENTRIES, generator=g) * 0.002).bfloat16() for _ in range(3)]
    base = base.bfloat16()
    weights = [0.3, 0.5, 0.7]
    out: list[tuple[str, float, float, bool]] = []

    def row(name: str, fused: Callable[[], torch.Tensor], formula: Callable[[], torch.Tensor]) -> None:
        out.append((name, best_ms(fused), best_ms(formula), same(fused(), formula())))

    row("linear, 3 models", lambda: linear_merge(models, weights), lambda: _linear_torch(models, weights, True))
    for steps in (torch.float32, torch.bfloat16):
        def fused(steps: torch.dtype = steps) -> torch.Tensor:
            return generalized_task_arithmetic(base, models, weights, dtype=steps)

        def formula(steps: torch.dtype = steps) -> torch.Tensor:
            ws = [float(torch.tensor(w, dtype=steps)) for w in weights]
            return _weighted_task_vectors(base, models, ws, None, 1.0, steps)

        row(f"task arithmetic, 3 models, {str(steps).removeprefix('torch.')} steps", fused, formula)
    for name, band, consensus in (("TIES (top-k rules, sign election)", False, "sum"),
                                  ("Breadcrumbs (two-sided rules, no election)", True, None)):
        for steps in (None, torch.bfloat16):
            keys = [magnitude_keys(task_vector(m, base, steps or torch.float32)) for m in models]
            rules = [band_of_keys(k, 0.3, 0.01) if band else topk_of_keys(k, 0.3) for k in keys]  # type: ignore[arg-type]

            def fused_masked(steps: torch.dtype | None = steps, rules: list = rules,  # type: ignore[type-arg]
                             consensus: str | None = consensus) -> torch.Tensor:
                return masked_by_rules(base, models, weights, rules, 0, consensus=consensus,  # type: ignore[arg-type]
                                       normalize=consensus is not None, dtype=steps)

            def formula_masked(steps: torch.dtype | None = steps, rules: list = rules,  # type: ignore[type-arg]
                               consensus: str | None = consensus) -> torch.Tensor:
                return _masked_by_rules_torch(base, models, weights, rules, 0, consensus,  # type: ignore[arg-type]
                                              consensus is not None, 1.0, steps)

            label = "float32" if steps is None else "bfloat16"
            row(f"{name}, 3 models, {label} steps", fused_masked, formula_masked)
    for steps in (torch.float32, torch.bfloat16):
        def keys_fused(steps: torch.dtype = steps) -> torch.Tensor:
            return task_vector_keys(models[0], base, steps)  # type: ignore[return-value]

        def keys_formula(steps: torch.dtype = steps) -> torch.Tensor:
            return magnitude_keys(task_vector(models[0], base, steps)).reshape(-1)  # type: ignore[union-attr]

        row(f"top-k pass: magnitude keys of a task vector, {str(steps).removeprefix('torch.')} steps", keys_fused,
            keys_formula)
    _interpolation_rows(row, base, models)
    _della_rows(row, base, models, weights)
    n = 8 << 20
    keys16 = ((torch.randn(n, generator=g) * 0.002).bfloat16().abs()).view(torch.int16).numpy()
    k = int(0.3 * n)
    bounds = np.asarray([k], np.int64)
    loops = dispatch.loops()

    def replay_compiled() -> np.ndarray:
        v, idx = keys16.copy(), np.arange(n, dtype=np.int32)
        loops.sort_replay_loop(v, idx, bounds, 2 * (n.bit_length() - 1))  # type: ignore[union-attr]
        return idx[:k]

    def replay_numpy() -> np.ndarray:
        v, idx = keys16.copy(), np.arange(n, dtype=np.int32)
        std_sort._replay_numpy(v, idx, 0, k)
        return idx[:k]

    equal = np.array_equal(np.sort(replay_compiled()), np.sort(replay_numpy()))
    out.append(("std::sort replay, top 30 % of 8 Mi bfloat16 keys (copies included)",
                best_ms(replay_compiled, rounds=3, calls=1), best_ms(replay_numpy, rounds=3, calls=1), equal))
    threshold = int(np.sort(keys16)[::-1][k - 1])

    def ties_tagged() -> np.ndarray:  # the keys widened in their own room: 4 bytes per entry instead of 6
        room = np.empty(4 * n, np.uint8)
        held = room[:2 * n].view(np.int16)
        held[:] = keys16
        return np.sort(std_sort.kept_ties(held, k, threshold, overwrite=True, positions=room))  # type: ignore[arg-type]

    def ties_with_positions() -> np.ndarray:
        kept = std_sort.kept_ties(keys16.copy(), k, threshold, overwrite=True, positions=np.empty(4 * n, np.uint8))
        return np.sort(kept)  # type: ignore[arg-type]

    equal = np.array_equal(ties_tagged(), ties_with_positions())
    out.append(("tied entries kept at the top 30 % of 8 Mi bfloat16 keys: tagged replay (vs keys and positions)",
                best_ms(ties_tagged, rounds=3, calls=1), best_ms(ties_with_positions, rounds=3, calls=1), equal))
    return out


def _interpolation_rows(row: Callable[[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor]], None],
                        base: torch.Tensor, models: list[torch.Tensor]) -> None:
    """SLERP's and Model Stock's scalar passes (torch's row sums replayed) and element-wise steps, each with
    its loop and with the loop switched off (the module-level hook that finds it made to return None)."""
    from mergelab.methods import model_stock, slerp
    from mergelab.methods.registry import FlatSource

    def without(module: object, hook: str, call: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            real = getattr(module, hook)
            setattr(module, hook, lambda *a: None)
            try:
                return call()
            finally:
                setattr(module, hook, real)
        return run

    def coefficients() -> torch.Tensor:
        return torch.cat(slerp.slerp_coefficients(0.4, FlatSource.of(base, models[:1])))

    row("SLERP scalar pass (chunk norms, then normalised dot), float32", coefficients,
        without(slerp, "_compiled_sums", coefficients))
    scalars = slerp.slerp_coefficients(0.4, FlatSource.of(base, models[:1]))

    def interpolated() -> torch.Tensor:
        return slerp.slerp_apply(scalars, base, models[0])

    row("SLERP element-wise step", interpolated, without(slerp, "interpolation_sum", interpolated))
    for steps in (torch.float32, torch.bfloat16):
        label = str(steps).removeprefix("torch.")

        def streamed(steps: torch.dtype = steps) -> torch.Tensor:
            return model_stock.model_stock_ratio(FlatSource.of(base, models), dtype=steps)

        def whole(steps: torch.dtype = steps) -> torch.Tensor:
            return model_stock.model_stock_merge(base, models, dtype=steps)

        row(f"Model Stock scalar pass, 3 models, {label} steps (loop vs numpy replay)", streamed,
            without(model_stock, "_compiled_sums", streamed))
        row(f"Model Stock whole tensor, 3 models, {label} steps (loops vs torch)", whole,
            without(model_stock, "_compiled_sums", without(model_stock, "model_stock_sum", whole)))


def _della_rows(row: Callable[[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor]], None],
                base: torch.Tensor, models: list[torch.Tensor], weights: list[float]) -> None:
    """DELLA on the piece as 1024 rows of 1024 entries: its keep probabilities (ranks found by the sort replay and
    looked up as they are found, against torch's argsort, its inverting scatter and a gather), its drop with
    the per-entry rescale, and the whole merge, with the loops and as if they were not loaded."""
    from mergelab.kernels import dispatch
    from mergelab.kernels.random_drops import rescaled_drop
    from mergelab.methods.dare import _rescaled_drop
    from mergelab.methods.della import della_merge, magprune_probabilities
    from mergelab.methods.sparsify import uniform_draws
    from mergelab.methods.task_vectors import task_vector

    def torch_only(call: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            loaded = dispatch._loaded[:]
            dispatch._loaded[:] = [None]
            try:
                return call()
            finally:
                dispatch._loaded[:] = loaded
        return run

    rows_base, rows_models = base.reshape(1024, -1), [m.reshape(1024, -1) for m in models]
    delta = task_vector(rows_models[0], rows_base, torch.bfloat16)

    def probabilities() -> torch.Tensor:
        return magprune_probabilities(delta, 0.3, 0.1)

    row("DELLA keep probabilities, 1024 rows of 1024 (ranks; torch: argsort, scatter, gather)", probabilities,
        torch_only(probabilities))
    p = probabilities()
    draws = uniform_draws(delta.shape, torch.Generator().manual_seed(1))
    row("DELLA drop, per-entry rescale", lambda: rescaled_drop(delta, p, draws, _rescaled_drop),  # type: ignore[arg-type,return-value]
        lambda: _rescaled_drop(delta.clone(), p, draws))

    def merged() -> torch.Tensor:
        return della_merge(rows_base, rows_models, weights, [0.3] * 3, [0.1] * 3, seed=0, dtype=torch.bfloat16)

    row("DELLA, 3 models, bfloat16 steps (loops vs torch)", merged, torch_only(merged))


def table(load_s: float, measured: list[tuple[str, float, float, bool]]) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"`python benchmarks/compiled_loops.py` ({now:%Y-%m-%d %H:%M} UTC, "
             f"torch {torch.__version__}, one thread; loading the loops: {load_s:.2f} s once per process)", "",
             "| call (1 Mi-entry piece unless said) | compiled ms | torch/numpy ms | torch ÷ compiled | same bits |",
             "|---|---:|---:|---:|---|"]
    for name, fused, formula, equal in measured:
        lines.append(f"| {name} | {fused:.2f} | {formula:.2f} | {formula / fused:.1f} | {'yes' if equal else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="append the table to benchmarks/results/<date>.md")
    args = parser.parse_args()
    text = table(load_seconds(), rows())
    print(text)
    if args.report:
        path = Path(__file__).parent / "results" / f"{datetime.date.today():%Y-%m-%d}.md"
        with path.open("a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
