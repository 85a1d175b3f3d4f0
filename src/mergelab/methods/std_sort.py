"""Which entries torch's CPU sort puts at ranks ``[start, stop)``, without sorting: O(n) expected.

mergekit picks the top-k entries of a task vector with ``torch.argsort`` on the CPU. Where magnitudes
tie across the k-th rank (common in bfloat16: 4 of 2,048 mask entries differ when ties are broken by index
instead), only that sort's order says which tied entries are kept, and TIES' sign votes follow them. torch
sorts a 1-D CPU tensor with libstdc++'s ``std::sort`` (not stable): introsort = median-of-3 quicksort
(Hoare partition) down to segments of 16, then one insertion sort over everything. Two facts make the
ranks ``[start, stop)`` cheap to get exactly:

- every later step permutes entries only inside the segment a partition made (the final insertion sort
  never moves an entry past an equal one, and entries of earlier segments are never smaller), so only
  the segments that contain a boundary rank need to be followed, as in quickselect;
- one Hoare partition is vectorisable: its i-th swap exchanges the i-th entry from the left that is not
  strictly before the pivot with the i-th entry from the right that is not strictly after it, for as long
  as the two meet in order, and it returns where the left scan then stops.

A segment of 16 or fewer entries ends stably sorted (the insertion sort is stable). Where introsort would
fall back to heapsort (depth limit reached on a boundary segment: adversarial inputs only), this returns
None and the caller sorts. tests/test_std_sort.py checks the result against ``torch.argsort``/``torch.sort``
on random, heavily tied and degenerate inputs, and :func:`matches_torch_sort` checks once per process
that the torch in use still sorts this way. The simulation compares integer keys (a float's bits; the
bit patterns of bf16 magnitudes directly) and moves entries only into the side of a partition that holds
wanted ranks. Measured on 8 Mi bfloat16 task-vector magnitudes at density 0.3 (one thread, 2 shared
cores): 140 ms, where ``torch.argsort`` takes 1.6 s (the float version with two-way swaps: 200-280 ms).
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import torch

from mergelab.kernels.dispatch import loops, verified, warm_up

_THRESHOLD = 16  # libstdc++'s _S_threshold: introsort leaves segments of this size to the insertion sort
_BLOCK = 1 << 20  # entries scanned per block for the partition's stop positions (8 MiB of positions at most)


def _first_crossing(lo: np.ndarray, ro: np.ndarray) -> int:
    """The number of swaps: the first ``i`` with ``lo[i] >= ro[i]`` (``lo`` ascends, ``ro`` descends)."""
    a, b = 0, min(lo.size, ro.size)
    while a < b:
        mid = (a + b) // 2
        if lo[mid] < ro[mid]:
            a = mid + 1
        else:
            b = mid
    return a


class _Stops:
    """Positions where ``mask`` is true, from the left (ascending) or the right (descending), produced a
    block at a time: a full position list would take 8 bytes per entry."""

    def __init__(self, mask: np.ndarray, from_right: bool) -> None:
        n = mask.size
        blocks = [(a, min(n, a + _BLOCK)) for a in range(0, n, _BLOCK)]
        self._blocks = iter(blocks[::-1] if from_right else blocks)
        self._mask, self._from_right = mask, from_right
        self.ahead = np.empty(0, dtype=np.int64)  # produced, not yet consumed

    def fill(self) -> bool:
        """Make ``ahead`` non-empty; False when no position is left."""
        while self.ahead.size == 0:
            block = next(self._blocks, None)
            if block is None:
                return False
            a, b = block
            found = np.flatnonzero(self._mask[a:b]) + a
            self.ahead = found[::-1] if self._from_right else found
        return True


def _order_keys(values: np.ndarray) -> np.ndarray | None:
    """Integers that compare as ``values`` do (a fresh array the caller owns); None for NaN.

    Signed integer input is taken as keys already (``methods.sparsify`` passes the bit patterns of
    magnitudes: a bfloat16 magnitude compares as its 15 low bits read as an int16). A float's key is its
    magnitude's bit pattern, negated for negative numbers, so that -0.0 and 0.0 tie as they do for the sort.
    """
    if values.dtype.kind == "i":  # keys above the type's minimum, so that negation is exact
        return values.copy()
    if np.isnan(values).any():  # torch orders NaN by its own rule; let it sort
        return None
    keys = values.view(f"i{values.dtype.itemsize}").copy()
    negative = keys < 0
    if negative.any():
        keys[negative] = -(keys[negative] & np.iinfo(keys.dtype).max)
    return keys


def _partition(v: np.ndarray, idx: np.ndarray, first: int, last: int, wanted: tuple[int, int]) -> int | None:
    """libstdc++ ``__unguarded_partition_pivot`` on ``v[first:last]`` with comparator ``a > b`` (a sorts
    before b), moving ``idx`` alongside; returns the cut (None where the unguarded scan would run off).

    Only the side(s) of the cut that overlap the ranks ``wanted`` (``[start, stop)``) get their entries:
    the other side is never read again, so each swap is one move instead of two.
    """
    mid = first + (last - first) // 2
    a, b, c = first + 1, mid, last - 1
    va, vb, vc = v[a], v[b], v[c]
    if va > vb:  # __move_median_to_first(first, a, b, c)
        m = b if vb > vc else (c if va > vc else a)
    elif va > vc:
        m = a
    elif vb > vc:
        m = c
    else:
        m = b
    v[first], v[m] = v[m], v[first]
    idx[first], idx[m] = idx[m], idx[first]
    pivot = v[first]
    seg = v[first + 1:last]
    # the scans stop where an entry is not strictly before (left) or not strictly after (right) the pivot;
    # both are read from the entries as they were before any swap (see the module's notes)
    left_mask, right_mask = seg <= pivot, seg >= pivot
    # the cut is in [first+1+#(v > pivot), first+1+#(v >= pivot)]: which sides are wanted is known before
    # scanning, except for a side whose edge may fall either side of a wanted rank
    low_cut = last - int(np.count_nonzero(left_mask))
    high_cut = first + 1 + int(np.count_nonzero(right_mask))
    start, stop = wanted
    keep_left, keep_right = first < stop and high_cut > start, low_cut < stop and last > start
    left, right = _Stops(left_mask, from_right=False), _Stops(right_mask, from_right=True)
    last_right = None  # where the last swap's right scan stopped
    while left.fill() and right.fill():
        n = min(left.ahead.size, right.ahead.size)
        swaps = _first_crossing(left.ahead[:n], right.ahead[:n])
        lo, ro = left.ahead[:swaps] + (first + 1), right.ahead[:swaps] + (first + 1)
        if keep_left and keep_right:
            v[lo], v[ro] = v[ro], v[lo]
            idx[lo], idx[ro] = idx[ro], idx[lo]
        elif keep_left:  # np.put/np.take: half the time of fancy indexing here
            np.put(v, lo, np.take(v, ro))
            np.put(idx, lo, np.take(idx, ro))
        elif keep_right:
            np.put(v, ro, np.take(v, lo))
            np.put(idx, ro, np.take(idx, lo))
        if swaps:
            last_right = int(ro[-1])
        left.ahead, right.ahead = left.ahead[swaps:], right.ahead[swaps:]
        if swaps < n:
            break
    stops = ([int(left.ahead[0]) + first + 1] if left.fill() else []) + ([last_right] if last_right is not None else [])
    return min(stops) if stops else None


def sorted_ranks(values: np.ndarray, start: int, stop: int, *, descending: bool) -> np.ndarray | None:
    """Flat indices of the entries that ``torch.sort(values, descending=...)`` (CPU, not stable) places at
    ranks ``[start, stop)``, in no particular order; None where only a real sort can tell (NaN present,
    or introsort's heapsort fallback reached). ``values`` (1-D float, or integer keys that compare as the
    values do) is left untouched."""
    ranks = _simulate(values, start, stop, descending=descending)
    return None if ranks is None else ranks[1][max(start, 0):stop]


def kept_ties(keys: np.ndarray, k: int, threshold: int, *, overwrite: bool = False,
              positions: np.ndarray | None = None) -> np.ndarray | None:
    """Flat indices of the entries equal to ``threshold`` among the ``k`` first of ``keys`` sorted
    descending by torch's CPU sort (``threshold``: the k-th largest key); None as for :func:`sorted_ranks`.
    The rest of the top k is every key above ``threshold``, which the caller finds by comparison.
    ``overwrite``: integer ``keys`` are scratch space (left in no useful order): one copy less. ``positions``:
    scratch space for the flat indices (:func:`_simulate`), or the keys' own memory widened (:func:`_room`)."""
    room = _room(keys, positions, overwrite=overwrite)
    if room is not None:
        ties = _tagged_ties(room, keys.size, 0, k, (threshold, threshold), negate=False)
        return None if ties is None else ties[0]
    ranks = _simulate(keys, 0, k, descending=True, overwrite=overwrite, positions=positions)
    if ranks is None:
        return None
    v, idx = ranks[0][:k], ranks[1][:k]
    return idx[v == threshold]


def band_ties(keys: np.ndarray, start: int, stop: int, low: int, high: int, *, overwrite: bool = False,
              positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Flat indices of the entries equal to ``low`` and of those equal to ``high`` among the ranks
    ``[start, stop)`` of integer ``keys`` sorted ascending by torch's CPU sort (``low``, ``high``: the keys at
    ranks ``start`` and ``stop - 1``); None as for :func:`sorted_ranks`. The rest of the range is every key
    strictly between them, which the caller finds by comparison. ``overwrite``: ``keys`` are scratch space;
    ``positions``: scratch space for the flat indices (:func:`_simulate`), or the keys' own memory widened
    (:func:`_room`)."""
    room = _room(keys, positions, overwrite=overwrite)
    if room is not None:  # ascending by a < b is descending by -a > -b (as in _simulate)
        return _tagged_ties(room, keys.size, start, stop, (-low, -high), negate=True)
    ranks = _simulate(keys, start, stop, descending=False, overwrite=overwrite, positions=positions)
    if ranks is None:
        return None
    v, idx = ranks[0][start:stop], ranks[1][start:stop]  # keys negated: ascending is descending by -key
    return idx[v == -low], idx[v == -high]


def _room(keys: np.ndarray, positions: np.ndarray | None, *, overwrite: bool) -> np.ndarray | None:
    """``positions`` as the tagged replay's int32 entries (``kernels._loops.tagged_replay_loop``), where they
    may serve: 16-bit integer ``keys`` given as scratch, ``positions`` beginning where the keys begin with 4
    bytes per entry (the engine's work space lays them out so: merge/rank_workspace.py), fewer than 2^30
    entries, and the compiled loop in use. The replay then needs 4 bytes per entry in all instead of the keys'
    2 and the flat indices' 4 (3 × 0.5 GB TIES: 125 instead of 188 MiB for the 32.8 M-entry embedding)."""
    n = keys.size
    if (not overwrite or keys.dtype != np.int16 or positions is None or not keys.flags.c_contiguous
            or not positions.flags.c_contiguous or positions.nbytes < 4 * n or n >= 1 << 30
            or sys.byteorder != "little"
            or positions.__array_interface__["data"][0] != keys.__array_interface__["data"][0]):
        return None
    # the engine loads the loops on a thread of its own as a large merge starts, and its first tensor (the
    # embedding) reaches here before they are in: waiting for them is what lets the room serve at all (the numpy
    # replay needs positions of its own, 4 more bytes per entry). The wait is at most the load (0.46-0.74 s in
    # benchmarks/vs_mergekit.py runs), against a numpy replay 3-4x the compiled one (99-138 against 31-34 ms per
    # 8 Mi keys, benchmarks/compiled_loops.py); alternated merges showed no difference in time (docs/scale.md)
    if loops() is None:
        warm_up()
    if loops() is None or not verified("tagged sort replay", None, _check_tagged):
        return None
    return positions.reshape(-1).view(np.uint8)[:4 * n].view(np.int32)


def _tagged_ties(room: np.ndarray, n: int, start: int, stop: int, edges: tuple[int, int], *,
                 negate: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """The flat indices of the entries equal to ``edges[0]`` and to ``edges[1]`` (keys as compared: negated
    where ``negate``) that the replay puts at ranks ``[start, stop)``; None where introsort would fall back to
    heapsort."""
    if edges[1] > edges[0]:
        raise ValueError(f"the tagged replay's second edge key must not be above its first: {edges}")
    bounds = np.asarray([b for b in (start, stop) if 0 < b < n], np.int64)
    module = loops()
    if not module.tagged_replay_loop(room, n, np.asarray(edges, np.int32), negate, bounds,  # type: ignore[union-attr]
                                     2 * (n.bit_length() - 1)):
        return None
    ranked = room[max(start, 0):stop]
    tags = ranked[ranked >= module.TAG] - module.TAG  # type: ignore[union-attr]
    first = tags[tags < n]
    # an entry equal to both edges is tagged as the first's
    return first, first if edges[0] == edges[1] else tags[tags >= n] - n


def position_dtype(n: int) -> np.dtype:
    """The dtype of the replay's flat indices for ``n`` entries (what ``positions`` scratch must hold per entry)."""
    return np.dtype(np.int32 if n < 2**31 else np.int64)


def _simulate(values: np.ndarray, start: int, stop: int, *, descending: bool, overwrite: bool = False,
              positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Keys and flat indices in an order whose positions ``[start, stop)`` hold the entries torch's sort
    puts there (positions outside are left unfinished). ``overwrite``: integer ``values`` serve as the keys.
    ``positions``: contiguous scratch (any dtype) of at least :func:`position_dtype`'s bytes per entry that the
    flat indices are written into instead of a fresh array (the engine's top-k passes reuse one for every
    tensor: merge/rank_workspace.py); a smaller one is not used."""
    n = values.size
    v = values if overwrite and values.dtype.kind == "i" else _order_keys(values)
    if v is None:
        return None
    # ascending by a < b is descending by -a > -b, with the same comparisons (negation of keys is exact)
    if not descending:
        np.negative(v, out=v)
    dtype = position_dtype(n)
    if positions is None or positions.nbytes < n * dtype.itemsize or np.may_share_memory(positions, v):
        idx = np.arange(n, dtype=dtype)  # v[j] is always the key of entry idx[j]
    else:
        idx = positions.reshape(-1).view(np.uint8)[:n * dtype.itemsize].view(dtype)
        torch.arange(n, out=torch.from_numpy(idx))
    return _replay(v, idx, start, stop)


def _replay(v: np.ndarray, idx: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`_simulate`'s introsort on keys ``v`` (comparator ``a > b``) and ``idx``, in place: the compiled
    loop (mergelab.kernels: 3× less CPU on 8 Mi bfloat16 keys, benchmarks/compiled_loops.py) where it is loaded and
    agrees with the numpy replay below, else that one."""
    if loops() is not None and verified("sort replay", None, _check_compiled):
        return (v, idx) if _replay_compiled(v, idx, start, stop) else None
    return _replay_numpy(v, idx, start, stop)


def _replay_compiled(v: np.ndarray, idx: np.ndarray, start: int, stop: int) -> bool:
    """The compiled replay, in place; False where introsort would fall back to heapsort."""
    n = v.size
    bounds = np.asarray([b for b in (start, stop) if 0 < b < n], np.int64)
    return bool(loops().sort_replay_loop(v, idx, bounds, 2 * (n.bit_length() - 1)))  # type: ignore[union-attr]


def _replay_numpy(v: np.ndarray, idx: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray] | None:
    n = v.size
    bounds = [b for b in (start, stop) if 0 < b < n]
    wanted = (max(start, 0), min(stop, n))
    todo = [(0, n, 2 * (n.bit_length() - 1))]  # std::__sort: depth limit 2·⌊log2 n⌋
    while todo:
        first, last, depth = todo.pop()
        if not any(first < b < last for b in bounds):
            continue  # its inner order decides nothing
        if last - first <= _THRESHOLD:
            order = np.argsort(-v[first:last], kind="stable")  # the final insertion sort is stable
            idx[first:last], v[first:last] = idx[first:last][order], v[first:last][order]
            continue
        cut = _partition(v, idx, first, last, wanted) if depth > 0 else None  # depth 0: heapsort takes over
        if cut is None:
            return None
        todo += [(cut, last, depth - 1), (first, cut, depth - 1)]
    return v, idx


def _check_compiled() -> bool:
    """Whether the compiled replay puts the same entries at the wanted ranks as the numpy one, on heavily tied
    keys of several sizes and both key widths (both directions are the same comparisons on negated keys)."""
    rng = np.random.default_rng(0)
    for n, dtype in ((17, np.int16), (300, np.int16), (5_000, np.int32), (70_000, np.int16), (70_000, np.int32)):
        keys = (np.abs(rng.normal(size=n)) * 40).astype(dtype)
        for start, stop in ((0, n // 3), (n // 5, n - n // 4)):
            compiled = keys.copy(), np.arange(n, dtype=np.int32)
            if not _replay_compiled(*compiled, start, stop):
                return False
            numpy_replay = _replay_numpy(keys.copy(), np.arange(n, dtype=np.int32), start, stop)
            if numpy_replay is None or not np.array_equal(np.sort(compiled[1][start:stop]),
                                                          np.sort(numpy_replay[1][start:stop])):
                return False
    return True


def _check_tagged() -> bool:
    """Whether the tagged replay finds the same tied entries at the wanted ranks as the numpy replay, on heavily
    tied 16-bit keys of several sizes, both directions, one edge and two."""
    rng = np.random.default_rng(1)
    for n in (17, 301, 70_001):
        keys = (np.abs(rng.normal(size=n)) * 40).astype(np.int16)
        for start, stop, negate in ((0, n // 3, False), (n // 5, n - n // 4, True)):
            ranks = _replay_numpy(-keys.astype(np.int32) if negate else keys.astype(np.int32),
                                  np.arange(n, dtype=np.int32), start, stop)
            if ranks is None:
                return False
            v, idx = ranks[0][start:stop], ranks[1][start:stop]
            edges = (int(v[0]), int(v[-1]))
            room = np.zeros(n, np.int32)
            room.view(np.int16)[:n] = keys
            ties = _tagged_ties(room, n, start, stop, edges, negate=negate)
            if ties is None or any(not np.array_equal(np.sort(t), np.sort(idx[v == e])) for t, e in zip(ties, edges)):
                return False
    return True


@functools.cache
def matches_torch_sort() -> bool:
    """Whether this torch build sorts as simulated here (libstdc++ introsort), checked once per process on
    tied inputs of several sizes in both directions; elsewhere (another C++ library, a future torch sort
    kernel) the callers sort for real, which is always right, only slower."""
    g = torch.Generator().manual_seed(0)
    for n in (17, 300, 5_000, 40_000):
        values = (torch.randn(n, generator=g) * 0.002).bfloat16().abs().float()
        k = n // 3
        for descending, order in ((True, torch.argsort(values, descending=True)), (False, torch.sort(values).indices)):
            ours = sorted_ranks(values.numpy(), k, n - k, descending=descending)
            if ours is None or set(ours.tolist()) != set(order[k:n - k].tolist()):
                return False
    return True
