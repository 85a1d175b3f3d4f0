"""Rich progress bars and CPU thread settings shared by zoo training and the studies."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def make_progress(*, disable: bool = False) -> Progress:
    """A progress display on stderr (stdout stays clean for tables); ``disable`` hides it (tests)."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False, disable=disable,
    )


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def default_threads() -> int:
    """``$MERGELAB_THREADS`` or 1.

    Measured on the 2-core CI/dev machines: with a second busy process, 2 intra-op threads made training and
    inference of these small models 2-4× *slower* than 1 thread (OpenMP threads wait on each other). So
    parallelism comes from processes (one training worker per core), not from threads.
    """
    env = os.environ.get("MERGELAB_THREADS")
    return max(1, int(env)) if env else 1


@contextmanager
def torch_threads(n: int | None = None) -> Iterator[int]:
    """Use ``n`` intra-op threads (default :func:`default_threads`), restoring the old value afterwards."""
    old = torch.get_num_threads()
    n = max(1, min(n or default_threads(), available_cores()))
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)
