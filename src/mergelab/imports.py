"""Importing the large libraries (torch, numba) with Python's cyclic garbage collector paused.

Every few hundred new objects, CPython's collector walks the young ones, and every few of those walks all of
them; an import of torch or numba makes hundreds of thousands of objects, none of them garbage, so the
collector walked them again and again: ``import torch`` took 1.0 s with the collector paused against 1.3 s
without, loading the compiled loops 0.38 against 0.78 s (2026-12-02, 3 runs each, this machine). A
collection holds the GIL, so it also stalled the merge threads while the loops loaded beside them.

The same objects cost again at exit, where the interpreter's last collection walks them all once more: 0.7-0.8 s
after a 3 × 2 GB linear merge, 0.15 s with them moved out of the collector's reach first
(:func:`no_collection_at_exit`; 2026-12-02, 2 runs each).
"""

from __future__ import annotations

import atexit
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


def _freeze() -> None:
    gc.disable()
    gc.freeze()  # the final collection leaves frozen objects alone; reference counting still frees them


def no_collection_at_exit() -> None:
    """Make the interpreter's exit skip the cyclic collection of every object still alive (the process is
    ending; finalizers of objects not in a cycle still run, open files are still flushed and closed). Once per
    process, however often it is called."""
    atexit.unregister(_freeze)
    atexit.register(_freeze)
