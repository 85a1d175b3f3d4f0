"""Each entry's rank in its row under torch's CPU ``argsort(dim=1)``, from the sort replay run over whole rows.

DELLA's keep probabilities are linear in every entry's magnitude rank within its row, with tied magnitudes
ranked as mergekit's ``torch.argsort`` leaves them, so every rank matters and the whole sort must be had.
torch sorts each row with libstdc++'s ``std::sort`` (:mod:`mergelab.methods.std_sort`); the compiled replay of
that introsort on integer keys (a magnitude's bit pattern) gives the same permutation in under half the time
(a 5504 × 2048 bfloat16 task vector of the 3 × 2 GB benchmark models, one thread: 0.19 against 0.44 s for
``argsort`` and the scatter that inverts it; scratch benchmark, 2026-12-03). Checked against torch on tied
rows on first use per dtype; None where it does not apply, and the caller sorts.
"""

from __future__ import annotations

import numpy as np
import torch

from mergelab.kernels.dispatch import loops, verified
from mergelab.kernels.masked import KEY_SPECS


def argsort_ranks(magnitudes: torch.Tensor) -> torch.Tensor | None:
    """``ranks[r, j]``: the position ``torch.argsort(magnitudes, dim=1)`` (ascending) gives entry ``j`` of row
    ``r``, as int32, for a 2-D CPU tensor of non-negative bfloat16, float16 or float32 values; None where the
    loops are not loaded, the input is another kind, a value is NaN (torch's comparator ties every NaN) or
    introsort would fall back to heapsort."""
    module = loops()
    spec = KEY_SPECS.get(magnitudes.dtype)  # bit patterns of magnitudes order as their values; above +Inf: NaN
    if (module is None or spec is None or magnitudes.dim() != 2 or magnitudes.device.type != "cpu"
            or magnitudes.shape[1] < 2 or magnitudes.numel() == 0 or magnitudes.shape[1] >= 1 << 31):
        return None
    key_dtype, inf_bits = spec

    def run(values: torch.Tensor) -> torch.Tensor | None:
        keys = values.contiguous().view(key_dtype)
        if bool((keys > inf_bits).any()) or bool((keys < 0).any()):  # NaN, or a sign bit: not magnitudes
            return None
        n = keys.shape[1]
        ranks = np.empty(tuple(keys.shape), np.int32)
        if module.row_ranks_loop(keys.numpy(), 2 * (n.bit_length() - 1), ranks) >= 0:
            return None
        return torch.from_numpy(ranks)

    def check() -> bool:
        generator = torch.Generator().manual_seed(0)
        for rows, n in ((3, 2), (5, 17), (4, 300), (2, 5000)):
            values = (torch.randn(rows, n, generator=generator) * 0.002).to(magnitudes.dtype).abs()
            values[0, : n // 2] = values[0, 0]  # a long run of one magnitude
            order = torch.argsort(values, dim=1)
            expected = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand_as(order))
            got = run(values)
            if got is None or not torch.equal(got.long(), expected):
                return False
        return True

    if not verified("row ranks", magnitudes.dtype, check):
        return None
    return run(magnitudes)
