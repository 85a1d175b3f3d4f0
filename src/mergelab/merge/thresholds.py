"""Exact global magnitude thresholds over a whole model, computed by streaming (TIES ``scope: global``).

The TIES paper keeps the top-k% entries of each task vector *over the whole model*. Sorting billions of
values is out of the question. Non-negative float32 values sort like their bit patterns read as integers,
so three histogram passes over the bits (11, 12 and 8 bits, from the top) find the k-th largest |δ|
exactly, with integer arithmetic only and memory for one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

DeltaStream = Callable[[], Iterable[torch.Tensor]]
"""Returns a fresh iterator over one model's task-vector tensors (each call re-reads them)."""

_LEVELS = ((20, 11), (8, 12), (0, 8))  # (shift, bits): 11 + 12 + 8 = the 31 bits of a non-negative float32


def global_threshold(deltas: DeltaStream, density: float) -> float:
    """The k-th largest |δ| over every tensor of ``deltas``, ``k = max(1, int(density · n))``.

    Keeping entries with ``|δ| >= threshold`` keeps k entries (more only if values tie at the threshold).
    """
    if density >= 1:
        return 0.0
    prefix, above, k = 0, 0, -1
    for shift, nbits in _LEVELS:
        hist = torch.zeros(2**nbits, dtype=torch.int64)
        for d in deltas():
            bits = d.detach().abs().float().reshape(-1).cpu().view(torch.int32)
            bits = bits[(bits >> (shift + nbits)) == prefix]
            hist += torch.bincount((bits >> shift) & (2**nbits - 1), minlength=2**nbits)
        if k < 0:  # first pass: every value matches prefix 0
            total = int(hist.sum())
            if density <= 0 or total == 0:
                return float("inf")
            k = max(1, int(density * total))
        counts = hist.flip(0).cumsum(0)  # counts[j]: entries in the top j+1 bins
        j = int(torch.searchsorted(counts, torch.tensor(k - above)))
        b = 2**nbits - 1 - j
        above += int(counts[j - 1]) if j > 0 else 0
        prefix = (prefix << nbits) | b
    return float(torch.tensor([prefix], dtype=torch.int32).view(torch.float32)[0])
