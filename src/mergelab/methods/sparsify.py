"""Masks that sparsify task vectors: magnitude top-k (TIES), random drop (DARE), outlier trim (Breadcrumbs).

Masks are exact in count and keep the entries mergekit keeps. The threshold is found by an O(n) selection
instead of mergekit's full sort; only when magnitudes tied at the threshold straddle it (some kept, some
not) does the choice among them need the order of the ``torch.argsort``/``torch.sort`` call mergekit makes
(deterministic for a torch build and any thread count), and then ``std_sort.sorted_ranks`` finds the
entries that sort keeps without sorting. In float32 that is rare; in bfloat16 it is common (4 of 2,048
mask entries differed on a 64×32 bf16 tensor when ties were broken by flat index instead), and each such
entry flips a TIES vote.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mergelab.kernels.masked import KEY_SPECS, key_histogram
from mergelab.methods.std_sort import band_ties, kept_ties, matches_torch_sort, sorted_ranks

TieOrder = Literal["sort", "stable"]
"""Which of the magnitudes tied at a kept rank's edge are kept. ``"sort"``: those ``torch.argsort`` on the CPU
puts first, as mergekit's CPU merges keep them (the sort is replayed, ``std_sort``: 40 % of TIES' CPU at
3 × 2 GB bf16, benchmarks/results/2026-12-05.md); ``"stable"``: those a stable sort puts first, the lowest flat
indices first in the sort's direction, the same on every device (torch's CPU and CUDA sorts order ties
differently) and found by one scan of the tied keys."""
TIE_ORDERS: tuple[TieOrder, ...] = ("sort", "stable")


def _float_flat(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    return flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat


def _kth_largest(scratch: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor that the caller owns: it may be reordered in place.

    On the CPU, numpy's in-place introselect: the same order statistic as ``torch.kthvalue`` without its
    copy and int64 index per entry (3× the tensor). Elsewhere ``topk`` (``kthvalue`` lacks CUDA kernels
    for some dtypes).
    """
    n = scratch.numel()
    if scratch.device.type == "cpu":
        values = scratch.detach().numpy()
        values.partition(n - k)
        return torch.tensor(values[n - k], dtype=scratch.dtype)
    return torch.topk(scratch, k, sorted=False).values.min()


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest entry (1-based) of ``values`` (any shape; left untouched), as a 0-d tensor.

    Half-precision values are selected in float32, which holds each of them exactly.
    """
    flat = values.reshape(-1)
    work = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat.clone()
    return _kth_largest(work, k)


def _mask_at(work: torch.Tensor, threshold: torch.Tensor, k: int, tie_order: TieOrder = "sort") -> torch.Tensor:
    """Exactly the ``k`` largest entries of 1-D ``work`` that mergekit keeps: those above ``threshold``,
    then, when not every entry equal to it fits, the tied ones in ``torch.argsort``'s order (``tie_order``
    "stable": the lowest flat indices)."""
    mask = work > threshold
    missing = k - int(torch.count_nonzero(mask))  # a bool sum would materialise int64 per entry
    if missing > 0:
        ties = torch.nonzero(work == threshold).reshape(-1)  # ascending flat indices
        if ties.numel() > missing:  # straddling ties: the sort's order decides, as in mergekit
            if tie_order == "stable":
                ties = ties[:missing]
            else:
                del mask, ties
                return _sorted_range(work, 0, k, descending=True)
        mask[ties] = True
    return mask


def _sorted_range(work: torch.Tensor, start: int, stop: int, *, descending: bool,
                  tie_order: TieOrder = "sort") -> torch.Tensor:
    """Mask of the entries at ranks ``[start, stop)`` of ``work`` sorted as mergekit sorts it on the CPU
    (``tie_order`` "stable": as a stable sort does, on the device where ``work`` is).

    Sorted on the CPU whatever the device, so that the same inputs keep the same entries everywhere (the
    order of tied values differs between torch's CPU and CUDA sorts).
    """
    if tie_order == "stable":
        order = torch.sort(work, descending=descending, stable=True).indices[start:stop]
        mask = torch.zeros_like(work, dtype=torch.bool)
        mask[order] = True
        return mask
    cpu = work.cpu()
    # the same entries as the sort, found in O(n) by following only the partitions that hold a boundary
    # rank (methods/std_sort.py; 8 Mi tied bf16 magnitudes: 0.25 s instead of the sort's 1.5 s)
    ranks = sorted_ranks(cpu.detach().numpy(), start, stop, descending=descending) if matches_torch_sort() else None
    order = torch.from_numpy(ranks) if ranks is not None else (
        torch.argsort(cpu, descending=True) if descending else torch.sort(cpu).indices)[start:stop]
    mask = torch.zeros_like(cpu, dtype=torch.bool)
    mask[order] = True
    return mask.to(work.device)


def _straddles(work: torch.Tensor, rank: int) -> bool:
    """Whether the value at ascending ``rank`` (0 < rank < n) is tied across the rank boundary."""
    scratch = (lambda: work.clone()) if work.device.type == "cpu" else (lambda: work)
    below = _kth_largest(scratch(), work.numel() - rank + 1)  # the largest of the lowest ``rank``
    above = _kth_largest(scratch(), work.numel() - rank)      # the smallest of the rest
    return bool(below == above)


def topk_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``magnitude`` (any shape), ties broken by flat index."""
    n = magnitude.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    work = _float_flat(magnitude)
    threshold = _kth_largest(work.clone() if work.device.type == "cpu" else work, k)
    return _mask_at(work, threshold, k).reshape(magnitude.shape)


def magnitude_mask(delta: torch.Tensor, density: float, tie_order: TieOrder = "sort") -> torch.Tensor:
    """Keep the ``density`` fraction of largest-magnitude entries (at least one when density > 0), magnitudes
    tied at the k-th rank kept in ``tie_order`` (:data:`TieOrder`).

    Matches mergekit's ``magnitude`` sparsification: ``k = max(1, int(density * numel))``.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * n))
    if k >= n:
        return torch.ones_like(delta, dtype=torch.bool)
    keys = magnitude_keys(delta)
    rule = topk_of_keys(keys, density, tie_order=tie_order) if keys is not None else None
    if rule is not None:
        return rule.mask(keys).reshape(delta.shape)  # type: ignore[arg-type]
    # float64, another device, NaN, or a torch that sorts otherwise: select in float and sort where tied
    threshold = _kth_largest(_float_flat(delta.abs()), k)
    return _mask_at(_float_flat(delta.abs()), threshold, k, tie_order).reshape(delta.shape)


def magnitude_keys(delta: torch.Tensor) -> torch.Tensor | None:
    """``|delta|``'s bit patterns as signed integers of the same width (flat): a non-negative float
    compares as its bits do, so the integers order the magnitudes exactly as the floats do, ties
    included (-0.0 and 0.0 both become 0). None off the CPU, for other dtypes, and where a NaN is present.
    """
    spec = KEY_SPECS.get(delta.dtype)
    if spec is None or delta.device.type != "cpu":
        return None
    int_dtype, inf_bits = spec
    keys = delta.reshape(-1).view(int_dtype) & torch.iinfo(int_dtype).max
    if keys.numel() and int(keys.amax()) > inf_bits:  # amax: 1 ms per 8 Mi int16, (keys > inf).any() 15 ms
        return None
    return keys


@dataclass(frozen=True)
class TopK:
    """A task vector's exact top-k as a rule that any flat range of it can apply to its magnitude keys:
    keep the keys above ``threshold`` and, of those equal to it, the flat indices in ``ties`` (sorted;
    None: every tied one). ``threshold`` None keeps nothing. The engine computes one per model over a
    whole tensor, then merges the tensor in pieces (``merge/engine.py``). With a ``ceiling`` (Breadcrumbs,
    :func:`band_of_keys`) the rule is two-sided: of the keys kept from below, only those under ``ceiling``
    and, of those equal to it, the flat indices in ``ceiling_ties`` (sorted; None: every one)."""

    threshold: int | None
    ties: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    """Where the rule could not be found from keys (NaN, float64, a torch that sorts otherwise): the
    whole flat mask, from :func:`magnitude_mask` (:func:`outlier_mask` for a two-sided rule)."""
    ceiling: int | None = None
    ceiling_ties: torch.Tensor | None = None

    def apply(self, delta: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The kept entries of ``delta``, the flat entries ``[start, start + delta.numel())`` of the task
        vector this rule was made for (flat)."""
        if self.kept is not None:
            return self.kept[start:start + delta.numel()].to(delta.device)
        keys = magnitude_keys(delta)
        if keys is None:
            raise ValueError("a top-k rule made from magnitude keys was applied to values without keys")
        return self.mask(keys, start)

    def mask(self, keys: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The kept entries of flat ``keys`` (:func:`magnitude_keys`), entries ``[start, start + n)``."""
        if self.threshold is None:
            return torch.zeros_like(keys, dtype=torch.bool)
        mask = _one_side(keys, self.threshold, self.ties, start, above=True)
        if self.ceiling is not None:
            mask &= _one_side(keys, self.ceiling, self.ceiling_ties, start, above=False)
        return mask


def _one_side(keys: torch.Tensor, edge: int, ties: torch.Tensor | None, start: int, *, above: bool) -> torch.Tensor:
    """The keys beyond ``edge`` (above it, or below it), and of those equal to it the flat indices in
    ``ties`` (None: all of them); ``keys`` are the flat entries ``[start, start + n)``."""
    if ties is None:
        return keys >= edge if above else keys <= edge
    mask = keys > edge if above else keys < edge
    lo, hi = torch.searchsorted(ties, torch.tensor([start, start + keys.numel()])).tolist()
    if hi > lo:
        mask[ties[lo:hi] - start] = True
    return mask


_SCAN = 1 << 20  # entries compared at a time: a whole tensor's comparison would hold a byte per entry


def equal_positions(keys: np.ndarray, key: int, first: int, stop: int) -> np.ndarray:
    """The flat indices (int64, ascending) of the entries of 1-D ``keys`` equal to ``key``, from the
    ``first``-th such entry (0-based, clamped at 0) up to before the ``stop``-th: the tied entries a stable sort
    puts at those places among them. Scanned a block at a time, stopping once ``stop`` are found."""
    first = max(first, 0)
    found: list[np.ndarray] = []
    count = 0
    for a in range(0, keys.size, _SCAN):
        if count >= stop:
            break
        hits = np.flatnonzero(keys[a:a + _SCAN] == key)
        take = hits[max(0, first - count):stop - count] + a
        count += hits.size
        found.append(take)
    return np.concatenate(found).astype(np.int64, copy=False) if found else np.empty(0, np.int64)


def _histogram(keys: torch.Tensor) -> torch.Tensor:
    """How many 16-bit magnitude ``keys`` have each of the 2^15 values: the compiled count where it is
    loaded, else ``torch.bincount`` (the same counts)."""
    counts = key_histogram(keys)
    return counts if counts is not None else torch.bincount(keys, minlength=1 << 15)


def topk_of_keys(keys: torch.Tensor, density: float, *, tie_order: TieOrder = "sort", overwrite: bool = False,
                 positions: np.ndarray | None = None) -> TopK | None:
    """The entries of 1-D ``keys`` (:func:`magnitude_keys`) that ``magnitude_mask`` keeps at ``density``:
    the ``k`` largest as ``torch.argsort`` puts them first (``tie_order`` "stable": as a stable sort does,
    without the replay). None where the sort must be run for real.
    ``overwrite``: ``keys`` may serve as the sort replay's scratch space (and are then left unordered);
    ``positions``: scratch space for its flat indices (``std_sort.kept_ties``).

    The k-th largest key comes from one histogram of all 2^15 patterns for 16-bit keys (a bincount pass:
    7 ms for 8 Mi entries on one core, where numpy's partition of the float32 magnitudes took 24 ms plus
    the conversion) and from numpy's partition of the integer keys for 32-bit ones.
    """
    n = keys.numel()
    if density >= 1:
        return TopK(0)
    if density <= 0 or n == 0:
        return TopK(None)
    k = max(1, int(density * n))
    if k >= n:
        return TopK(0)
    if keys.dtype == torch.int16:
        hist = _histogram(keys)
        above_or_at = hist.flip(0).cumsum(0)  # [j]: entries at or above key 2^15-1-j
        j = int(torch.searchsorted(above_or_at, k))
        threshold = (1 << 15) - 1 - j
        above, tied = (int(above_or_at[j - 1]) if j else 0), int(hist[threshold])
    else:
        scratch = keys.numpy().copy()
        scratch.partition(n - k)
        threshold = int(scratch[n - k])
        del scratch
        above = int(torch.count_nonzero(keys > threshold))
        tied = int(torch.count_nonzero(keys == threshold))
    if above + tied == k:
        return TopK(threshold)
    if tie_order == "stable":  # the tied keys take the ranks [above, above + tied) by flat index
        return TopK(threshold, torch.from_numpy(equal_positions(keys.numpy(), threshold, 0, k - above)))
    # tied magnitudes straddle the k-th rank: the sort's order decides which are kept, as in mergekit
    if not matches_torch_sort():
        return None
    kept = kept_ties(keys.numpy(), k, threshold, overwrite=overwrite, positions=positions)
    if kept is None:
        return None
    kept.sort()
    return TopK(threshold, torch.from_numpy(kept).long())


def band_of_keys(keys: torch.Tensor, density: float, gamma: float, *, tie_order: TieOrder = "sort",
                 overwrite: bool = False, positions: np.ndarray | None = None) -> TopK | None:
    """The entries of 1-D ``keys`` (:func:`magnitude_keys`) that :func:`outlier_mask` keeps at ``density`` and
    ``gamma``, as a two-sided rule: the ranks ``[n_bottom, n_bottom + target)`` of torch's ascending sort
    (one sort decides the ties at both edges, as in mergekit; ``tie_order`` "stable": a stable sort, without
    the replay). None where the sort must be run for real.
    ``overwrite``: ``keys`` may serve as the sort replay's scratch space (and are then left unordered);
    ``positions``: scratch space for its flat indices (as :func:`topk_of_keys`').

    The keys at the two edge ranks come from one histogram for 16-bit keys, numpy's partition for 32-bit
    ones (as in :func:`topk_of_keys`); the sort is replayed only where tied keys straddle an edge.
    """
    n = keys.numel()
    if density >= 1:
        return TopK(0)
    start, stop = _outlier_ranks(n, density, gamma)
    if stop == start:
        return TopK(None)
    if keys.dtype == torch.int16:
        at_or_below = _histogram(keys).cumsum(0)  # [j]: entries at or below key j
        low, high = torch.searchsorted(at_or_below, torch.tensor([start, stop - 1]), right=True).tolist()
        below_low, up_to_high = (int(at_or_below[low - 1]) if low else 0), int(at_or_below[high])
        below_high = int(at_or_below[high - 1]) if high else 0
        del at_or_below
    else:
        scratch = keys.numpy().copy()
        scratch.partition([start, stop - 1])
        low, high = int(scratch[start]), int(scratch[stop - 1])
        del scratch
        below_low = int(torch.count_nonzero(keys < low))
        up_to_high = int(torch.count_nonzero(keys <= high))
        below_high = int(torch.count_nonzero(keys < high))
    # the entries equal to an edge key take the ascending ranks [below, below + count): they straddle the
    # edge when some of them fall outside [start, stop)
    low_straddles, high_straddles = below_low < start, up_to_high > stop
    if not (low_straddles or high_straddles):
        return TopK(low, ceiling=high)
    if tie_order == "stable":  # each edge key's entries take their ranks by flat index
        def kept(key: int, below: int) -> torch.Tensor:
            return torch.from_numpy(equal_positions(keys.numpy(), key, start - below, stop - below))

        low_kept = kept(low, below_low) if low_straddles else None
        # one key at both edges (below_high == below_low): the same entries, not scanned twice
        high_kept = (None if not high_straddles else low_kept if low_kept is not None and high == low
                     else kept(high, below_high))
        return TopK(low, low_kept, ceiling=high, ceiling_ties=high_kept)
    if not matches_torch_sort():
        return None
    ties = band_ties(keys.numpy(), start, stop, low, high, overwrite=overwrite, positions=positions)
    if ties is None:
        return None
    low_ties, high_ties = (np.sort(t) for t in ties)
    return TopK(low, torch.from_numpy(low_ties).long() if low_straddles else None, ceiling=high,
                ceiling_ties=torch.from_numpy(high_ties).long() if high_straddles else None)


def _outlier_ranks(n: int, density: float, gamma: float) -> tuple[int, int]:
    """The ascending ranks ``[start, stop)`` Breadcrumbs keeps of ``n`` magnitudes, with mergekit's
    ``magnitude_outliers`` counts: ``int(density·n)`` entries, above the ``int(gamma·n)`` largest unless
    that would leave fewer than that."""
    target = int(density * n)
    start = max(0, n - target - int(gamma * n))
    return start, start + target


def threshold_mask(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep entries with ``|delta| >= threshold`` (global-scope TIES: one threshold for a whole model)."""
    return delta.abs() >= threshold


def outlier_mask(delta: torch.Tensor, density: float, gamma: float, tie_order: TieOrder = "sort") -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` fraction of largest entries and enough small ones to keep ``density``,
    magnitudes tied at an edge kept in ``tie_order`` (:data:`TieOrder`).

    Same counts as mergekit's ``magnitude_outliers``: keep ``int(density*n)`` entries, skipping the
    ``int(gamma*n)`` largest unless that would leave fewer than the target.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    n_bottom, stop = _outlier_ranks(n, density, gamma)
    target = stop - n_bottom
    magnitude = delta.abs()
    work = _float_flat(magnitude)
    # mergekit keeps ranks [n_bottom, n_bottom + target) of an ascending sort: where tied magnitudes
    # straddle either edge, only that sort's order says which of them are kept
    edges = [r for r in (n_bottom, n_bottom + target) if 0 < r < n]
    if any(_straddles(work, r) for r in edges):
        return _sorted_range(work, n_bottom, n_bottom + target, descending=False,
                             tie_order=tie_order).reshape(delta.shape)
    keep_upto = topk_mask(magnitude, n - n_bottom)
    drop_top = topk_mask(magnitude, n - n_bottom - target)
    return keep_upto & ~drop_top


Coins = Callable[[torch.Size], torch.Tensor]
"""``coins(shape)``: a piece's uniform float32 draws of a CPU generator, shaped (``methods.dare.PieceCoins``)."""


def bernoulli_mask(shape: torch.Size, density: float | torch.Tensor, generator: torch.Generator | Coins,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Random keep-mask with keep probability ``density`` (a number, or one float32 probability per entry,
    as DELLA's), drawn on the CPU from ``generator`` (or its draws, :data:`Coins`): entry ``j`` is kept when
    ``u_j < p_j``, ``u ~ U[0, 1)``.

    Drawn on the CPU (torch's uniform kernel there is serial) so that the same seed gives the same mask on
    every device and thread count.
    """
    if isinstance(density, (int, float)) and density >= 1:
        return torch.ones(shape, dtype=torch.bool, device=device)
    draws = uniform_draws(shape, generator)
    if isinstance(density, torch.Tensor):
        return draws.to(density.device) < density
    if draws.dtype == torch.float32 and draws.device.type == "cpu" and draws.is_contiguous():
        # numpy's compare, against the float32 the scalar rounds to as torch's does: 0.19 ms per 1 Mi draws
        # against torch's 0.64 on one thread (2026-12-04), a tenth of a DARE-TIES piece
        return torch.from_numpy(np.asarray(draws.numpy() < np.float32(density))).to(device)  # 0-d: a scalar
    return (draws < density).to(device)


def uniform_draws(shape: torch.Size | tuple[int, ...], generator: torch.Generator | Coins) -> torch.Tensor:
    """The coins of a random drop: float32 ``u ~ U[0, 1)`` from a CPU ``generator``, or a piece's draws."""
    if isinstance(generator, torch.Generator):
        return torch.rand(shape, generator=generator, dtype=torch.float32)
    return generator(shape)


def drop_work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype mergekit's random drops (DARE, DELLA) compute probabilities and rescaling in on the CPU:
    float32 for float16 (torch has no float16 Bernoulli there), the delta's own dtype otherwise."""
    return torch.float32 if dtype == torch.float16 else dtype


def match_l1(kept: torch.Tensor, before: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale the sparsified ``kept`` in place so that its L1 norm is ``before`` (the unsparsified delta's), as
    mergekit's ``rescale`` does; left as is when either norm is below ``eps`` (mergekit's guard)."""
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept.mul_(before / after)


def generator_for(seed: int, index: int) -> torch.Generator:
    """A CPU generator for model ``index`` of a tensor whose engine-derived seed is ``seed``."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + index * 7_919) % (2**63 - 1))
    return g
