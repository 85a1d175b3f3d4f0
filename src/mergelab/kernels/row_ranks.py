"""Each entry's rank in its row under torch's CPU ``argsort(dim=1)``, from the sort replay run over whole rows.

DELLA's keep probabilities are linear in every entry's magnitude rank within its row, with tied magnitudes
ranked as mergekit's ``torch.argsort`` leaves them, so every rank matters and the whole sort must be had.
torch sorts each row with libstdc++'s ``std::sort`` (:mod:`mergelab.methods.std_sort`); the compiled replay of
that introsort on integer keys (a magnitude's bit pattern) gives the same permutation in under half the time
(a 5504 × 2048 bfloat16 task vector of the 3 × 2 GB benchmark models, one thread: 0.19 against 0.44 s for
``argsort`` and the scatter that inverts it; scratch benchmark, 2026-12-03). Checked against torch on tied
rows on first use per dtype; None where it does not apply, and the caller sorts. DELLA wants one value per
rank (its keep probability), so each row's values can be written where its ranks are found.

``tie_order: stable`` ranks ties by index instead, which any stable sort gives: :func:`stable_ranks` counts each
row of 16-bit patterns by key and hands out the ranks from that count (a radix sort for a row whose keys spread
over more than twice its length; ``_loops.stable_row_ranks_loop``): 2.4–2.5 ns per entry on the benchmark's
bfloat16 task vectors, one thread, against 5.7 for numpy's stable argsort of the keys with the scatter of the
table, and 17 on a 32000-row tensor, where the keys' and magnitudes' own passes missed the cache (scratch
benchmarks, 2026-12-05).
"""

from __future__ import annotations

import numpy as np
import torch

from mergelab.kernels.dispatch import as_array, loops, verified
from mergelab.kernels.masked import KEY_SPECS

_TABLE_DTYPES = (torch.bfloat16, torch.float32)  # what a rank may be looked up in (numpy views them)


def argsort_ranks(magnitudes: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor | None:
    """``ranks[r, j]``: the position ``torch.argsort(magnitudes, dim=1)`` (ascending) gives entry ``j`` of row
    ``r``, as int32, for a 2-D CPU tensor of non-negative bfloat16, float16 or float32 values; with ``table`` (one
    bfloat16 or float32 value per rank), ``table[ranks]``, looked up as each row's ranks are found (DELLA's keep
    probabilities: a gather of 2.8 Mi entries saved, 9 ms). None where the loops are not loaded, the input is
    another kind, a value is NaN (torch's comparator ties every NaN) or introsort would fall back to heapsort."""
    module = loops()
    spec = KEY_SPECS.get(magnitudes.dtype)  # bit patterns of magnitudes order as their values; above +Inf: NaN
    if (module is None or spec is None or magnitudes.dim() != 2 or magnitudes.device.type != "cpu"
            or magnitudes.shape[1] < 2 or magnitudes.numel() == 0 or magnitudes.shape[1] >= 1 << 31):
        return None
    if table is not None and (table.dtype not in _TABLE_DTYPES or table.shape != (magnitudes.shape[1],)
                              or table.device.type != "cpu"):
        return None
    key_dtype, inf_bits = spec

    def run(values: torch.Tensor, lookup: torch.Tensor | None) -> torch.Tensor | None:
        keys = values.contiguous().view(key_dtype)
        n = keys.shape[1]
        if lookup is None:
            out = torch.empty(keys.shape, dtype=torch.int32)
            entries, by_rank = out.view(-1).numpy(), np.arange(n, dtype=np.int32)
        else:
            out = torch.empty(keys.shape, dtype=lookup.dtype)
            entries, by_rank = as_array(out, writable=True), as_array(lookup.contiguous())
        done = module.row_ranks_loop(keys.numpy(), 2 * (n.bit_length() - 1), inf_bits, by_rank, entries)
        return out if done == -1 else None

    def check() -> bool:
        generator = torch.Generator().manual_seed(0)
        for rows, n in ((3, 2), (5, 17), (4, 300), (2, 5000)):
            values = (torch.randn(rows, n, generator=generator) * 0.002).to(magnitudes.dtype).abs()
            values[0, : n // 2] = values[0, 0]  # a long run of one magnitude
            order = torch.argsort(values, dim=1)
            expected = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand_as(order))
            got = run(values, None)
            if got is None or not torch.equal(got.long(), expected):
                return False
            for dtype in _TABLE_DTYPES:
                lookup = torch.randn(n, generator=generator).to(dtype)
                got = run(values, lookup)
                if got is None or not torch.equal(got, lookup[expected]):
                    return False
        return True

    if not verified("row ranks", magnitudes.dtype, check):
        return None
    return run(magnitudes, table)


def stable_ranks(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor | None:
    """``table[r]`` for every entry of ``values`` (2-D, CPU, bfloat16 or float16, signed: the magnitudes are
    its patterns without the sign bit), ``r`` its rank in its row (dim 1) by a stable ascending sort of the
    magnitudes: ties ranked by index, ``-0.0`` tied with ``0.0``. ``table``: one bfloat16 or float32 value
    per rank. None where the loops are not loaded, the input is another kind, or a value is NaN (the caller
    sorts as torch does, NaN last)."""
    module = loops()
    spec = KEY_SPECS.get(values.dtype)
    if (module is None or spec is None or spec[0] != torch.int16 or values.dim() != 2
            or values.device.type != "cpu" or values.shape[1] < 2 or values.numel() == 0
            or table.dtype not in _TABLE_DTYPES or table.shape != (values.shape[1],) or table.device.type != "cpu"):
        return None
    inf_bits = spec[1]

    def run(rows: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor | None:
        out = torch.empty(rows.shape, dtype=lookup.dtype)
        bits = rows.contiguous().view(torch.int16).numpy().view(np.uint16)
        done = module.stable_row_ranks_loop(bits, inf_bits, as_array(lookup.contiguous()),
                                            as_array(out, writable=True))
        return out if done == -1 else None

    def check() -> bool:
        generator = torch.Generator().manual_seed(0)
        # short rows span more buckets than twice their length (radix-sorted), the 5000-entry ones fewer (counted)
        for rows, n in ((3, 2), (5, 17), (4, 300), (2, 5000)):
            drawn = (torch.randn(rows, n, generator=generator) * 0.002).to(values.dtype)
            drawn[0, : n // 2] = drawn[0, 0]  # a long run of one magnitude, both signs and both zeros below
            drawn[1, : n // 2] *= torch.where(torch.arange(n // 2) % 2 == 0, 1.0, -1.0).to(values.dtype)
            drawn[-1, ::3] = 0.0
            drawn[-1, 1::3] = -0.0
            order = torch.argsort(drawn.abs(), dim=1, stable=True)
            for dtype in _TABLE_DTYPES:
                lookup = torch.randn(n, generator=generator).to(dtype)
                expected = torch.empty(order.shape, dtype=dtype).scatter_(1, order, lookup.expand_as(order))
                got = run(drawn, lookup)
                if got is None or not torch.equal(got, expected):
                    return False
        return True

    if not verified("stable row ranks", values.dtype, check):
        return None
    return run(values, table)
