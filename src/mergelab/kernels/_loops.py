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


@njit(nogil=True, cache=True, error_model="numpy")
def interpolation_loop(a: Any, b: Any, ca: Any, cb: Any, out: Any) -> int:
    """``out = ca · a + cb · b`` in float32, the two products and the sum each rounded (SLERP's
    element-wise step: three torch ops)."""
    for j in range(out.shape[0]):
        _store(out, j, ca * _load(a[j]) + cb * _load(b[j]))
    return _count_nan(out)


@njit(nogil=True, cache=True, error_model="numpy")
def model_stock_loop(base: Any, xs: Any, ratio: Any, keep: Any, count: Any, like: Any, out: Any) -> int:
    """``out = ratio · (Σ_i x_i) / count + keep · base``, each step rounded as a tensor op in ``like``'s dtype
    rounds it (Model Stock's element-wise step; the sum starts from Python's 0, which makes −0 into +0)."""
    for j in range(out.shape[0]):
        total = np.float32(0.0)
        for i in range(len(xs)):
            total = _step(total + _load(xs[i][j]), like)
        mean = _step(total / count, like)
        _store(out, j, _step(_step(ratio * mean, like) + _step(keep * _load(base[j]), like), like))
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
def magnitude_keys_loop(base: Any, x: Any, like: Any, keys: Any) -> int:
    """``keys[j]``: the magnitude key of the task-vector entry ``x[j] − base[j]`` rounded to ``like``'s dtype
    (:func:`~mergelab.methods.sparsify.magnitude_keys` of ``task_vector``). Returns the largest key: above
    +Inf's bits where an entry is NaN."""
    top = 0
    for j in range(keys.shape[0]):
        key = _key(_step(_load(x[j]) - _load(base[j]), like), like)
        keys[j] = key
        top = max(top, key)
    return top


@njit(nogil=True, cache=True, error_model="numpy")
def key_histogram_loop(keys: Any, counts: Any) -> bool:
    """``counts[0] += `` how many of the 16-bit ``keys`` (read as uint16) are each value below 2^15, counted
    into ``counts``' four rows in turn and summed into the first at the end (``counts``: int32, 4 × 2^15,
    zeroed), so that runs of one key do not wait on each other's increments (4.7 against 7.0 ms for
    ``torch.bincount`` of 11.3 M bfloat16 task-vector keys, scratch benchmark, 2026-12-03). False (``counts``
    then unusable) where a key is 2^15 or more."""
    n = keys.shape[0]
    whole = n - n % 4
    high = np.uint16(0)
    for j in range(0, whole, 4):
        a, b, c, d = keys[j], keys[j + 1], keys[j + 2], keys[j + 3]
        high |= a | b | c | d
        counts[0, a & np.uint16(0x7FFF)] += 1
        counts[1, b & np.uint16(0x7FFF)] += 1
        counts[2, c & np.uint16(0x7FFF)] += 1
        counts[3, d & np.uint16(0x7FFF)] += 1
    for j in range(whole, n):
        high |= keys[j]
        counts[0, keys[j] & np.uint16(0x7FFF)] += 1
    for r in range(1, 4):
        for k in range(counts.shape[1]):
            counts[0, k] += counts[r, k]
    return high < np.uint16(0x8000)


@njit(nogil=True, inline="always", error_model="numpy")
def _agreeing_mean(total, div, election, normalize, divisor, lambda_, like):  # type: ignore[no-untyped-def]
    """A merged task-vector entry from its sums: ``total`` (of the agreeing terms; of all without an election)
    divided, with ``normalize``, by the agreeing weights ``div`` (by ``divisor`` without an election; by 1 where
    none agrees), times ``lambda_``, each step rounded to ``like``'s dtype."""
    mixed = _step(total, like)
    # one select, no branch: LLVM left the loop unvectorized with an if/else here (16 against 2 ms per 1 Mi-entry
    # piece of two models, its branches mispredicted on the masks' random pattern)
    chosen = _step(div, like) if election != 0 else divisor  # divisor ≠ 0: weight_sum refused that
    divisor_j = chosen if normalize and chosen != np.float32(0.0) else np.float32(1.0)
    return _step(_step(mixed / divisor_j, like) * lambda_, like)


def _kept(sides, belows, i, j, d, like):  # type: ignore[no-untyped-def]
    """Whether model ``i`` keeps its task-vector entry ``j`` (``d``, already rounded to ``like``'s dtype): from the
    booleans ``sides[i][j] & belows[i][j]`` (tuples of arrays), or from ``d``'s magnitude key by ``sides``, an int32
    array of rules (one row per model: threshold, every entry tied at it kept, ceiling, every entry tied at it
    kept), or'ed with ``belows[i][j]`` (the entries the rule keeps by name, tied at its threshold or ceiling), where
    ``belows`` is a tuple of boolean arrays, not None (a 2-D array's ``belows[i, j]`` left the loop unvectorized:
    5.5 against 1.2 ms per 1 Mi-entry bfloat16 piece of two models, 2026-12-05)."""


@overload(_kept, inline="always")
def _kept_impl(sides, belows, i, j, d, like):  # type: ignore[no-untyped-def]
    if not isinstance(sides, types.Array):
        return lambda sides, belows, i, j, d, like: sides[i][j] & belows[i][j]
    if isinstance(belows, types.NoneType):
        return lambda sides, belows, i, j, d, like: _by_rule(sides, i, np.int32(_key(d, like)))
    return lambda sides, belows, i, j, d, like: _by_rule(sides, i, np.int32(_key(d, like))) | belows[i][j]


@njit(nogil=True, inline="always", error_model="numpy")
def _by_rule(rules, i, key):  # type: ignore[no-untyped-def]
    """Whether rule ``i`` (a row of :func:`_kept`'s ``sides``) keeps an entry of magnitude key ``key``, ties aside.
    Keys compare as int32 (bfloat16's and float32's magnitude bits fit; thresholds and ceilings at most int32's
    largest); with int64 keys the same test took 1.30 against 0.46 ms per 1 Mi bfloat16 entries (2026-12-03)."""
    low, high = rules[i, 0], rules[i, 2]
    return ((key > low) | ((rules[i, 1] != 0) & (key == low))) & ((key < high) | ((rules[i, 3] != 0) & (key == high)))


@njit(nogil=True, cache=True, error_model="numpy")
def masked_consensus_loop(base: Any, xs: Any, aboves: Any, belows: Any, weights: Any, divide_kept: Any,
                          election: int, normalize: bool, divisor: Any, lambda_: Any, like: Any,
                          out: Any) -> tuple[int, bool]:
    """Task arithmetic of masked task vectors, each step rounded as generalized_task_arithmetic's float path
    rounds it in ``like``'s dtype (sums over models in float32, rounded once). ``election`` 0: no sign
    election, ``Σ_i w_i m_i δ_i`` (/ ``divisor`` with ``normalize``); 1: the sign of that sum is elected
    (TIES), 2: the sign of the sign count; then only the agreeing entries are summed (/ the sum of their
    weights with ``normalize``, 1 where none agrees). ``m_i = aboves[i] & belows[i]`` (booleans), or each
    model's rule applied to its entry's key (``aboves`` an int32 array of rules, ``belows`` None or the entries
    kept by name: :func:`_kept`); model ``i``'s kept entries are divided by ``divide_kept[i]`` first (DARE's
    rescale; None: by none, the loop compiled without the divisions, which took 0.6 of 4.3 ms per 1 Mi-entry
    bfloat16 TIES piece of two models, one thread, 2026-12-03). Returns the NaN count of ``out`` and whether a
    task-vector entry is NaN (which a rule cannot rank: the caller then lets the torch formula say why)."""
    nan = False
    for j in range(out.shape[0]):
        b = _load(base[j])
        elected = np.float32(0.0)
        for i in range(len(xs)):
            d = _step(_load(xs[i][j]) - b, like)
            nan |= d != d
            kept = _kept(aboves, belows, i, j, d, like)
            if divide_kept is not None:
                d = _step(d / divide_kept[i], like)
            wd = _step(np.float32(d if kept else np.float32(0.0)) * weights[i], like)
            elected = elected + (np.float32(np.sign(wd)) if election == 2 else wd)
        positive = _step(elected, like) >= np.float32(0.0)
        total = elected
        div = np.float32(0.0)
        if election != 0:
            total = np.float32(0.0)
            # the term again, written out: as an inline helper shared by both passes, TIES' bfloat16 piece of three
            # models took 37.5 against 6.0 ms (benchmarks/compiled_loops.py, 2026-12-03)
            for i in range(len(xs)):
                d = _step(_load(xs[i][j]) - b, like)
                kept = _kept(aboves, belows, i, j, d, like)
                if divide_kept is not None:
                    d = _step(d / divide_kept[i], like)
                wd = _step(np.float32(d if kept else np.float32(0.0)) * weights[i], like)
                agree = (wd > np.float32(0.0)) if positive else (wd < np.float32(0.0))
                total = total + wd * np.float32(agree)
                div = div + (weights[i] if agree else np.float32(0.0))
        _store(out, j, _step(_agreeing_mean(total, div, election, normalize, divisor, lambda_, like) + b, like))
    return _count_nan(out), nan


@njit(nogil=True, cache=True, error_model="numpy")
def rescaled_drop_loop(delta: Any, probabilities: Any, draws: Any, out: Any) -> int:
    """``out = delta / p`` where ``draws < p``, else +0: torch's ``delta.masked_fill_(~(draws < p), 0).div_(p)``
    (DELLA's drop with its paper's rescale), each entry rounded once to ``out``'s dtype. ``out`` may be
    ``delta``."""
    for j in range(out.shape[0]):
        p = _load(probabilities[j])
        quotient = _load(delta[j]) / p
        # in a variable: the conditional expression passed straight to _store stored garbage (numba 0.68)
        value = quotient if draws[j] < p else np.float32(0.0)
        _store(out, j, value)
    return _count_nan(out)


@njit(nogil=True, inline="always", error_model="numpy")
def _dropped_term(delta, probability, draw, weight, like):  # type: ignore[no-untyped-def]
    """One model's weighted term: its entry divided by its keep probability and rounded to ``like``'s dtype
    where the coin keeps it, else +0 (rescaled_drop_loop's value), read back as the task vector of a base of
    −0 (``x − (−0)``: a −0 becomes +0, as merge_task_vectors' fused pass sees it), times the weight."""
    p = _load(probability)
    quotient = _step(_load(delta) / p, like)
    kept = quotient if draw < p else np.float32(0.0)
    return _step(_step(kept - np.float32(-0.0), like) * weight, like)


@njit(nogil=True, cache=True, error_model="numpy")
def dropped_consensus_loop(base: Any, deltas: Any, probabilities: Any, draws: Any, weights: Any, election: int,
                           normalize: bool, divisor: Any, lambda_: Any, like: Any, out: Any) -> tuple[int, bool]:
    """DELLA's drop, rescale and merge in one pass over its task vectors (``deltas``, in the arithmetic dtype):
    model ``i``'s entry ``j`` kept where ``draws[i][j] < probabilities[i][j]`` and divided by that probability,
    then masked_consensus_loop's arithmetic on the kept values with the base added last, every step rounded as
    rescaled_drop_loop followed by merge_task_vectors round it (the same bits: kernels/random_drops.py checks).
    The two passes wrote each model's kept task vector out and read it back, and merge_task_vectors added the
    base in a pass of its own. Returns the NaN count of ``out`` and whether every entry of every delta, kept or
    dropped, is finite (a dropped NaN leaves no trace in ``out``: the engine scans the inputs unless this says
    they are finite)."""
    finite = True
    for j in range(out.shape[0]):
        elected = np.float32(0.0)
        for i in range(len(deltas)):
            finite &= np.abs(_load(deltas[i][j])) < np.float32(np.inf)
            wd = _dropped_term(deltas[i][j], probabilities[i][j], draws[i][j], weights[i], like)
            elected = elected + (np.float32(np.sign(wd)) if election == 2 else wd)
        positive = _step(elected, like) >= np.float32(0.0)
        total = elected
        div = np.float32(0.0)
        if election != 0:
            total = np.float32(0.0)
            for i in range(len(deltas)):
                wd = _dropped_term(deltas[i][j], probabilities[i][j], draws[i][j], weights[i], like)
                agree = (wd > np.float32(0.0)) if positive else (wd < np.float32(0.0))
                total = total + wd * np.float32(agree)
                div = div + (weights[i] if agree else np.float32(0.0))
        mixed = _agreeing_mean(total, div, election, normalize, divisor, lambda_, like)
        _store(out, j, _step(_step(mixed + np.float32(-0.0), like) + _load(base[j]), like))
    return _count_nan(out), finite


# The 32-bit Mersenne Twister (Matsumoto & Nishimura 1998) as torch's CPU generator runs it (at::mt19937), and
# torch's float32 uniform: the low 24 bits of one output times 2^-24 (at::uniform_real_distribution).
MT_WORDS, _MT_M = 624, 397  # the state's words (mersenne_draws sizes it), the twist's offset
_MT_UPPER, _MT_LOWER, _MT_MATRIX = np.uint32(0x80000000), np.uint32(0x7FFFFFFF), np.uint32(0x9908B0DF)
_MT_B, _MT_C, _MT_24 = np.uint32(0x9D2C5680), np.uint32(0xEFC60000), np.uint32(0xFFFFFF)
_U1, _U7, _U11, _U15, _U18 = (np.uint32(k) for k in (1, 7, 11, 15, 18))
_TWO_TO_MINUS_24 = np.float32(2.0 ** -24)


@njit(nogil=True, inline="always")
def _mt_twist(mt):  # type: ignore[no-untyped-def]
    """The next 624 words of the state in place. The modulo of the reference loop split into its three ranges
    and the branch on the low bit made a mask, so that the loops vectorize."""
    for k in range(MT_WORDS - _MT_M):
        y = (mt[k] & _MT_UPPER) | (mt[k + 1] & _MT_LOWER)
        mt[k] = mt[k + _MT_M] ^ (y >> _U1) ^ ((np.uint32(0) - (y & _U1)) & _MT_MATRIX)
    for k in range(MT_WORDS - _MT_M, MT_WORDS - 1):
        y = (mt[k] & _MT_UPPER) | (mt[k + 1] & _MT_LOWER)
        mt[k] = mt[k + _MT_M - MT_WORDS] ^ (y >> _U1) ^ ((np.uint32(0) - (y & _U1)) & _MT_MATRIX)
    y = (mt[MT_WORDS - 1] & _MT_UPPER) | (mt[0] & _MT_LOWER)
    mt[MT_WORDS - 1] = mt[_MT_M - 1] ^ (y >> _U1) ^ ((np.uint32(0) - (y & _U1)) & _MT_MATRIX)


@njit(nogil=True, cache=True)
def mt_seed_loop(seed, mt):  # type: ignore[no-untyped-def]
    """``mt`` (624 uint32) as torch's ``manual_seed(seed)`` leaves it: Knuth's initialization from the seed's
    low 32 bits (``init_genrand``)."""
    mt[0] = np.uint32(seed & 0xFFFFFFFF)
    for k in range(1, MT_WORDS):
        previous = np.uint64(mt[k - 1])
        mt[k] = np.uint32((np.uint64(1812433253) * (previous ^ (previous >> np.uint64(30))) + np.uint64(k))
                          & np.uint64(0xFFFFFFFF))


@njit(nogil=True, cache=True)
def mt_uniform_loop(mt, position, out):  # type: ignore[no-untyped-def]
    """Fill the float32 ``out`` with the next draws of the twister ``mt`` whose next word is ``position[0]``
    (624: twist first), as ``torch.rand(n, generator=g)``; advances ``mt`` and ``position``. Tempered a block of
    the state at a time, which vectorizes: 0.9 against torch's 2.7–2.9 ms per 1 Mi draws, one thread
    (2026-12-04)."""
    at, n, j = position[0], out.shape[0], 0
    while j < n:
        if at >= MT_WORDS:
            _mt_twist(mt)
            at = 0
        m = min(MT_WORDS - at, n - j)
        for i in range(m):
            y = mt[at + i]
            y ^= y >> _U11
            y ^= (y << _U7) & _MT_B
            y ^= (y << _U15) & _MT_C
            y ^= y >> _U18
            out[j + i] = np.float32(y & _MT_24) * _TWO_TO_MINUS_24
        at += m
        j += m
    position[0] = at


_INSERTION = 16  # libstdc++'s _S_threshold: introsort leaves segments of this size to the insertion sort
_STOPS = 512  # scan positions per refill of a partition's stop lists
# A tagged replay's entries (tagged_replay_loop): below TAG a key; an entry equal to the first edge key
# ``TAG + flat index``, one equal to the second ``TAG + n + flat index`` (``n`` entries). Keys are 16-bit magnitudes,
# negated for an ascending sort: |key| < TAG.
TAG = 1 << 16
_EVERYTHING = 1 << 62  # a range width that no difference of two int32 reaches
# A packed replay's entries (row_ranks_loop, 16-bit keys, rows of at most 2^16 entries): the key shifted up by
# PACKED, the entry's position in its row in the bits below, so that a swap moves one word instead of a key and a
# position; the comparisons read the key alone (``edges``: the shift, an integer), so ties stay ties.
PACKED = 16
POSITION = (1 << PACKED) - 1


def _sort_key(v, i, edges):  # type: ignore[no-untyped-def]
    """The key of entry ``i`` of the replay's array: ``v[i]`` itself (``edges`` None), the bits above
    :data:`PACKED` (``edges`` the shift), or decoded from a tag (``edges``: the tagged replay's two edge keys and
    ``TAG + n``)."""


@overload(_sort_key, inline="always")
def _sort_key_impl(v, i, edges):  # type: ignore[no-untyped-def]
    if isinstance(edges, types.NoneType):
        return lambda v, i, edges: v[i]
    if isinstance(edges, types.Integer):
        return lambda v, i, edges: np.int64(v[i]) >> PACKED

    def decoded(v, i, edges):  # type: ignore[no-untyped-def]
        # arithmetic, not a conditional: numba's IR inliner warned of a variable out of scope with one (0.68)
        c = np.int64(v[i])
        first, second = np.int64(c >= TAG), np.int64(c >= edges[2])
        return c * (1 - first) + edges[0] * (first - second) + edges[1] * second
    return decoded


def _scan_ranges(pivot, edges):  # type: ignore[no-untyped-def]
    """What a partition around key ``pivot`` counts, as two ranges of raw entries that one unsigned comparison
    each tests (:func:`_at_most`, :func:`_at_least`): the entries at most the pivot are those outside ``(pivot,
    at_most_end)``, those at least the pivot inside ``[pivot, at_least_end)``; returns ``(pivot + 1,
    at_most_end - pivot - 1, pivot, at_least_end - pivot)``. For tags, above every key, the ends say which count:
    the second edge's tags lie above the first's and its key is not above the first's (``edges[1] <=
    edges[0]``), so that the counted tags are always a run at one end: where an edge is at most the pivot, so is
    every tag above its first; where one is at least the pivot, every tag below its last. So a scan decodes no
    tag (a decoded comparison made the replay of 32 Mi bfloat16 keys 1.5–2× slower: scratch benchmark,
    2026-12-03)."""


@overload(_scan_ranges, inline="always")
def _scan_ranges_impl(pivot, edges):  # type: ignore[no-untyped-def]
    if isinstance(edges, types.NoneType):
        return lambda pivot, edges: (np.int64(0), np.int64(0), np.int64(0), np.int64(0))  # unused: _at_most
    if isinstance(edges, types.Integer):  # every word of key ``pivot`` lies in [pivot << PACKED, that | POSITION]
        return lambda pivot, edges: (np.int64(pivot) << PACKED | POSITION, np.int64(pivot) << PACKED, np.int64(0),
                                     np.int64(0))

    def ranges(pivot, edges):  # type: ignore[no-untyped-def]
        p, split = np.int64(pivot), edges[2]
        # at most: tags from TAG (both edges), from split (the second only), or none
        at_most_end = p + 1 + _EVERYTHING
        at_most_end -= (edges[1] <= p) * (at_most_end - split)
        at_most_end -= (edges[0] <= p) * (at_most_end - TAG)
        # at least: tags up to the end (both), up to split (the first only), or none
        at_least_end = np.int64(TAG)
        at_least_end += (edges[0] >= p) * (split - at_least_end)
        at_least_end += (edges[1] >= p) * (p + _EVERYTHING - at_least_end)
        return p + 1, at_most_end - p - 1, p, at_least_end - p
    return ranges


def _at_most(c, pivot, ranges, edges):  # type: ignore[no-untyped-def]
    """Whether entry ``c``'s key is at most ``pivot`` (``ranges``: :func:`_scan_ranges`'): plain keys compare
    themselves, as cheap as before the tagged replay."""


@overload(_at_most, inline="always")
def _at_most_impl(c, pivot, ranges, edges):  # type: ignore[no-untyped-def]
    if isinstance(edges, types.NoneType):
        return lambda c, pivot, ranges, edges: c <= pivot
    if isinstance(edges, types.Integer):
        return lambda c, pivot, ranges, edges: c <= ranges[0]
    # outside (pivot, at_most_end), as one unsigned comparison
    return lambda c, pivot, ranges, edges: np.uint64(np.int64(c) - ranges[0]) >= np.uint64(ranges[1])


def _at_least(c, pivot, ranges, edges):  # type: ignore[no-untyped-def]
    """Whether entry ``c``'s key is at least ``pivot`` (as :func:`_at_most`)."""


@overload(_at_least, inline="always")
def _at_least_impl(c, pivot, ranges, edges):  # type: ignore[no-untyped-def]
    if isinstance(edges, types.NoneType):
        return lambda c, pivot, ranges, edges: c >= pivot
    if isinstance(edges, types.Integer):
        return lambda c, pivot, ranges, edges: c >= ranges[1]
    # inside [pivot, at_least_end), as one unsigned comparison
    return lambda c, pivot, ranges, edges: np.uint64(np.int64(c) - ranges[2]) < np.uint64(ranges[3])


def _swap(v, idx, a, b):  # type: ignore[no-untyped-def]
    """Exchange entries ``a`` and ``b`` of the replay's array and of its flat indices ``idx`` (None where the
    entries carry what is needed of their indices: the tagged replay)."""


@overload(_swap, inline="always")
def _swap_impl(v, idx, a, b):  # type: ignore[no-untyped-def]
    if isinstance(idx, types.NoneType):
        def swap(v, idx, a, b):  # type: ignore[no-untyped-def]
            v[a], v[b] = v[b], v[a]
        return swap

    def swap_both(v, idx, a, b):  # type: ignore[no-untyped-def]
        v[a], v[b] = v[b], v[a]
        idx[a], idx[b] = idx[b], idx[a]
    return swap_both


def _index_at(idx, i):  # type: ignore[no-untyped-def]
    """``idx[i]``, or 0 where there are no flat indices (the tagged replay)."""


@overload(_index_at, inline="always")
def _index_at_impl(idx, i):  # type: ignore[no-untyped-def]
    if isinstance(idx, types.NoneType):
        return lambda idx, i: 0
    return lambda idx, i: idx[i]


def _set_index(idx, i, value):  # type: ignore[no-untyped-def]
    """``idx[i] = value``, nothing where there are no flat indices. The insertion sort shifts entries instead of
    swapping them: DELLA's whole-row sorts, many of them insertion sorts, took 31–34 ms per 1024 rows of 1024 with
    swaps, 29 with shifts, as before the tagged replay (benchmarks/compiled_loops.py, 2026-12-03)."""


@overload(_set_index, inline="always")
def _set_index_impl(idx, i, value):  # type: ignore[no-untyped-def]
    if isinstance(idx, types.NoneType):
        def nothing(idx, i, value):  # type: ignore[no-untyped-def]
            pass
        return nothing

    def store(idx, i, value):  # type: ignore[no-untyped-def]
        idx[i] = value
    return store


@njit(nogil=True, inline="always", error_model="numpy")
def _hoare_partition(v, idx, edges, first, last, lefts, rights):  # type: ignore[no-untyped-def]
    """libstdc++'s ``__unguarded_partition(first + 1, last, first)`` (comparator ``a > b``, pivot the key of
    ``v[first]``), moving ``idx`` alongside; returns the cut (-1 where the scan would run off the segment).

    Its i-th swap exchanges the i-th entry from the left not strictly before the pivot (``v <= pivot``) with
    the i-th from the right not strictly after it (``v >= pivot``) for as long as the two are in order; after
    the last swap the left scan stops at the next such left entry or at the last swap's right one, whichever
    comes first (mergelab/methods/std_sort.py's notes). So the stops are gathered a block at a time without a
    branch per entry (the scalar two-pointer scan mispredicted on every other entry of random keys: 89 against
    48 ms per 8 Mi bfloat16 keys at density 0.3, the same entries moved to the same places). Positions index
    as unsigned integers: a signed position read from the stop lists costs numba a negative-index test per
    access, which halved the replay's speed (11.3 Mi bfloat16 task-vector keys at density 0.3, one thread:
    28.7 against 14.7 ms, the same ranks; scratch benchmark, 2026-12-03)."""
    u = np.uint64
    pivot = _sort_key(v, u(first), edges)
    ranges = _scan_ranges(pivot, edges)
    next_left, next_right = first + 1, last - 1  # the next positions to scan
    n_left = i_left = n_right = i_right = 0
    last_right = last  # where the last swap's right entry was (none yet)
    # stops gathered per refill: an eighth of the segment (at least 64, at most the lists' size), since a refill
    # scans the whole block whether the swaps need it or not (a segment below 512 entries was scanned twice
    # whole); DELLA's rows of 1024-2048 entries, every level sorted: 300 against 315 ms per 5504 × 2048 bfloat16
    # task vector with packed words, the same ranks (scratch benchmark, 2026-12-03)
    block = min(max(64, (last - first) >> 3), lefts.shape[0])
    while True:
        if i_left == n_left:
            n_left = i_left = 0
            end = min(next_left + block, last)
            for p in range(next_left, end):
                lefts[u(n_left)] = p
                n_left += _at_most(v[u(p)], pivot, ranges, edges)
            next_left = end
            if n_left == 0:
                if next_left >= last:  # no left stop remains: the scan ends at the last swap's right entry
                    return last_right if last_right < last else -1
                continue
        if i_right == n_right:
            n_right = i_right = 0
            end = max(next_right - block, first - 1)  # down to the pivot itself, which stops it
            for p in range(next_right, end, -1):
                rights[u(n_right)] = p
                n_right += _at_least(v[u(p)], pivot, ranges, edges)
            next_right = end
            if n_right == 0:
                continue
        lo, hi = lefts[u(i_left)], rights[u(i_right)]
        if not lo < hi:
            return min(lo, last_right)
        _swap(v, idx, u(lo), u(hi))
        last_right = hi
        i_left += 1
        i_right += 1


@njit(nogil=True, inline="always", error_model="numpy")
def _introsort(v, idx, edges, bounds, every_rank, depth_limit, lefts, rights, stack_first, stack_last, stack_depth):  # type: ignore[no-untyped-def]
    """libstdc++'s introsort of ``v`` (comparator ``a > b`` on the keys: :func:`_sort_key`), moving ``idx``
    alongside, following the segments that hold a rank in ``bounds`` (every segment with ``every_rank``: the
    whole sort). False where introsort would fall back to heapsort."""
    stack_first[0], stack_last[0], stack_depth[0] = 0, v.shape[0], depth_limit
    top = 1
    while top > 0:
        top -= 1
        first, last, depth = stack_first[top], stack_last[top], stack_depth[top]
        holds_bound = every_rank
        for b in bounds:
            holds_bound |= (first < b) & (b < last)
        if not holds_bound:
            continue  # its inner order decides nothing
        if last - first <= _INSERTION:  # the final insertion sort: stable within the segment
            for i in range(first + 1, last):
                entry, key, position, j = v[i], _sort_key(v, i, edges), _index_at(idx, i), i
                while j > first and key > _sort_key(v, j - 1, edges):
                    v[j] = v[j - 1]
                    _set_index(idx, j, _index_at(idx, j - 1))
                    j -= 1
                v[j] = entry
                _set_index(idx, j, position)
            continue
        if depth == 0:
            return False
        # __move_median_to_first(first, first + 1, mid, last - 1)
        a, b, c = first + 1, first + (last - first) // 2, last - 1
        ka, kb, kc = _sort_key(v, a, edges), _sort_key(v, b, edges), _sort_key(v, c, edges)
        if ka > kb:
            m = b if kb > kc else (c if ka > kc else a)
        elif ka > kc:
            m = a
        elif kb > kc:
            m = c
        else:
            m = b
        _swap(v, idx, first, m)
        cut = _hoare_partition(v, idx, edges, first, last, lefts, rights)
        if cut < 0:
            return False
        stack_first[top], stack_last[top], stack_depth[top] = cut, last, depth - 1
        stack_first[top + 1], stack_last[top + 1], stack_depth[top + 1] = first, cut, depth - 1
        top += 2
    return True


@njit(nogil=True, cache=True, error_model="numpy")
def sort_replay_loop(v: Any, idx: Any, bounds: Any, depth_limit: int) -> bool:
    """libstdc++'s introsort of ``v`` with comparator ``a > b`` (``std::sort`` as torch's CPU sort runs it),
    moving ``idx`` alongside, following only the segments that hold a rank in ``bounds`` (as
    :func:`mergelab.methods.std_sort._simulate` does with numpy's vectorized partitions). False where
    introsort would fall back to heapsort (the caller then sorts for real)."""
    lefts, rights = np.empty(_STOPS, np.int64), np.empty(_STOPS, np.int64)
    stacks = np.empty((3, 256), np.int64)
    return _introsort(v, idx, None, bounds, False, depth_limit, lefts, rights, stacks[0], stacks[1], stacks[2])


@njit(nogil=True, cache=True, error_model="numpy")
def tagged_replay_loop(room: Any, n: int, edges: Any, negate: bool, bounds: Any, depth_limit: int) -> bool:
    """:func:`sort_replay_loop` for ``n`` 16-bit keys held in the first half of ``room`` (int32, ``n`` entries:
    the keys' own memory, twice as wide), with no array of flat indices: the keys are widened in place, last
    first (entry ``i`` is written over keys ``2i`` and ``2i + 1``, both read by then), negated where ``negate``
    (an ascending sort), and each entry equal to ``edges[0]`` or ``edges[1]`` (the keys negated alike, the second
    not above the first) is tagged with its flat index instead (:data:`TAG`), which the comparisons read as the
    edge's key.
    So the ranks in ``bounds`` end up holding the entries torch's sort puts there, the tied ones telling their
    flat index: 4 bytes per entry instead of the keys' 2 and the indices' 4. False as for the plain replay."""
    for i in range(n - 1, -1, -1):
        word = room[i >> 1]
        key = np.int32((word >> (16 * (i & 1))) & 0xFFFF)  # little-endian: key 2m is the low half of word m
        if negate:
            key = -key
        # branches beat arithmetic selects here: 42 against 60 ms for 32 Mi entries (scratch benchmark)
        if key == edges[0]:
            key = np.int32(TAG + i)
        elif key == edges[1]:
            key = np.int32(TAG + n + i)
        room[i] = key
    lefts, rights = np.empty(_STOPS, np.int64), np.empty(_STOPS, np.int64)
    stacks = np.empty((3, 256), np.int64)
    decoding = np.empty(3, np.int64)  # what _sort_key and _scan_ranges decode tags with
    decoding[0], decoding[1], decoding[2] = edges[0], edges[1], TAG + n
    v = room[:n]
    return _introsort(v, None, decoding, bounds, False, depth_limit, lefts, rights, stacks[0], stacks[1], stacks[2])


@njit(nogil=True, cache=True, error_model="numpy")
def row_ranks_loop(keys: Any, depth_limit: int, inf_bits: int, table: Any, out: Any) -> int:
    """``out[r · n + j] = table[k]``, ``k`` where ``torch.argsort(x, dim=1)`` (ascending, CPU, not stable) puts
    entry ``j`` of row ``r`` (``table`` the ranks themselves: the ranks), from integer ``keys`` that compare as
    ``x`` does (each row sorted whole by the replay, on negated keys: ascending by ``a < b`` is descending by
    ``-a > -b``). Returns -1; -2 where a key is negative or above ``inf_bits`` (a sign bit, or NaN: torch's
    comparator ties every NaN); or the first row where introsort would fall back to heapsort (``out`` then
    unfinished)."""
    n = keys.shape[1]
    # int32 (rows below 2^31 entries; negated keys of 16- and 32-bit magnitudes fit): 0.19 against 0.21 s for
    # int64 on a 5504 × 2048 bfloat16 task vector
    v, idx = np.empty(n, np.int32), np.empty(n, np.int32)
    lefts, rights = np.empty(_STOPS, np.int64), np.empty(_STOPS, np.int64)
    stacks = np.empty((3, 256), np.int64)
    no_bounds = np.empty(0, np.int64)
    # 16-bit keys and their positions packed in one word (PACKED): 300 against 316-322 ms per 5504 × 2048
    # bfloat16 task vector, the same ranks (both with the partition's adaptive block; scratch benchmark,
    # 2026-12-03)
    packed = keys.itemsize == 2 and n <= POSITION + 1
    shift = np.int64(PACKED)
    for r in range(keys.shape[0]):
        outside = False
        for j in range(n):
            key = np.int32(keys[r, j])
            outside |= (key < 0) | (key > inf_bits)
            if packed:
                v[j] = np.int32((-np.int64(key) << PACKED) | j)  # -0x7F80 << 16 fits int32; others return -2
            else:
                v[j] = -key
                idx[j] = j
        if outside:
            return -2
        row = r * n
        if packed:
            if not _introsort(v, None, shift, no_bounds, True, depth_limit, lefts, rights, stacks[0], stacks[1],
                              stacks[2]):
                return r
            for j in range(n):
                out[row + (v[j] & POSITION)] = table[j]
            continue
        if not _introsort(v, idx, None, no_bounds, True, depth_limit, lefts, rights, stacks[0], stacks[1], stacks[2]):
            return r
        for j in range(n):
            out[row + idx[j]] = table[j]
    return -1


_HIGH_DIGITS = 128  # values of a 15-bit magnitude key's top 7 bits
_COUNTED_SPAN = 2  # a row whose nonzero keys span at most this many buckets per entry is ranked by counting


@njit(nogil=True, inline="always", error_model="numpy")
def _key_bucket(key):  # type: ignore[no-untyped-def]
    """A magnitude key's bucket of the counting sort: 0 for the zeros, ``key + 1`` for the others."""
    return (key + 1) * (key != 0)


@njit(nogil=True, inline="always", error_model="numpy")
def _ranks_by_counting(row, smallest, largest, table, out, start, counts):  # type: ignore[no-untyped-def]
    """A counting sort's ranks of one row already counted into ``counts`` (by :func:`_key_bucket`), its nonzero
    keys in ``[smallest, largest]``: each bucket's first rank, then each entry, in index order, takes its
    bucket's next; ``counts`` is left zero."""
    below = counts[0]
    counts[0] = 0
    for d in range(smallest + 1, largest + 2):
        count = counts[d]
        counts[d] = below
        below += count
    magnitude = np.uint16(0x7FFF)
    for j in range(row.shape[0]):
        d = _key_bucket(np.int64(row[j] & magnitude))
        out[start + j] = table[counts[d]]
        counts[d] += 1
    counts[0] = 0
    counts[smallest + 1:largest + 2] = 0


@njit(nogil=True, inline="always", error_model="numpy")
def _ranks_by_radix(row, table, out, start, low, high, order):  # type: ignore[no-untyped-def]
    """An LSD radix sort's ranks of one row, on the key's low 8 bits then its top 7: a histogram pass, a
    scatter by the low digit, and a pass in that order that hands out each top digit's ranks in turn. The top
    digit's histogram is kept four times over (by ``j mod 4``): most entries of a row share two or three top
    digits, and one counter incremented by each is a chain of dependent stores (1.06 against 1.49 ns per
    entry for the histogram pass, 2048 × 2048 bfloat16, scratch benchmark 2026-12-05)."""
    n = row.shape[0]
    magnitude = np.uint16(0x7FFF)
    low[:] = 0
    high[:] = 0
    for j in range(n):
        key = row[j] & magnitude
        low[key & 255] += 1
        high[j & 3, key >> 8] += 1
    below = 0
    for d in range(256):
        count = low[d]
        low[d] = below
        below += count
    below = 0
    for d in range(_HIGH_DIGITS):
        count = high[0, d] + high[1, d] + high[2, d] + high[3, d]
        high[0, d] = below
        below += count
    for j in range(n):
        key = np.int64(row[j] & magnitude)
        d = key & 255
        order[low[d]] = (key >> 8) << 32 | j  # the top digit beside the position: no second read of the row
        low[d] += 1
    for t in range(n):
        packed = order[t]
        d = packed >> 32
        out[start + (packed & 0xFFFFFFFF)] = table[high[0, d]]
        high[0, d] += 1


@njit(nogil=True, cache=True, error_model="numpy")
def stable_row_ranks_loop(bits: Any, inf_bits: int, table: Any, out: Any) -> int:
    """``out[r · n + j] = table[k]``, ``k`` where a stable ascending sort of row ``r``'s magnitudes puts entry
    ``j`` (ties by index), from the rows' 16-bit patterns (``bits``, 2-D; the sign bit is cleared here, so that
    no ``abs`` pass is needed: a magnitude's pattern orders as its value). Each row is counted by key as its
    smallest and largest nonzero keys are found; one whose keys span at most ``_COUNTED_SPAN`` buckets per entry
    (a task vector's row spans a few binades: 0.24–0.59 of its length on the benchmark's models) is then ranked
    by that count, any other by a radix sort (2048-wide bfloat16 rows, one thread: 2.4–2.7 ns per entry, against
    2.7–3.1 with a pass of its own for the extremes and 4.0–4.5 for the radix sort alone; scratch benchmarks
    2026-12-05). Returns -1, or the first row holding a key above ``inf_bits`` (NaN: the caller sorts that
    tensor as torch does)."""
    rows, n = bits.shape
    counts = np.zeros(0x8000 + 2, np.int32)  # by _key_bucket, zero between rows
    low, high = np.empty(256, np.int64), np.empty((4, _HIGH_DIGITS), np.int64)
    order = np.empty(n, np.int64)
    magnitude = np.uint16(0x7FFF)
    for r in range(rows):
        row = bits[r]
        smallest, largest = np.int64(0x7FFF), np.int64(0)
        for j in range(n):
            key = np.int64(row[j] & magnitude)
            counts[_key_bucket(key)] += 1
            largest = max(largest, key)
            smallest = min(smallest, key if key != 0 else np.int64(0x7FFF))
        if largest > inf_bits:
            return r
        smallest = min(smallest, largest)
        if largest - smallest + 1 <= _COUNTED_SPAN * n:
            _ranks_by_counting(row, smallest, largest, table, out, r * n, counts)
            continue
        for j in range(n):  # the row's own buckets cleared: n stores, not one per bucket of its span
            counts[_key_bucket(np.int64(row[j] & magnitude))] = 0
        _ranks_by_radix(row, table, out, r * n, low, high, order)
    return -1


# torch's CPU sum and 2-norm of a long row, replayed (methods/row_sums.py says in which order torch adds):
# each row's state is its accumulators, fed whole steps (sums) or whole vectors (norms) a block at a time, the
# entries past the last whole step or vector kept for the end. A producer loop computes a block of each row's
# values into a small scratch (in L1), then folds it in: one pass over the inputs for every row at once.
_ILP = 4  # vectors per step of torch's cascade sum
LANES = 8  # float32 lanes of torch's reduction vectors (8 on this AVX-512 machine too); others: numpy replay
_BLOCK = 4096  # entries per block of a producer's scratch: a whole number of steps for every vector width


@njit(nogil=True, inline="always", error_model="numpy")
def _lanes_added(row, at, stride, count, halves, acc):  # type: ignore[no-untyped-def]
    """``acc`` (one vector's 8 lanes) plus the vectors at ``row[at + i · stride]``, ``i < count``, in order
    (a bfloat16 vector's two halves added first). The lanes are 8 scalars, not an array, so that they stay in
    registers (in an array they went through memory, lane by lane); the indices are unsigned, so that numba
    adds no negative-index test to each load (2.1× faster: 0.29 against 0.14 ns per entry, measured on the
    norms' loop below)."""
    a0, a1, a2, a3, a4, a5, a6, a7 = acc
    one = np.uint64(1)
    for i in range(count):
        p = np.uint64(at + i * stride)
        x0, x1, x2, x3 = row[p], row[p + one], row[p + 2 * one], row[p + 3 * one]
        x4, x5, x6, x7 = row[p + 4 * one], row[p + 5 * one], row[p + 6 * one], row[p + 7 * one]
        if halves:
            h = p + 8 * one
            x0, x1, x2, x3 = x0 + row[h], x1 + row[h + one], x2 + row[h + 2 * one], x3 + row[h + 3 * one]
            x4, x5, x6, x7 = x4 + row[h + 4 * one], x5 + row[h + 5 * one], x6 + row[h + 6 * one], x7 + row[h + 7 * one]
        a0, a1, a2, a3, a4, a5, a6, a7 = a0 + x0, a1 + x1, a2 + x2, a3 + x3, a4 + x4, a5 + x5, a6 + x6, a7 + x7
    return a0, a1, a2, a3, a4, a5, a6, a7


@njit(nogil=True, inline="always", error_model="numpy")
def _squares_added(row, stop, acc):  # type: ignore[no-untyped-def]
    """``acc`` (8 lanes) plus the squares of ``row[:stop]`` read 8 at a time (``stop`` a multiple of 8)."""
    a0, a1, a2, a3, a4, a5, a6, a7 = acc
    one = np.uint64(1)
    for i in range(stop // 8):
        p = np.uint64(i) * np.uint64(8)
        x0, x1, x2, x3 = row[p], row[p + one], row[p + 2 * one], row[p + 3 * one]
        x4, x5, x6, x7 = row[p + 4 * one], row[p + 5 * one], row[p + 6 * one], row[p + 7 * one]
        a0, a1, a2, a3 = a0 + x0 * x0, a1 + x1 * x1, a2 + x2 * x2, a3 + x3 * x3
        a4, a5, a6, a7 = a4 + x4 * x4, a5 + x5 * x5, a6 + x6 * x6, a7 + x7 * x7
    return a0, a1, a2, a3, a4, a5, a6, a7


@njit(nogil=True, inline="always", error_model="numpy")
def _lanes(x):  # type: ignore[no-untyped-def]
    return x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]


@njit(nogil=True, inline="always", error_model="numpy")
def _set_lanes(x, acc):  # type: ignore[no-untyped-def]
    x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7] = acc


@njit(nogil=True, inline="always", error_model="numpy")
def _fold(values, sum_rows, sums, norms, state, start, stop, rest_sums, rest_norms):  # type: ignore[no-untyped-def]
    """Fold entries ``[start, stop)`` of each row, held in ``values[r, :stop - start]`` (rows below
    ``sum_rows`` summed into ``sums[r]``, the others normed into ``norms[r - sum_rows]``), into the rows'
    state. ``state``: lanes (always :data:`LANES`), entries per vector, cascade power, end of the whole
    steps, end of the whole vectors, steps done. ``start`` is a multiple of the step; ``stop`` too, or the
    row's end."""
    entries, power, sum_end, norm_end = state[1], state[2], state[3], state[4]
    step = _ILP * entries
    halves = entries != LANES
    mask = (np.int64(1) << power) - 1
    at = 0
    steps = (max(min(stop, sum_end), start) - start) // step
    while steps > 0:
        done = state[5]
        run = min(steps, (mask + 1) - (done & mask))  # up to the next flush of the cascade's first level
        for r in range(sum_rows):
            row = values[r]
            for k in range(_ILP):
                _set_lanes(sums[r, 0, k], _lanes_added(row, at + k * entries, step, run, halves, _lanes(sums[r, 0, k])))
        at += run * step
        steps -= run
        done += run
        state[5] = done
        if (done & mask) == 0:
            for level in range(1, 4):
                for r in range(sum_rows):
                    for k in range(_ILP):
                        for q in range(LANES):
                            sums[r, level, k, q] += sums[r, level - 1, k, q]
                            sums[r, level - 1, k, q] = np.float32(0.0)
                if (done & (mask << (level * power))) != 0:
                    break
    for j in range(max(start, sum_end), stop):
        for r in range(sum_rows):
            rest_sums[r, j - sum_end] = values[r, j - start]
    whole = max(min(stop, norm_end) - start, 0)
    for r in range(sum_rows, values.shape[0]):
        n = r - sum_rows
        # a bfloat16 vector's two halves: one after the other, as consecutive runs of 8 entries
        _set_lanes(norms[n], _squares_added(values[r], whole, _lanes(norms[n])))
        for j in range(max(start, norm_end), stop):
            rest_norms[n, j - norm_end] = values[r, j - start]


@njit(nogil=True, cache=True, error_model="numpy")
def finish_sums(sums, rest, state, out):  # type: ignore[no-untyped-def]
    """Each summed row's float32 total, from its state and its entries past the last whole step: the
    cascade's levels added, the 0-3 whole vectors left over, the other three partial vectors, the scalar
    tail, then the lanes one by one."""
    lanes, entries = LANES, state[1]
    spare = state[4] - state[3]  # entries of the whole vectors after the last whole step
    partial = np.empty((_ILP, lanes), np.float32)
    for r in range(sums.shape[0]):
        for k in range(_ILP):
            for q in range(lanes):
                partial[k, q] = ((sums[r, 0, k, q] + sums[r, 1, k, q]) + sums[r, 2, k, q]) + sums[r, 3, k, q]
        for v in range(0, spare, entries):
            for q in range(lanes):
                x = rest[r, v + q]
                if entries != lanes:
                    x = x + rest[r, v + lanes + q]
                partial[0, q] = partial[0, q] + x
        for k in range(1, _ILP):
            for q in range(lanes):
                partial[0, q] = partial[0, q] + partial[k, q]
        total = np.float32(0.0)
        for j in range(spare, rest.shape[1]):
            total = total + rest[r, j]
        for q in range(lanes):
            total = total + partial[0, q]
        out[r] = total


@njit(nogil=True, cache=True, error_model="numpy")
def finish_norms(norms, rest, out):  # type: ignore[no-untyped-def]
    """Each normed row's float32 2-norm: its lanes added one by one, the squares of its tail, the root."""
    for n in range(norms.shape[0]):
        total = norms[n, 0]
        for q in range(1, norms.shape[1]):
            total = total + norms[n, q]
        for j in range(rest.shape[1]):
            x = rest[n, j]
            total = total + x * x
        out[n] = np.sqrt(total)


@njit(nogil=True, cache=True, error_model="numpy")
def offset_rows_loop(base, xs, like, pairs, start, values, sums, norms, state, rest_sums, rest_norms):  # type: ignore[no-untyped-def]
    """Model Stock's sums over one flat piece (entries from ``start`` of the rows): the task vectors
    ``d_i = x_i − base`` and the products ``d_i · d_j`` of ``pairs``, each rounded as a tensor op in
    ``like``'s dtype, the products summed into ``sums`` and the task vectors normed into ``norms``."""
    n = base.shape[0]
    p = pairs.shape[0]
    # rows and blocks as 1-D slices: indexed as values[r, j] and x[a + j], the loops were left unvectorized
    # (0.52 against 0.04 ns per entry of a bfloat16 load)
    for a in range(0, n, _BLOCK):
        m = min(_BLOCK, n - a)
        b = base[a:a + m]
        for i in range(len(xs)):
            x, row = xs[i][a:a + m], values[p + i]
            for j in range(m):
                row[j] = _step(_load(x[j]) - _load(b[j]), like)
        for r in range(p):
            u, w, row = values[pairs[r, 0] + p], values[pairs[r, 1] + p], values[r]
            for j in range(m):
                row[j] = _step(u[j] * w[j], like)
        _fold(values, p, sums, norms, state, start + a, start + a + m, rest_sums, rest_norms)
    return 0


@njit(nogil=True, cache=True, error_model="numpy")
def chunk_norms_loop(a, b, values, sums, norms, state, rest_sums, rest_norms):  # type: ignore[no-untyped-def]
    """SLERP's first pass over one chunk (a float32 row of its own): ``a`` and ``b`` normed."""
    n = a.shape[0]
    for s in range(0, n, _BLOCK):
        m = min(_BLOCK, n - s)
        x, y, u, w = a[s:s + m], b[s:s + m], values[0], values[1]
        for j in range(m):
            u[j] = _load(x[j])
            w[j] = _load(y[j])
        _fold(values, 0, sums, norms, state, s, s + m, rest_sums, rest_norms)
    return 0


@njit(nogil=True, cache=True, error_model="numpy")
def normalized_dot_loop(a, b, norm_a, norm_b, values, sums, norms, state, rest_sums, rest_norms):  # type: ignore[no-untyped-def]
    """SLERP's second pass over one chunk (a float32 row of its own): ``(a / |a|) · (b / |b|)`` summed."""
    n = a.shape[0]
    for s in range(0, n, _BLOCK):
        m = min(_BLOCK, n - s)
        x, y, u = a[s:s + m], b[s:s + m], values[0]
        for j in range(m):
            u[j] = (_load(x[j]) / norm_a) * (_load(y[j]) / norm_b)
        _fold(values, 1, sums, norms, state, s, s + m, rest_sums, rest_norms)
    return 0


@njit(nogil=True, cache=True, error_model="numpy")
def nonfinite_count_loop(bits: Any, exponent: Any) -> int:
    """How many of ``bits`` (a float tensor's bit patterns as unsigned integers) have every bit of ``exponent``
    set: the NaNs and ±Infs, by IEEE 754's definition, with no float loaded or compared, so that the count
    vectorizes (32 against torch.aminmax's 91 µs per 1 Mi bfloat16 entries, one thread, 2026-12-05)."""
    count = 0
    for j in range(bits.shape[0]):
        count += (bits[j] & exponent) == exponent
    return count


def load_cached() -> None:
    """Run each loop once on one entry per dtype: numba's first load from its cache (or compilation, the
    first time on a machine) happens here, ~0.4 s of it importing numba's numpy support."""
    state, position = np.zeros(MT_WORDS, np.uint32), np.full(1, MT_WORDS, np.int64)
    mt_seed_loop(0, state)
    mt_uniform_loop(state, position, np.zeros(1, np.float32))
    for unsigned in (np.uint16, np.uint32, np.uint64):
        bits = np.zeros(1, unsigned)
        bits.setflags(write=False)
        nonfinite_count_loop(bits, unsigned(1))
    for dtype in (np.uint16, np.float32):
        x = np.zeros(1, dtype)
        x.setflags(write=False)
        ones = np.ones(2, np.float32)
        linear_loop((x, x), ones, np.float32(1), np.zeros(1, dtype))
        task_arithmetic_loop(x, (x, x), ones, np.float32(1), np.float32(1), np.float32(0), np.zeros(1, dtype))
