"""Importing the large libraries (torch, numba) with Python's cyclic garbage collector paused.

Every few hundred new objects, CPython's collector walks the young ones, and every few of those walks all of
them; an import of torch or numba makes hundreds of thousands of objects, none of them garbage, so the
collector walked them again and again: ``import torch`` took 1.0 s with the collector paused against 1.3 s
without, loading the compiled loops 0.38 against 0.78 s (2026-12-02, 3 runs each, this machine). A
collection holds the GIL, so it also stalled the merge threads while the loops loaded beside them.

The same objects cost again at exit, where the interpreter's last collection walks them all once more: 0.7-0.8 s
after a 3 × 2 GB linear merge, 0.15 s with them moved out of the collector's reach first
(:func:`no_collection_at_exit`; 2026-12-02, 2 runs each). The rest of the interpreter's teardown (clearing every
module, C++ destructors of torch's libraries) still took 0.15-0.18 s after `mergelab merge` at 3 × 0.5 GB, against
0.04 s for a process that ends at once (:func:`run_command` after :func:`skip_teardown`; `python -c "import
torch"` 0.92-0.99 s against 0.69-0.72 s with ``os._exit``; 2026-12-05, 4 runs each).
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
from collections.abc import Callable, Iterator
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


_teardown_skipped: list[bool] = []  # [True] once a command has said that nothing is left to run


def skip_teardown() -> None:
    """Say that the command running now leaves nothing for the interpreter's exit to do (no child process, no
    thread with work, no file open for writing, no ``atexit`` duty): :func:`run_command` then ends the process
    at once if the command succeeds."""
    _teardown_skipped[:] = [True]


def run_command(main: Callable[[], object]) -> None:
    """Run a command line's ``main`` (which ends with :class:`SystemExit`, as click's does); after a success that
    called :func:`skip_teardown`, flush the standard streams and the log and end the process with ``os._exit``
    instead of the interpreter's teardown. Anything else (an error, a command that did not say so) exits as usual."""
    try:
        main()
    except SystemExit as done:
        if done.code in (0, None) and _teardown_skipped:
            logging.shutdown()
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except OSError:  # whoever read the output left (`| head`): exit 1 without a word, as the CLI does
                os._exit(1)
            _flush_c_streams()
            os._exit(0)
        raise


def _flush_c_streams() -> None:
    """Flush C's stdio buffers too (what a library printed through ``printf`` or ``std::cout``), which ``os._exit``
    would drop and the interpreter's teardown flushes."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to ask (not POSIX): nothing buffered there to lose
        pass
