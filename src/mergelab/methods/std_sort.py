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
that the torch in use still sorts this way. Measured on 8 Mi bfloat16 task-vector magnitudes at
density 0.3 (2 shared cores): the mask in 0.3-0.6 s, where ``torch.argsort`` takes 1.6 s.
"""

from __future__ import annotations

import functools

import numpy as np

_THRESHOLD = 16  # libstdc++'s _S_threshold: introsort leaves segments of this size to the insertion sort


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


def _partition(v: np.ndarray, idx: np.ndarray, first: int, last: int) -> int | None:
    """libstdc++ ``__unguarded_partition_pivot`` on ``v[first:last]`` with comparator ``a > b`` (a sorts
    before b), moving ``idx`` alongside; returns the cut (None where the unguarded scan would run off)."""
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
    lo = np.flatnonzero(seg <= pivot)  # where the left scan stops: not strictly before the pivot
    ro = np.flatnonzero(seg >= pivot)[::-1]  # where the right scan stops, from the right
    swaps = _first_crossing(lo, ro)
    stops = ([int(lo[swaps])] if swaps < lo.size else []) + ([int(ro[swaps - 1])] if swaps else [])
    if not stops:
        return None
    left, right = lo[:swaps] + (first + 1), ro[:swaps] + (first + 1)
    v[left], v[right] = v[right], v[left]
    idx[left], idx[right] = idx[right], idx[left]
    return first + 1 + min(stops)


def sorted_ranks(values: np.ndarray, start: int, stop: int, *, descending: bool) -> np.ndarray | None:
    """Flat indices of the entries that ``torch.sort(values, descending=...)`` (CPU, not stable) places at
    ranks ``[start, stop)``, in no particular order; None where only a real sort can tell (NaN present,
    or introsort's heapsort fallback reached). ``values`` (1-D float) is left untouched."""
    n = values.size
    if np.isnan(values).any():  # torch orders NaN by its own rule; let it sort
        return None
    # ascending by a < b is descending by -a > -b, with the same comparisons (negation is exact)
    v = -values if not descending else values.copy()
    idx = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    bounds = [b for b in (start, stop) if 0 < b < n]
    todo = [(0, n, 2 * (n.bit_length() - 1))]  # std::__sort: depth limit 2·⌊log2 n⌋
    while todo:
        first, last, depth = todo.pop()
        if not any(first < b < last for b in bounds):
            continue  # its inner order decides nothing
        if last - first <= _THRESHOLD:
            order = np.argsort(-v[first:last], kind="stable")  # the final insertion sort is stable
            idx[first:last] = idx[first:last][order]
            continue
        if depth == 0:
            return None  # std::__partial_sort (heapsort) would take over here
        cut = _partition(v, idx, first, last)
        if cut is None:
            return None
        todo += [(cut, last, depth - 1), (first, cut, depth - 1)]
    return idx[max(start, 0):stop]


@functools.cache
def matches_torch_sort() -> bool:
    """Whether this torch build sorts as simulated here (libstdc++ introsort), checked once per process on
    tied inputs of several sizes in both directions; elsewhere (another C++ library, a future torch sort
    kernel) the callers sort for real, which is always right, only slower."""
    import torch

    g = torch.Generator().manual_seed(0)
    for n in (17, 300, 5_000, 40_000):
        values = (torch.randn(n, generator=g) * 0.002).bfloat16().abs().float()
        k = n // 3
        for descending, order in ((True, torch.argsort(values, descending=True)), (False, torch.sort(values).indices)):
            ours = sorted_ranks(values.numpy(), k, n - k, descending=descending)
            if ours is None or set(ours.tolist()) != set(order[k:n - k].tolist()):
                return False
    return True
