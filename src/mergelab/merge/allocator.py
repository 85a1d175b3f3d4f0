"""Let the C allocator recycle the engine's buffers instead of returning them to the OS after each piece.

glibc serves an allocation above its mmap threshold with a fresh ``mmap`` and unmaps it on ``free``, and
trims the heap top past a few MiB; every fresh page is then zero-filled by the kernel on first touch.
Streaming 3 × 0.5 GB of bf16 through the engine that way cost ~250,000 page faults and 1.4–1.7 s of system
time, more than the arithmetic; with the threshold at glibc's maximum (32 MiB) and trimming only past
512 MiB, the same merge took under 10,000 faults and 0.6 s (``benchmarks/vs_mergekit.py``). Tensors larger
than 32 MiB are still mapped and unmapped, so peak memory is unchanged.

Each thread that allocates may get its own arena, and each arena keeps what is freed in it up to the trim
threshold: with the merge, pass and top-k threads of 2026-12-02 (merge/engine.py), TIES at 3 × 0.5 GB peaked
at 697 MiB instead of 592 (one run). One arena for every thread: ``mergelab merge`` at 3 × 0.5 GB, two
alternations of one arena and two (the main one and one shared by the other threads), quiet machine, peak RSS
TIES 609/603 MiB against 652/632, Model Stock 407/415 against 460/452, linear 355/347 against 357/361, and
no slower (TIES 13.53/13.50 s against 14.04/14.12, Model Stock 4.38/4.28 against 4.76/4.58).

The setting is process-wide and permanent, so only processes of mergelab's own (the CLI) call this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)
_TRIM_THRESHOLD = 512 << 20
_ARENA_MAX = 1


def recycle_freed_memory() -> bool:
    """Tune glibc's malloc as above; ``False`` (and no change) where that is not glibc on Linux."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success; musl's stub returns 0 and changes nothing
    return all(mallopt(option, value) == 1 for option, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                                 (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
                                                                 (_M_ARENA_MAX, _ARENA_MAX)))
