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
from collections.abc import Callable, Sequence

import numpy as np
import torch

from mergelab.kernels.row_reductions import cascade_power

_F32 = np.float32
_ILP = 4  # vectors per cascade step (row_sum's ilp_factor)
_LEVELS = 4
SUPPORTED = (torch.float32, torch.bfloat16)


_NONE = np.zeros(0, _F32)  # an empty carry: a fresh empty array, or an empty view, would be a small block
# allocated between two pieces' large buffers and kept, which pins the heap there (as slerp.py notes)


def _keep(x: np.ndarray) -> np.ndarray:
    """``x`` kept until the next piece: a copy (not a view holding a piece's whole buffer), or :data:`_NONE`."""
    return x.copy() if x.size else _NONE


def _seq(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Sequential float32 sums from +0 along ``axis``: numpy adds a non-innermost axis row after row."""
    return np.add.reduce(x, axis=axis, initial=_F32(0), dtype=_F32)


def _check(numel: int, dtype: torch.dtype, lanes: int) -> None:
    if dtype not in SUPPORTED:
        raise ValueError(f"{dtype} rows are not replayed (only {SUPPORTED})")
    if numel < 2 * lanes:  # rows shorter than one vector take torch's scalar loops, not replayed
        raise ValueError(f"rows of {numel} entries are not replayed (at least {2 * lanes})")


def _float32(pieces: Sequence[torch.Tensor]) -> np.ndarray:
    """Pieces of equal length as the rows of one float32 array (bfloat16 → float32 is exact)."""
    if len(pieces) == 1 and pieces[0].dtype == torch.float32:
        return pieces[0].reshape(1, -1).numpy()
    out = torch.empty((len(pieces), pieces[0].numel()), dtype=torch.float32)
    for row, piece in zip(out, pieces, strict=True):
        row.copy_(piece.reshape(-1))
    return out.numpy()


class _Rows:
    """``k`` rows of ``numel`` entries fed in lockstep, piece by piece: the entries before ``end`` are
    processed in runs of whole ``unit``s (carried over between pieces), those after it kept for the end."""

    def __init__(self, k: int, numel: int, end: int, unit: int) -> None:
        self.k, self.numel, self.end, self.unit, self.seen = k, numel, end, unit, 0
        self.carry = _NONE  # (k, c): entries before `end` not yet making a whole unit
        self.rest = _NONE  # (k, r): entries after `end`

    def take(self, pieces: Sequence[torch.Tensor]) -> np.ndarray | None:
        """The whole units the pieces complete, as a (k, n · unit) array, or None."""
        if len(pieces) != self.k:
            raise ValueError(f"fed {len(pieces)} rows, not {self.k}")
        x = _float32(pieces)
        a = self.seen
        self.seen += x.shape[1]
        cut = max(0, min(x.shape[1], self.end - a))
        if cut < x.shape[1]:
            self.rest = np.concatenate([self.rest, x[:, cut:]], axis=1) if self.rest.size else x[:, cut:].copy()
        x = np.concatenate([self.carry, x[:, :cut]], axis=1) if self.carry.size else x[:, :cut]
        full = x.shape[1] // self.unit * self.unit
        self.carry = _keep(x[:, full:])
        return x[:, :full] if full else None

    def tail(self, what: str) -> np.ndarray:
        """The entries after ``end``, (k, r), once every entry was fed."""
        if self.seen != self.numel:
            raise ValueError(f"{what}: fed {self.seen} of {self.numel} entries")
        return self.rest if self.rest.size else np.zeros((self.k, 0), _F32)


def _side_by_side(rows: np.ndarray, width: int, lanes: int,
                  fill: Callable[[torch.Tensor, torch.Tensor], object]) -> np.ndarray:
    """The k rows cut into n runs of ``width`` entries, each made ``lanes`` values by ``fill(runs, out)``
    (torch ops), as one contiguous (n, k · lanes) array, row i's in columns [i · lanes, (i+1) · lanes):
    numpy then adds the lanes of all k rows in one loop. Numpy's loops cost ~60 ns per row of the array
    whatever its width up to 32 (8-lane rows: 7.8 ms per Mi entries), so the rows are made wide, and the
    strided writes are torch's (numpy's took 0.6 s of a 5 s merge)."""
    k = rows.shape[0]
    out = torch.empty((rows.shape[1] // width, k, lanes), dtype=torch.float32)
    source = torch.from_numpy(rows)
    for i in range(k):
        fill(source[i].view(-1, width), out[:, i, :])
    return out.view(-1, k * lanes).numpy()


class _Grouped:
    """One level of the cascade above level 0: sums of ``step`` consecutive items, in order; the items
    since the last full group wait in ``pending``."""

    def __init__(self, step: int, width: int) -> None:
        self.step, self.width = step, width
        self.pending = _NONE

    def add(self, items: np.ndarray) -> np.ndarray:
        """Take ``items`` (rows of lanes); return the sums of the groups they complete."""
        items = np.concatenate([self.pending.reshape(-1, self.width), items]) if self.pending.size else items
        full = len(items) // self.step * self.step
        self.pending = _keep(items[full:])
        return _seq(items[:full].reshape(-1, self.step, self.width), axis=1)


class RowSums:
    """``x.reshape(1, -1).sum(dim=-1)`` of ``k`` float32 or bfloat16 rows of ``numel`` entries each, fed
    in lockstep piece by piece (:meth:`add`), each summed as torch sums it."""

    def __init__(self, k: int, numel: int, dtype: torch.dtype, lanes: int) -> None:
        _check(numel, dtype, lanes)
        self.dtype, self.lanes, self.k = dtype, lanes, k
        self.entries = lanes * (2 if dtype == torch.bfloat16 else 1)  # per vector load
        vectors = numel // self.entries
        steps = vectors // _ILP
        power = cascade_power(steps)
        self.per_block = 1 << power  # steps per level-0 sum
        self.vectors_end = vectors * self.entries
        self.rows = _Rows(k, numel, steps * _ILP * self.entries, self.per_block * _ILP * self.entries)
        self.width = k * _ILP * lanes
        self.levels = [_Grouped(1 << power, self.width) for _ in range(_LEVELS - 2)]
        self.top = np.zeros(self.width, _F32)  # the last level: never flushed (updated in place)

    def _steps(self, rows: np.ndarray) -> np.ndarray:
        """Entries (whole steps) as rows of the ``4 · lanes`` lanes of a step, the k rows side by side."""
        if self.dtype == torch.bfloat16:  # each vector's two halves added on load
            def fill(x: torch.Tensor, out: torch.Tensor) -> None:
                halves = x.view(-1, _ILP, 2, self.lanes)
                torch.add(halves[:, :, 0], halves[:, :, 1], out=out.view(-1, _ILP, self.lanes))
            return _side_by_side(rows, _ILP * self.entries, _ILP * self.lanes, fill)
        return _side_by_side(rows, _ILP * self.lanes, _ILP * self.lanes, lambda x, out: out.copy_(x))

    def add(self, pieces: Sequence[torch.Tensor]) -> None:
        x = self.rows.take(pieces)
        if x is None:
            return
        sums = _seq(self._steps(x).reshape(-1, self.per_block, self.width), axis=1)
        for level in self.levels:
            sums = level.add(sums)
        self.top[:] = _seq(np.concatenate([self.top[None], sums]))

    def results(self) -> list[torch.Tensor]:
        rest = self.rows.tail("RowSums")
        carry = self.rows.carry
        acc = _seq(self._steps(carry)) if carry.size else np.zeros(self.width, _F32)
        for level in self.levels:
            acc = acc + _seq(level.pending)
        acc = (acc + self.top).reshape(self.k, _ILP, self.lanes)
        spare = self.vectors_end - self.rows.end
        out = []
        for i in range(self.k):
            first = acc[i, 0]
            for v in self._vectors(rest[i, :spare]):
                first = first + v
            for j in range(1, _ILP):
                first = first + acc[i, j]
            total = _F32(0)
            for value in rest[i, spare:]:
                total = _F32(total + value)
            for value in first:
                total = _F32(total + value)
            out.append(torch.tensor([float(total)], dtype=self.dtype))  # bfloat16: rounded once, as torch does
        return out

    def _vectors(self, x: np.ndarray) -> np.ndarray:
        if self.dtype == torch.bfloat16:
            halves = x.reshape(-1, 2, self.lanes)
            return np.add(halves[:, 0], halves[:, 1])
        return x.reshape(-1, self.lanes)


class RowNorms:
    """``x.reshape(1, -1).norm(dim=-1)`` of ``k`` float32 or bfloat16 rows of ``numel`` entries each, fed
    in lockstep piece by piece (:meth:`add`)."""

    def __init__(self, k: int, numel: int, dtype: torch.dtype, lanes: int) -> None:
        _check(numel, dtype, lanes)
        self.dtype, self.lanes, self.k = dtype, lanes, k
        step = lanes * (2 if dtype == torch.bfloat16 else 1)  # entries per vector
        self.rows = _Rows(k, numel, numel - numel % step, lanes)
        self.acc = np.zeros(k * lanes, _F32)  # updated in place

    def add(self, pieces: Sequence[torch.Tensor]) -> None:
        x = self.rows.take(pieces)
        if x is None:
            return
        # a bfloat16 vector's halves are consecutive runs of `lanes` entries: the same order
        squares = _side_by_side(x, self.lanes, self.lanes, lambda v, out: torch.mul(v, v, out=out))
        squares[0] += self.acc  # (0 + (acc + s0)) + s1 ... = (acc + s0) + s1 ...: the running sums continued
        self.acc[:] = _seq(squares)

    def results(self) -> list[torch.Tensor]:
        rest = self.rows.tail("RowNorms")
        out = []
        for i in range(self.k):
            lanes = self.acc[i * self.lanes:(i + 1) * self.lanes]
            total = lanes[0]
            for value in lanes[1:]:
                total = _F32(total + value)
            for value in rest[i]:
                total = _F32(total + _F32(value * value))
            out.append(torch.tensor([float(np.sqrt(total))], dtype=self.dtype))
        return out


@functools.cache
def lanes_for(dtype: torch.dtype) -> int | None:
    """The vector width (float32 lanes) with which :class:`RowSums` and :class:`RowNorms` reproduce this
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
    sums, norms = RowSums(2, x.numel(), x.dtype, lanes), RowNorms(1, x.numel(), x.dtype, lanes)
    square = x * x
    for a in range(0, x.numel(), 10_007):  # pieces that end mid-vector and mid-block
        sums.add([x[a:a + 10_007], square[a:a + 10_007]])
        norms.add([x[a:a + 10_007]])
    got = [*sums.results(), *norms.results()]
    return all(torch.equal(g.view(torch.int16 if g.dtype == torch.bfloat16 else torch.int32),
                           w.view(torch.int16 if w.dtype == torch.bfloat16 else torch.int32))
               for g, w in zip(got, want, strict=True))


def replicates(dtype: torch.dtype) -> bool:
    """Whether this process's torch sums and norms ``dtype`` rows as :class:`RowSums`/:class:`RowNorms` do."""
    return lanes_for(dtype) is not None
