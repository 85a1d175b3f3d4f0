"""torch's CPU sum and 2-norm of one long row, replayed bit for bit from consecutive flat pieces.

Model Stock's ratio comes from ``(a * b).sum(dim=-1)`` and ``a.norm(dim=-1)`` over a whole flattened task
vector (as mergekit computes it). To merge a tensor piece by piece with the same bytes, those sums must come
out exactly as torch's single-threaded CPU kernels make them, without the row ever being whole. Both
kernels add in a fixed order that depends only on the row's length (read in torch 2.13's
``aten/src/ATen/native/cpu/SumKernel.cpp`` and ``ReduceOpsKernel.cpp``, and checked against torch here):

- **sum** (``cascade_sum``): the row is read as vectors of ``E`` entries (``lanes`` float32 lanes; a
  bfloat16 vector holds ``2 · lanes`` entries, its two halves added on load), four vectors to a *step*; the
  steps are summed lane-wise in a 4-level cascade (each level adds ``2^p`` sums of the level below,
  ``p = max(4, ⌈log2 steps⌉ // 4)``); then the 0–3 vectors left over, the four partial vectors together,
  the scalar tail, and the lanes one by one.
- **2-norm** (``norm_two_reduce_step``): squares accumulated lane-wise over ``lanes`` running sums (a
  bfloat16 vector: its two halves one after the other), the lanes added one by one, the scalar tail's
  squares added, then the square root.

Every addition is a float32 one in numpy (IEEE, no fused multiply-add), in the kernels' order. The vector
width is the kernel's, not the machine's (the reductions ran 8 lanes wide on an AVX-512 machine here), so
:func:`replicates` finds it by comparing with torch once per process, and callers fall back to whole
tensors where no width reproduces torch (another build, another platform).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

_F32 = np.float32
_ILP = 4  # vectors per cascade step (row_sum's ilp_factor)
_LEVELS = 4
SUPPORTED = (torch.float32, torch.bfloat16)


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()  # at::native::utils::CeilLog2


def _seq(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Sequential float32 sums from +0 along ``axis``: numpy adds a non-innermost axis row after row."""
    return np.add.reduce(x, axis=axis, initial=_F32(0), dtype=_F32)


def _check(numel: int, dtype: torch.dtype, lanes: int) -> None:
    if dtype not in SUPPORTED:
        raise ValueError(f"{dtype} rows are not replayed (only {SUPPORTED})")
    if numel < 2 * lanes:  # rows shorter than one vector take torch's scalar loops, not replayed
        raise ValueError(f"rows of {numel} entries are not replayed (at least {2 * lanes})")


def _float32(piece: torch.Tensor) -> np.ndarray:
    return piece.reshape(-1).to(torch.float32).numpy()


class _Grouped:
    """One level of the cascade above level 0: sums of ``step`` consecutive items, in order; the items
    since the last full group wait in ``pending``."""

    def __init__(self, step: int, lanes: int) -> None:
        self.step = step
        self.pending = np.zeros((0, lanes), _F32)

    def add(self, items: np.ndarray) -> np.ndarray:
        """Take ``items`` (rows of lanes); return the sums of the groups they complete."""
        items = np.concatenate([self.pending, items]) if len(self.pending) else items
        full = len(items) // self.step * self.step
        self.pending = items[full:]
        return _seq(items[:full].reshape(-1, self.step, items.shape[1]), axis=1)


class RowSum:
    """``x.reshape(1, -1).sum(dim=-1)`` of a float32 or bfloat16 row of ``numel`` entries, fed in order."""

    def __init__(self, numel: int, dtype: torch.dtype, lanes: int) -> None:
        _check(numel, dtype, lanes)
        self.dtype, self.lanes = dtype, lanes
        self.entries = lanes * (2 if dtype == torch.bfloat16 else 1)  # per vector load
        vectors = numel // self.entries
        steps = vectors // _ILP
        power = max(4, _ceil_log2(steps) // _LEVELS)
        self.block = (1 << power) * _ILP * self.entries  # entries per level-0 sum
        self.cascade_end = steps * _ILP * self.entries  # entries summed by the cascade
        self.vectors_end = vectors * self.entries
        self.numel, self.seen = numel, 0
        width = _ILP * lanes
        self.levels = [_Grouped(1 << power, width) for _ in range(_LEVELS - 2)]
        self.top = np.zeros(width, _F32)  # the last level: never flushed
        self.carry = np.zeros(0, _F32)  # cascade entries not yet making a level-0 block
        self.rest = np.zeros(0, _F32)  # entries after the cascade: left-over vectors and the tail

    def _steps(self, x: np.ndarray) -> np.ndarray:
        """Entries (a whole number of steps) as rows of the ``4 · lanes`` lanes of one step."""
        if self.dtype == torch.bfloat16:  # each vector's two halves added on load
            halves = x.reshape(-1, 2, self.lanes)
            return np.add(halves[:, 0], halves[:, 1]).reshape(-1, _ILP * self.lanes)
        return x.reshape(-1, _ILP * self.lanes)

    def add(self, piece: torch.Tensor) -> None:
        x = _float32(piece)  # bfloat16 → float32 is exact
        a = self.seen
        self.seen += x.size
        cut = max(0, min(x.size, self.cascade_end - a))
        self.rest = np.concatenate([self.rest, x[cut:]])
        if not cut:
            return
        x = np.concatenate([self.carry, x[:cut]]) if self.carry.size else x[:cut]
        full = x.size // self.block * self.block
        self.carry = x[full:]
        if full:
            sums = _seq(self._steps(x[:full]).reshape(-1, self.block // (_ILP * self.entries), _ILP * self.lanes),
                        axis=1)
            for level in self.levels:
                sums = level.add(sums)
            self.top = _seq(np.concatenate([self.top[None], sums]))

    def result(self) -> torch.Tensor:
        if self.seen != self.numel:
            raise ValueError(f"RowSum: fed {self.seen} of {self.numel} entries")
        acc = _seq(self._steps(self.carry)) if self.carry.size else np.zeros(_ILP * self.lanes, _F32)
        for level in self.levels:
            acc = acc + _seq(level.pending)
        acc = acc + self.top
        partial = acc.reshape(_ILP, self.lanes)
        first = partial[0]
        spare = self.vectors_end - self.cascade_end
        for v in self._vectors(self.rest[:spare]):
            first = first + v
        for k in range(1, _ILP):
            first = first + partial[k]
        total = _F32(0)
        for value in self.rest[spare:]:
            total = _F32(total + value)
        for value in first:
            total = _F32(total + value)
        return torch.tensor([float(total)], dtype=self.dtype)  # bfloat16: rounded once, as torch stores it

    def _vectors(self, x: np.ndarray) -> np.ndarray:
        if self.dtype == torch.bfloat16:
            halves = x.reshape(-1, 2, self.lanes)
            return np.add(halves[:, 0], halves[:, 1])
        return x.reshape(-1, self.lanes)


class RowNorm:
    """``x.reshape(1, -1).norm(dim=-1)`` of a float32 or bfloat16 row of ``numel`` entries, fed in order."""

    def __init__(self, numel: int, dtype: torch.dtype, lanes: int) -> None:
        _check(numel, dtype, lanes)
        self.dtype, self.lanes = dtype, lanes
        step = lanes * (2 if dtype == torch.bfloat16 else 1)  # entries per vector
        self.vectors_end = numel - numel % step
        self.numel, self.seen = numel, 0
        self.acc = np.zeros(lanes, _F32)
        self.carry = np.zeros(0, _F32)
        self.rest = np.zeros(0, _F32)

    def add(self, piece: torch.Tensor) -> None:
        x = _float32(piece)
        a = self.seen
        self.seen += x.size
        cut = max(0, min(x.size, self.vectors_end - a))
        self.rest = np.concatenate([self.rest, x[cut:]])
        x = np.concatenate([self.carry, x[:cut]]) if self.carry.size else x[:cut]
        full = x.size // self.lanes * self.lanes
        self.carry = x[full:]
        if full:  # a bfloat16 vector's halves are consecutive runs of `lanes` entries: the same order
            squares = np.multiply(x[:full], x[:full]).reshape(-1, self.lanes)
            self.acc = _seq(np.concatenate([self.acc[None], squares]))

    def result(self) -> torch.Tensor:
        if self.seen != self.numel:
            raise ValueError(f"RowNorm: fed {self.seen} of {self.numel} entries")
        total = self.acc[0]
        for value in self.acc[1:]:
            total = _F32(total + value)
        for value in self.rest:
            total = _F32(total + _F32(value * value))
        return torch.tensor([float(np.sqrt(total))], dtype=self.dtype)


@functools.cache
def lanes_for(dtype: torch.dtype) -> int | None:
    """The vector width (float32 lanes) with which :class:`RowSum` and :class:`RowNorm` reproduce this
    process's torch on one thread, found on random rows whose lengths cross every boundary of the
    replay (vectors, steps, cascade levels, tails); None if no width does."""
    if dtype not in SUPPORTED:
        return None
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(n, generator=g).to(dtype) for n in (16, 17, 100, 1023, 4099, 70_001, 524_311)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = [(x.reshape(1, -1).sum(dim=-1), (x * x).reshape(1, -1).sum(dim=-1), x.reshape(1, -1).norm(dim=-1))
                    for x in rows]
    finally:
        torch.set_num_threads(before)
    for lanes in (8, 16, 4):
        if all(_replays(x, want, lanes) for x, want in zip(rows, expected, strict=True)):
            return lanes
    return None


def _replays(x: torch.Tensor, want: tuple[torch.Tensor, ...], lanes: int) -> bool:
    got = []
    for values, kind in ((x, RowSum), (x * x, RowSum), (x, RowNorm)):
        acc = kind(x.numel(), x.dtype, lanes)
        for a in range(0, x.numel(), 10_007):  # pieces that end mid-vector and mid-block
            acc.add(values[a:a + 10_007])
        got.append(acc.result())
    return all(torch.equal(g.view(torch.int16 if g.dtype == torch.bfloat16 else torch.int32),
                           w.view(torch.int16 if w.dtype == torch.bfloat16 else torch.int32))
               for g, w in zip(got, want, strict=True))


def replicates(dtype: torch.dtype) -> bool:
    """Whether this process's torch sums and norms ``dtype`` rows as :class:`RowSum`/:class:`RowNorm` do."""
    return lanes_for(dtype) is not None
