"""Importing the large libraries (torch, numba) with Python's cyclic garbage collector paused.

Every few hundred new objects, CPython's collector walks the young ones, and every few of those walks all of
them; an import of torch or numba makes hundreds of thousands of objects, none of them garbage, so the
collector walked them again and again: ``import torch`` took 1.0 s with the collector paused against 1.3 s
without, loading the compiled loops 0.38 against 0.78 s (2026-12-02, 3 runs each, this machine). A
collection holds the GIL, so it also stalled the merge threads while the loops loaded beside them.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block with the cyclic collector off, then leave it as it was (reference counting still frees
    everything that is not in a cycle; the cycles made meanwhile are collected at the next collection)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
