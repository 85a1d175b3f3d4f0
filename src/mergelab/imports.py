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


def no_blas_workers() -> None:
    """Let scipy's OpenBLAS, which numba's load of the compiled loops imports (``scipy.linalg``, to look for a
    BLAS), start no worker threads in this process, unless ``OPENBLAS_NUM_THREADS`` says otherwise. Merging never
    calls it, and its worker spins as the library loads, on the core where the inputs' digests and torch's import
    run: 1.8-3.8 % of the CPU samples of `mergelab merge` at 3 x 0.5 GB under ``perf record``, none with the
    variable at 1; alternated (6 pairs, linear, every input hashed) wall 2.48-3.04 s, median 2.85, against
    2.35-2.83, median 2.53, user CPU lower in every pair (2026-12-05). OpenBLAS reads the variable once, when it
    loads, so it is set before any thread starts (setting the environment beside running threads is unsafe)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


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
