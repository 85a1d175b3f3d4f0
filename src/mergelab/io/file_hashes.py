"""sha256 of input files for the merge record, remembered between runs, computed on background threads.

Hashing costs about 0.6 s of CPU per GB (SHA-NI; 3.63 s for 5.95 GB of page cache on one thread), on cores
the merge needs: the CLI starts the digests before it imports torch (merge/inputs.py), so that they run beside
the import, and two threads hash two files at once (2.09 s wall for the same 5.95 GB).

A file's digest is kept in a small JSON entry keyed by its resolved path and reused while the file's size,
mtime_ns, ctime_ns, inode and device are all unchanged (ctime moves on any write or ``touch``, and no tool
can set it back). Each merge record says which digests were computed and which came from the cache.
``$MERGELAB_HASH_CACHE`` chooses the folder (default ``~/.cache/mergelab/sha256``; ``off``: always compute).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ENV_VAR = "MERGELAB_HASH_CACHE"
# one reused buffer per file: 3.63 s for 5.95 GB where read() of a fresh 16 MiB block took 4.19 s (one thread)
_READ_BLOCK = 1 << 22
HASH_THREADS = 2  # two files at once: 2.09 s against 4.01 s wall for 5.95 GB on this machine's 2 cores


class DigestAbandoned(Exception):
    """A digest stopped because nobody wants it any more (the merge failed or was interrupted)."""


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    """The sha256 hex digest of ``path``; raises :class:`DigestAbandoned` soon after ``stop`` is set."""
    h = hashlib.sha256()
    buf = bytearray(_READ_BLOCK)
    view = memoryview(buf)
    # opened without blocking (a FIFO's open waits for a writer, which would hold the process at exit) and
    # hashed only if it is a regular file
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path}: not a regular file")
    with open(fd, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if stop is not None and stop.is_set():
                raise DigestAbandoned(str(path))
            h.update(view[:n])  # hashlib lets go of the GIL for blocks this long
    return h.hexdigest()


def hash_cache_dir() -> Path | None:
    """Where digests are remembered, or None when ``$MERGELAB_HASH_CACHE`` is ``off``."""
    root = os.environ.get(ENV_VAR)
    if root is not None and root.strip().lower() in ("off", "0", "no", "false", ""):
        return None
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mergelab" / "sha256"


def _identity(path: Path) -> dict[str, int | str]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "inode": st.st_ino, "device": st.st_dev}


def cached_sha256(path: Path, cache: Path | None = None, stop: threading.Event | None = None) -> tuple[str, bool]:
    """The sha256 hex digest of ``path`` and whether it came from the cache (``cache``: the folder;
    default :func:`hash_cache_dir`). A cache that cannot be read or written is ignored, never an error.
    ``stop``: as for :func:`sha256_file`."""
    folder = cache if cache is not None else hash_cache_dir()
    if folder is None:
        return sha256_file(path, stop), False
    identity = _identity(path)
    entry = folder / (hashlib.sha256(str(identity["path"]).encode()).hexdigest()[:32] + ".json")
    try:
        known = json.loads(entry.read_text())
        if isinstance(known, dict) and {k: known.get(k) for k in identity} == identity:
            digest = known.get("sha256")
            if isinstance(digest, str) and len(digest) == 64:
                return digest, True
    except (OSError, ValueError):
        pass
    digest = sha256_file(path, stop)
    if _identity(path) != identity:  # written to while being hashed: remember nothing
        return digest, False
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({**identity, "sha256": digest}, f)
        os.replace(tmp, entry)  # atomic: a concurrent merge reads the old entry or the new one
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return digest, False


class _Job:
    def __init__(self, future: Future[tuple[str, bool]], stop: threading.Event) -> None:
        self.future, self.stop, self.holders = future, stop, 1


class DigestPool:
    """Digests of files on :data:`HASH_THREADS` background threads, one job per file for as long as someone
    holds it: the CLI asks for a merge's inputs before it imports torch, the engine asks again and gets the same
    job. A job nobody holds any more is stopped within one read block and forgotten (the next request computes
    or reads the cache again), so that a failed merge does not wait for its digests."""

    def __init__(self, threads: int = HASH_THREADS) -> None:
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: dict[tuple[object, ...], _Job] = {}
        self._lock = threading.Lock()

    def acquire(self, path: Path, cache: Path | None = None) -> Future[tuple[str, bool]]:
        """(digest, from the cache) of ``path`` as :func:`cached_sha256` gives them, computed in the background;
        every call must be paired with :meth:`release` of the future it returns."""
        key: tuple[object, ...] = (*_identity(path).values(), str(cache))
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and not job.future.cancelled():
                job.holders += 1
                return job.future
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="mergelab-hash")
            stop = threading.Event()
            job = _Job(self._executor.submit(cached_sha256, path, cache, stop), stop)
            self._jobs[key] = job
            return job.future

    def release(self, future: Future[tuple[str, bool]]) -> None:
        """Give up one hold on ``future``; the last one stops its job if it is still running."""
        with self._lock:
            for key, job in self._jobs.items():
                if job.future is future:
                    job.holders -= 1
                    if job.holders == 0:
                        job.stop.set()
                        job.future.cancel()
                        del self._jobs[key]
                    return


DIGESTS = DigestPool()
"""The process's digest pool (merge/engine.py and the CLI's early start share it)."""
