"""Console, progress display, CPU thread policy and the output-folder rule, shared by every layer that runs
long work (the engine, the zoo, the executors, the search and the studies).

One progress factory (:func:`make_progress`): on a terminal it is a rich progress bar on stderr; when stderr
is not a terminal (CI logs, ``nohup``, a pipe) rich would print nothing until the end, so the same object
also prints one plain line per task at least every :data:`PLAIN_INTERVAL_S` seconds while work runs.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn

from mergelab.errors import OutputExistsError

console = Console(stderr=True)
T = TypeVar("T")

#: seconds between plain progress lines when stderr is not a terminal (issue 15: "at least every 30 s")
PLAIN_INTERVAL_S = 30.0


class _PlainLines:
    """Prints ``[mm:ss] description: done/total`` for every unfinished task of ``progress`` every interval."""

    def __init__(self, progress: Progress, interval: float) -> None:
        self.progress = progress
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mergelab-progress", daemon=True)
        self._started = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)
        self.print_lines(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.print_lines()

    def print_lines(self, *, final: bool = False) -> None:
        elapsed = int(time.monotonic() - self._started)
        stamp = f"[{elapsed // 60:02d}:{elapsed % 60:02d}]"
        for task in list(self.progress.tasks):
            if final and not task.finished and task.completed == 0:
                continue
            total = f"/{task.total:g}" if task.total is not None else ""
            state = " done" if task.finished else ""
            console.file.write(f"{stamp} {task.description}: {task.completed:g}{total}{state}\n")
        console.file.flush()


class _Progress(Progress):
    """A rich Progress that falls back to plain periodic lines when the console is not a terminal."""

    def __init__(self, *columns: str | ProgressColumn, plain_interval: float = PLAIN_INTERVAL_S,
                 **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self._plain: _PlainLines | None = None
        self._plain_interval = plain_interval

    def start(self) -> None:
        super().start()
        if not self.disable and not self.console.is_terminal and self._plain is None:
            self._plain = _PlainLines(self, self._plain_interval)
            self._plain.start()

    def stop(self) -> None:
        super().stop()
        if self._plain is not None:
            self._plain.stop()
            self._plain = None


def make_progress(*columns: str | ProgressColumn, disable: bool = False,
                  plain_interval: float = PLAIN_INTERVAL_S) -> Progress:
    """The progress display on stderr (stdout stays clean for tables); ``disable`` hides it (tests, ``-q``).

    ``columns`` replace the default ones (description, bar, n/total, elapsed), e.g. the engine's MB/s.
    """
    cols = columns or (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn())
    return _Progress(*cols, console=console, transient=False, disable=disable, plain_interval=plain_interval)


def progress_over(items: Sequence[T], desc: str, *, show_progress: bool = True) -> Iterator[T]:
    """Each of ``items`` in turn, under one progress task ``desc`` and the default torch thread policy: the
    loop every study runs over its zoos or grid cells."""
    with make_progress(disable=not show_progress) as bar, torch_threads():
        task = bar.add_task(desc, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


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
def fixed_threads(n: int) -> Iterator[int]:
    """Exactly ``n`` intra-op torch threads (results of reductions can depend on it), restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)


@contextmanager
def torch_threads(n: int | None = None) -> Iterator[int]:
    """``n`` threads (default :func:`default_threads`), at most one per available core."""
    with fixed_threads(max(1, min(n or default_threads(), available_cores()))) as used:
        yield used


def prepare_output(out: Path | str, overwrite: bool = False) -> Path:
    """Create ``out``; refuse (:class:`OutputExistsError`) a file, or a non-empty folder unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is a file, not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} exists and is not empty; choose another output folder or pass "
                                "--overwrite (overwrite=True) to write into it")
    out.mkdir(parents=True, exist_ok=True)
    return out
