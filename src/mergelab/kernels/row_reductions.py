"""torch's one-thread CPU sum and 2-norm of long rows, replayed in compiled loops, fed piece by piece.

:mod:`mergelab.methods.row_sums` replays torch's order of additions with numpy (its notes say which order);
these loops make the same float32 additions, in the same order, in one pass over the inputs that also
computes the rows' entries: SLERP's chunk norms and dot products, Model Stock's task-vector norms and
pairwise dot products. Each is checked against torch on first use per dtype (tests/test_kernels.py also
against the numpy replay), and anything they do not cover returns None: the caller then runs the torch or
numpy code, which gives the same bits. A row with a NaN or an infinity among its sums is left to that code
too (the order of a NaN's operands decides its payload, see ``_loops``).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch

from mergelab.kernels.dispatch import as_array, eligible, loops, verified

_ILP = 4
_F32 = np.float32


def cascade_power(steps: int) -> int:
    """log2 of the steps per level of torch's 4-level cascade sum over a row of ``steps`` steps (SumKernel's
    ``level_power = max(4, CeilLog2(size) / num_levels)``); shared with the numpy replay."""
    ceil_log2 = 1 if steps <= 2 else (steps - 1).bit_length()  # at::native::utils::CeilLog2
    return max(4, ceil_log2 // 4)


class _Rows:
    """The state of ``sums`` summed rows and ``norms`` normed rows of ``numel`` entries each, in torch's
    vector layout for ``dtype`` rows (a bfloat16 vector holds ``2 · lanes`` entries, float32 ``lanes``)."""

    def __init__(self, module: ModuleType, sums: int, norms: int, numel: int, dtype: torch.dtype,
                 lanes: int) -> None:
        entries = lanes * (2 if dtype == torch.bfloat16 else 1)
        vectors = numel // entries
        steps = vectors // _ILP
        power = cascade_power(steps)
        self.module, self.numel, self.step = module, numel, _ILP * entries
        self.state = np.array([lanes, entries, power, steps * self.step, vectors * entries, 0], np.int64)
        self.sums = np.zeros((sums, 4, _ILP, lanes), _F32)
        self.norms = np.zeros((norms, lanes), _F32)
        self.rest_sums = np.zeros((sums, numel - steps * self.step), _F32)
        self.rest_norms = np.zeros((norms, numel - vectors * entries), _F32)
        self.values = np.empty((sums + norms, module._BLOCK), _F32)
        self.seen = 0

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.values, self.sums, self.norms, self.state, self.rest_sums, self.rest_norms

    def results(self) -> tuple[list[float], list[float]] | None:
        """The rows' sums and norms (float32 values), or None if any is not finite."""
        if self.seen != self.numel:
            raise ValueError(f"fed {self.seen} of {self.numel} entries")
        sums = np.empty(self.sums.shape[0], _F32)
        norms = np.empty(self.norms.shape[0], _F32)
        self.module.finish_sums(self.sums, self.rest_sums, self.state, sums)
        self.module.finish_norms(self.norms, self.rest_norms, norms)
        if not (np.isfinite(sums).all() and np.isfinite(norms).all()):
            return None
        return [float(x) for x in sums], [float(x) for x in norms]


def _rows_fit(module: ModuleType, numel: int, lanes: int | None) -> bool:
    # shorter rows take torch's scalar loops; the loops know one vector width (numpy replays the others)
    return lanes is not None and lanes == module.LANES and numel >= 2 * lanes


class OffsetSums:
    """Model Stock's sums over task vectors fed piece by piece (:meth:`add`): the 2-norm of each
    ``d_i = x_i − base`` and the sum of ``d_i · d_j`` for each pair ``i < j``, every step rounded to
    ``dtype`` and summed as torch sums a ``dtype`` row on one thread. Made by :func:`offset_sums`."""

    def __init__(self, module: ModuleType, count: int, numel: int, dtype: torch.dtype, lanes: int) -> None:
        self.pairs = np.array([(i, j) for i in range(count) for j in range(i + 1, count)], np.int64).reshape(-1, 2)
        self.rows = _Rows(module, len(self.pairs), count, numel, dtype, lanes)
        self.like = np.uint16(0) if dtype == torch.bfloat16 else _F32(0)
        self.dtype = dtype

    def add(self, base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> bool:
        """Feed the next piece; False (nothing fed) where the loop does not take it: the caller then
        finishes with the numpy replay from the start."""
        rows = self.rows
        pieces = [base, *tensors]
        if (rows.seen % rows.step or not eligible(pieces) or base.dtype not in (self.dtype, torch.bfloat16)
                or len(tensors) != rows.norms.shape[0]):
            return False
        rows.module.offset_rows_loop(as_array(base), tuple(as_array(t.reshape(-1)) for t in tensors), self.like,
                                     self.pairs, rows.seen, *rows.arrays())
        rows.seen += base.numel()
        return True

    def results(self) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """(norms of the task vectors, sums of the pairs' products) as ``[1]`` tensors of the rows' dtype,
        torch's numbers; None where one is not finite."""
        done = self.rows.results()
        if done is None:
            return None
        sums, norms = done
        return ([torch.tensor([x], dtype=self.dtype) for x in norms],
                [torch.tensor([x], dtype=self.dtype) for x in sums])


def offset_sums(count: int, numel: int, dtype: torch.dtype, lanes: int | None) -> OffsetSums | None:
    """An :class:`OffsetSums` for ``count`` task vectors of ``numel`` entries summed in ``dtype`` with
    ``lanes`` float32 lanes (:func:`mergelab.methods.row_sums.lanes_for`), or None where the loops are not
    loaded or do not give torch's bits for ``dtype``."""
    module = loops()
    if module is None or dtype not in (torch.float32, torch.bfloat16) or not _rows_fit(module, numel, lanes):
        return None
    assert lanes is not None
    if not verified(f"row sums {lanes}", dtype, lambda: _check_offsets(module, dtype, lanes)):
        return None
    return OffsetSums(module, count, numel, dtype, lanes)


def _one_thread(call):  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return call()
    finally:
        torch.set_num_threads(before)


def _check_offsets(module: ModuleType, dtype: torch.dtype, lanes: int) -> bool:
    """The loop's norms and dot products against torch's on one thread, on rows whose lengths cross every
    boundary of the replay (vectors, steps, each cascade level, tails), fed in pieces of 4096 entries."""
    g = torch.Generator().manual_seed(0)
    for n in (16, 17, 100, 1023, 4099, 70_001, 1_048_583):
        base = (torch.randn(n, generator=g) * 0.02).to(dtype)
        xs = [(base.float() + torch.randn(n, generator=g) * 0.002).to(dtype) for _ in range(3)]
        if not _rows_fit(module, n, lanes):
            continue
        sums = OffsetSums(module, 3, n, dtype, lanes)
        for a in range(0, n, 65_536):
            if not sums.add(base[a:a + 65_536], [x[a:a + 65_536] for x in xs]):
                return False
        got = sums.results()
        if got is None:
            return False
        offsets = [(x - base).reshape(1, -1) for x in xs]
        want_norms = _one_thread(lambda: [d.norm(dim=-1) for d in offsets])  # noqa: B023
        want_sums = _one_thread(lambda: [(offsets[i] * offsets[j]).sum(dim=-1)  # noqa: B023
                                          for i in range(3) for j in range(i + 1, 3)])
        if not all(torch.equal(x, y) for x, y in zip([*got[0], *got[1]], [*want_norms, *want_sums], strict=True)):
            return False
    return True


class ChunkSums:
    """SLERP's float32 sums over one chunk (a row of its own, loaded to float32 as slerp does): the norms of
    ``a`` and ``b``, then the sum of ``(a / |a|) · (b / |b|)``. Made by :func:`chunk_sums`."""

    def __init__(self, module: ModuleType, lanes: int) -> None:
        self.module, self.lanes = module, lanes

    def norms(self, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float] | None:
        if not self._takes(a, b):
            return None
        rows = _Rows(self.module, 0, 2, a.numel(), torch.float32, self.lanes)
        self.module.chunk_norms_loop(as_array(a), as_array(b), *rows.arrays())
        rows.seen = a.numel()
        done = rows.results()
        return None if done is None else (done[1][0], done[1][1])

    def normalized_dot(self, a: torch.Tensor, b: torch.Tensor, norm_a: float, norm_b: float) -> float | None:
        if not self._takes(a, b):
            return None
        rows = _Rows(self.module, 1, 0, a.numel(), torch.float32, self.lanes)
        self.module.normalized_dot_loop(as_array(a), as_array(b), _F32(norm_a), _F32(norm_b), *rows.arrays())
        rows.seen = a.numel()
        done = rows.results()
        return None if done is None else done[0][0]

    def _takes(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        return _rows_fit(self.module, a.numel(), self.lanes) and eligible([a, b]) and torch.get_num_threads() == 1


def chunk_sums(dtype: torch.dtype, lanes: int | None) -> ChunkSums | None:
    """A :class:`ChunkSums` for chunks of ``dtype`` entries (bfloat16 or float32, summed in float32), or None
    where the loops are not loaded or do not give torch's bits. Used on one torch thread only: torch splits
    a long row's sum between its threads, in an order of their own."""
    module = loops()
    if module is None or dtype not in (torch.float32, torch.bfloat16) or lanes is None:
        return None
    sums = ChunkSums(module, lanes)
    if not verified(f"chunk sums {lanes}", dtype, lambda: _check_chunks(sums, dtype)):
        return None
    return sums


def _check_chunks(sums: ChunkSums, dtype: torch.dtype) -> bool:
    g = torch.Generator().manual_seed(0)
    for n in (16, 17, 100, 1023, 4099, 70_001, 1_048_576):
        a, b = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)

        def torch_sums() -> tuple[float, float, float]:
            a32, b32 = a.reshape(1, -1).float(), b.reshape(1, -1).float()  # noqa: B023
            na = float(torch.linalg.vector_norm(a32, dim=1, keepdim=True))
            nb = float(torch.linalg.vector_norm(b32, dim=1, keepdim=True))
            return na, nb, float((a32 / na * (b32 / nb)).sum(dim=1, keepdim=True))

        want = _one_thread(torch_sums)
        got = _one_thread(lambda: sums.norms(a, b))  # noqa: B023
        if got is None and _rows_fit(sums.module, n, sums.lanes):
            return False
        if got is not None:
            dot = _one_thread(lambda: sums.normalized_dot(a, b, want[0], want[1]))  # noqa: B023
            if (got[0], got[1], dot) != want:
                return False
    return True
