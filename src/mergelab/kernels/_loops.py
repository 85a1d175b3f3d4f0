"""The numba loops: imported on first use (numba takes ~0.4 s to import), never by ``import mergelab``.

Every loop computes in float32 with the same operations, in the same order, as the torch formula it
replaces. numba's default (no ``fastmath``) keeps LLVM from reordering or contracting them: where torch fuses
a multiply-add (``add_(x, alpha=w)`` is ``fmadd`` in ATen's vectorized kernels) the loop calls the
``llvm.fma`` intrinsic, elsewhere it multiplies and adds with two roundings. ``error_model="numpy"`` makes a
division by zero IEEE's (±Inf, NaN: torch's) instead of Python's ZeroDivisionError, whose test on every entry
kept LLVM from vectorizing a loop (DARE's division of kept entries: 24 against 3 ms per 1 Mi-entry piece).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

_F32 = ir.FloatType()
_I32 = ir.IntType(32)


@intrinsic
def _fma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """``a · b + c`` rounded once (``llvm.fma.f32``: the FMA instruction, or libm's ``fmaf`` without one)."""
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        fn = builder.module.declare_intrinsic("llvm.fma", [_F32], ir.FunctionType(_F32, [_F32, _F32, _F32]))
        return builder.call(fn, args)
    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def _f32_from_bits(typingctx: Any, bits: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], _F32)
    return types.float32(types.uint32), codegen


@intrinsic
def _bits_of_f32(typingctx: Any, value: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], _I32)
    return types.uint32(types.float32), codegen


# numba's overload wants the stub's and the implementations' parameters to match exactly: no annotations
def _load(x):  # type: ignore[no-untyped-def]
    """One entry as float32: bfloat16 (held as its uint16 bit pattern) or float32."""


@overload(_load, inline="always")
def _load_impl(x):  # type: ignore[no-untyped-def]
    if x == types.uint16:
        return lambda x: _f32_from_bits(np.uint32(x) << np.uint32(16))
    if x == types.float32:
        return lambda x: x
    return None


def _store(out, j, value):  # type: ignore[no-untyped-def]
    """``out[j] = value`` rounded to ``out``'s dtype as torch's ``.to()`` rounds it (NaN: see the loops)."""


@overload(_store, inline="always")
def _store_impl(out, j, value):  # type: ignore[no-untyped-def]
    if out.dtype == types.uint16:
        def to_bfloat16(out, j, value):  # type: ignore[no-untyped-def]
            u = _bits_of_f32(value)  # round to nearest, ties to even, on the bit pattern (c10::BFloat16)
            out[j] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        return to_bfloat16
    if out.dtype == types.float32:
        def to_float32(out, j, value):  # type: ignore[no-untyped-def]
            out[j] = value
        return to_float32
    return None


# Where torch skips a step (no normalisation, λ = 1) the loops divide or multiply by 1, which changes no bit
# (x / 1 and x · 1 are x for every float, and a value already rounded to bfloat16 rounds to itself), so that
# the loop has no branch for LLVM to keep from vectorizing it (one such made a loop 5× slower).

# Every loop returns how many results are NaN, and where there is one the caller runs the torch formula
# instead: which NaN a sum of NaN and Inf gives (its sign, its payload) depends on the order of the operands
# in the instruction, which torch's vectorized kernels and LLVM's code need not share (measured: a float32
# task arithmetic of -Inf, Inf and NaN gave 0x7FC00000 in torch, 0xFFC00000 here). NaN merges are errors
# unless --allow-nonfinite, so the torch path costs nothing that matters. They are counted in a pass of their
# own: counting inside the arithmetic loop kept LLVM from vectorizing it (1.18 against 0.63 ms per 1 Mi-entry
# linear merge of three bfloat16 inputs; with the separate pass 0.77). A NaN sum stays NaN in bfloat16: its
# payload is in the upper half (bfloat16 inputs', or the default quiet NaN), which rounding keeps.


@njit(nogil=True, inline="always", error_model="numpy")
def _count_nan(out):  # type: ignore[no-untyped-def]
    nans = 0
    for j in range(out.shape[0]):
        value = _load(out[j])
        nans += value != value
    return nans


@njit(nogil=True, cache=True, error_model="numpy")
def linear_loop(xs: Any, weights: Any, divisor: Any, out: Any) -> int:
    """``out = Σ_i w_i x_i / divisor``: torch's ``zeros().add_(x_i, alpha=w_i)…div_(divisor)``."""
    for j in range(out.shape[0]):
        acc = np.float32(0.0)
        for i in range(len(xs)):
            acc = _fma(_load(xs[i][j]), weights[i], acc)
        _store(out, j, acc / divisor)
    return _count_nan(out)


def _step(value, like):  # type: ignore[no-untyped-def]
    """``value`` rounded as a tensor op in ``like``'s dtype rounds its float32 result: to the nearest
    bfloat16 (``like`` a uint16: bfloat16 bits), or not at all (float32). A type, not a flag, so that each
    dtype gets a loop of its own: a flag tested in the loop kept LLVM from vectorizing it (4.6 against 0.9 ms
    per 1 Mi-entry task arithmetic of three bfloat16 inputs)."""


@overload(_step, inline="always")
def _step_impl(value, like):  # type: ignore[no-untyped-def]
    if like == types.uint16:
        def to_bfloat16(value, like):  # type: ignore[no-untyped-def]
            u = _bits_of_f32(value)
            return _f32_from_bits(((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                                   >> np.uint32(16)) << np.uint32(16))
        return to_bfloat16
    if like == types.float32:
        return lambda value, like: value
    return None


@njit(nogil=True, cache=True, error_model="numpy")
def task_arithmetic_loop(base: Any, xs: Any, weights: Any, divisor: Any, lambda_: Any, like: Any, out: Any) -> int:
    """``out = b + λ Σ_i w_i (x_i − b) / divisor``, each step rounded as torch's tensor ops round it in
    ``like``'s dtype (float32; or bfloat16, a config's ``dtype: bfloat16``, where the sum over models is
    still accumulated in float32 and rounded once)."""
    for j in range(out.shape[0]):
        b = _load(base[j])
        total = np.float32(0.0)
        for i in range(len(xs)):
            total = total + _step(_step(_load(xs[i][j]) - b, like) * weights[i], like)
        total = _step(_step(_step(total, like) / divisor, like) * lambda_, like)
        _store(out, j, total + b)
    return _count_nan(out)


def _key(value, like):  # type: ignore[no-untyped-def]
    """The magnitude key of ``value`` (already rounded to ``like``'s dtype): the bits of ``|value|`` in that
    dtype, as :func:`~mergelab.methods.sparsify.magnitude_keys` makes them."""


@overload(_key, inline="always")
def _key_impl(value, like):  # type: ignore[no-untyped-def]
    if like == types.uint16:
        return lambda value, like: np.int64((_bits_of_f32(value) >> np.uint32(16)) & np.uint32(0x7FFF))
    if like == types.float32:
        return lambda value, like: np.int64(_bits_of_f32(value) & np.uint32(0x7FFFFFFF))
    return None


@njit(nogil=True, cache=True, error_model="numpy")
def rule_sides_loop(base: Any, x: Any, like: Any, threshold: Any, all_at_threshold: bool, ceiling: Any,
                    all_at_ceiling: bool, above: Any, below: Any) -> int:
    """One model's top-k rule (:class:`~mergelab.methods.sparsify.TopK`) on its task vector ``x − base``:
    ``above[j]`` = key > threshold (≥ with ``all_at_threshold``), ``below[j]`` = key < ceiling (≤ with
    ``all_at_ceiling``); the tied entries the rule keeps are set by the caller. Returns how many task-vector
    entries are NaN (then the rule does not apply: the torch formula says why)."""
    nans = 0
    for j in range(above.shape[0]):
        d = _step(_load(x[j]) - _load(base[j]), like)
        key = _key(d, like)
        above[j] = (key > threshold) | (all_at_threshold & (key == threshold))
        below[j] = (key < ceiling) | (all_at_ceiling & (key == ceiling))
        nans += d != d
    return nans


@njit(nogil=True, cache=True, error_model="numpy")
def masked_consensus_loop(base: Any, xs: Any, aboves: Any, belows: Any, weights: Any, divide_kept: Any,
                          election: int, normalize: bool, divisor: Any, lambda_: Any, like: Any, out: Any) -> int:
    """Task arithmetic of masked task vectors, each step rounded as generalized_task_arithmetic's float path
    rounds it in ``like``'s dtype (sums over models in float32, rounded once). ``election`` 0: no sign
    election, ``Σ_i w_i m_i δ_i`` (/ ``divisor`` with ``normalize``); 1: the sign of that sum is elected
    (TIES), 2: the sign of the sign count; then only the agreeing entries are summed (/ the sum of their
    weights with ``normalize``, 1 where none agrees). ``m_i = aboves[i] & belows[i]`` (booleans); model
    ``i``'s kept entries are divided by ``divide_kept[i]`` first (DARE's rescale; 1 changes no bit)."""
    for j in range(out.shape[0]):
        b = _load(base[j])
        elected = np.float32(0.0)
        for i in range(len(xs)):
            kept = aboves[i][j] & belows[i][j]
            d = _step(_step(_load(xs[i][j]) - b, like) / divide_kept[i], like)
            wd = _step(np.float32(d if kept else np.float32(0.0)) * weights[i], like)
            elected = elected + (np.float32(np.sign(wd)) if election == 2 else wd)
        positive = _step(elected, like) >= np.float32(0.0)
        total = elected
        div = np.float32(0.0)
        if election != 0:
            total = np.float32(0.0)
            for i in range(len(xs)):
                kept = aboves[i][j] & belows[i][j]
                d = _step(_step(_load(xs[i][j]) - b, like) / divide_kept[i], like)
                wd = _step(np.float32(d if kept else np.float32(0.0)) * weights[i], like)
                agree = (wd > np.float32(0.0)) if positive else (wd < np.float32(0.0))
                total = total + wd * np.float32(agree)
                div = div + (weights[i] if agree else np.float32(0.0))
        mixed = _step(total, like)
        # one select, no branch: LLVM left the loop unvectorized with an if/else here (16 against 2 ms per
        # 1 Mi-entry piece of two models, its branches mispredicted on the masks' random pattern)
        chosen = _step(div, like) if election != 0 else divisor  # divisor ≠ 0: weight_sum refused that
        divisor_j = chosen if normalize and chosen != np.float32(0.0) else np.float32(1.0)
        mixed = _step(_step(mixed / divisor_j, like) * lambda_, like)
        _store(out, j, _step(mixed + b, like))
    return _count_nan(out)


_INSERTION = 16  # libstdc++'s _S_threshold: introsort leaves segments of this size to the insertion sort
_STOPS = 512  # scan positions per refill of a partition's stop lists


@njit(nogil=True, inline="always", error_model="numpy")
def _hoare_partition(v, idx, first, last, lefts, rights):  # type: ignore[no-untyped-def]
    """libstdc++'s ``__unguarded_partition(first + 1, last, first)`` (comparator ``a > b``, pivot ``v[first]``),
    moving ``idx`` alongside; returns the cut (-1 where the scan would run off the segment).

    Its i-th swap exchanges the i-th entry from the left not strictly before the pivot (``v <= pivot``) with
    the i-th from the right not strictly after it (``v >= pivot``) for as long as the two are in order; after
    the last swap the left scan stops at the next such left entry or at the last swap's right one, whichever
    comes first (mergelab/methods/std_sort.py's notes). So the stops are gathered a block at a time without a
    branch per entry (the scalar two-pointer scan mispredicted on every other entry of random keys: 89 against
    48 ms per 8 Mi bfloat16 keys at density 0.3, the same entries moved to the same places)."""
    pivot = v[first]
    next_left, next_right = first + 1, last - 1  # the next positions to scan
    n_left = i_left = n_right = i_right = 0
    last_right = last  # where the last swap's right entry was (none yet)
    while True:
        if i_left == n_left:
            n_left = i_left = 0
            end = min(next_left + lefts.shape[0], last)
            for p in range(next_left, end):
                lefts[n_left] = p
                n_left += v[p] <= pivot
            next_left = end
            if n_left == 0:
                if next_left >= last:  # no left stop remains: the scan ends at the last swap's right entry
                    return last_right if last_right < last else -1
                continue
        if i_right == n_right:
            n_right = i_right = 0
            end = max(next_right - rights.shape[0], first - 1)  # down to the pivot itself, which stops it
            for p in range(next_right, end, -1):
                rights[n_right] = p
                n_right += v[p] >= pivot
            next_right = end
            if n_right == 0:
                continue
        lo, hi = lefts[i_left], rights[i_right]
        if not lo < hi:
            return min(lo, last_right)
        v[lo], v[hi] = v[hi], v[lo]
        idx[lo], idx[hi] = idx[hi], idx[lo]
        last_right = hi
        i_left += 1
        i_right += 1


@njit(nogil=True, cache=True, error_model="numpy")
def sort_replay_loop(v: Any, idx: Any, bounds: Any, depth_limit: int) -> bool:
    """libstdc++'s introsort of ``v`` with comparator ``a > b`` (``std::sort`` as torch's CPU sort runs it),
    moving ``idx`` alongside, following only the segments that hold a rank in ``bounds`` (as
    :func:`mergelab.methods.std_sort._simulate` does with numpy's vectorized partitions). False where
    introsort would fall back to heapsort (the caller then sorts for real)."""
    lefts, rights = np.empty(_STOPS, np.int64), np.empty(_STOPS, np.int64)
    stack_first = np.empty(256, np.int64)
    stack_last = np.empty(256, np.int64)
    stack_depth = np.empty(256, np.int64)
    stack_first[0], stack_last[0], stack_depth[0] = 0, v.shape[0], depth_limit
    top = 1
    while top > 0:
        top -= 1
        first, last, depth = stack_first[top], stack_last[top], stack_depth[top]
        holds_bound = False
        for b in bounds:
            holds_bound |= (first < b) & (b < last)
        if not holds_bound:
            continue  # its inner order decides nothing
        if last - first <= _INSERTION:  # the final insertion sort: stable within the segment
            for i in range(first + 1, last):
                key, entry, j = v[i], idx[i], i
                while j > first and key > v[j - 1]:
                    v[j], idx[j] = v[j - 1], idx[j - 1]
                    j -= 1
                v[j], idx[j] = key, entry
            continue
        if depth == 0:
            return False
        # __move_median_to_first(first, first + 1, mid, last - 1)
        a, b, c = first + 1, first + (last - first) // 2, last - 1
        if v[a] > v[b]:
            m = b if v[b] > v[c] else (c if v[a] > v[c] else a)
        elif v[a] > v[c]:
            m = a
        elif v[b] > v[c]:
            m = c
        else:
            m = b
        v[first], v[m] = v[m], v[first]
        idx[first], idx[m] = idx[m], idx[first]
        cut = _hoare_partition(v, idx, first, last, lefts, rights)
        if cut < 0:
            return False
        stack_first[top], stack_last[top], stack_depth[top] = cut, last, depth - 1
        stack_first[top + 1], stack_last[top + 1], stack_depth[top + 1] = first, cut, depth - 1
        top += 2
    return True

def load_cached() -> None:
    """Run each loop once on one entry per dtype: numba's first load from its cache (or compilation, the
    first time on a machine) happens here, ~0.4 s of it importing numba's numpy support."""
    for dtype in (np.uint16, np.float32):
        x = np.zeros(1, dtype)
        x.setflags(write=False)
        ones = np.ones(2, np.float32)
        linear_loop((x, x), ones, np.float32(1), np.zeros(1, dtype))
        task_arithmetic_loop(x, (x, x), ones, np.float32(1), np.float32(1), np.float32(0), np.zeros(1, dtype))
