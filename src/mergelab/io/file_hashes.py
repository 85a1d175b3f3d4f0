"""Digests of input files for the merge record, remembered between runs, computed on background threads.

Two algorithms, both cryptographic: ``blake3`` (the default) and ``sha256`` (what the Hugging Face Hub shows
as a file's LFS ``oid``, for records to compare with it). Hashing runs on cores the merge needs: per GiB of page
cache, one thread, 2026-12-05 (this 2-core AMD EPYC with SHA-NI and AVX-512): sha256 0.51 s, blake3 0.13 s
(xxh3-128 0.034 s, not kept: not collision resistant, and a record's digests should not be forgeable). The CLI
starts the digests before it imports torch (merge/inputs.py), so that they run beside the import, and two
threads hash two files at once (both libraries let go of the GIL while they hash a block).

A file's digest is kept in a small JSON entry per algorithm, keyed by its resolved path and reused while the
file's size, mtime_ns, ctime_ns, inode and device are all unchanged (ctime moves on any write or ``touch``, and
no tool can set it back). Each merge record says which algorithm, which digests were computed and which came
from the cache. ``$MERGELAB_HASH_CACHE`` chooses the folder (default ``~/.cache/mergelab/digests``; ``off``:
always compute).
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
from typing import Any, Literal, cast, get_args

ENV_VAR = "MERGELAB_HASH_CACHE"
# one reused buffer per file: 3.63 s for 5.95 GB where read() of a fresh 16 MiB block took 4.19 s (one thread)
_READ_BLOCK = 1 << 22
HASH_THREADS = 2  # two files at once: 2.09 s against 4.01 s wall for 5.95 GB (sha256) on this machine's 2 cores

DigestAlgorithm = Literal["blake3", "sha256"]
DIGEST_ALGORITHMS: tuple[DigestAlgorithm, ...] = get_args(DigestAlgorithm)
DEFAULT_DIGEST: DigestAlgorithm = "blake3"


def digest_algorithm(name: str) -> DigestAlgorithm:
    """``name`` as a digest algorithm; ValueError naming the choices where it is none."""
    if name not in DIGEST_ALGORITHMS:
        raise ValueError(f"unknown digest algorithm {name!r}: choose one of {', '.join(DIGEST_ALGORITHMS)}")
    return cast("DigestAlgorithm", name)


def _hasher(algorithm: DigestAlgorithm) -> Any:
    """A fresh hash object with ``update`` and ``hexdigest``."""
    if digest_algorithm(algorithm) == "sha256":
        return hashlib.sha256()
    import blake3  # one thread per file: the pool already hashes two files at once

    return blake3.blake3()


class DigestAbandoned(Exception):
    """A digest stopped because nobody wants it any more (the merge failed or was interrupted)."""


def file_digest(path: Path, algorithm: DigestAlgorithm = DEFAULT_DIGEST, stop: threading.Event | None = None) -> str:
    """The hex digest of ``path``; raises :class:`DigestAbandoned` soon after ``stop`` is set."""
    h = _hasher(algorithm)
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
            h.update(view[:n])  # hashlib and blake3 let go of the GIL for blocks this long
    return str(h.hexdigest())


def hash_cache_dir() -> Path | None:
    """Where digests are remembered, or None when ``$MERGELAB_HASH_CACHE`` is ``off``."""
    root = os.environ.get(ENV_VAR)
    if root is not None and root.strip().lower() in ("off", "0", "no", "false", ""):
        return None
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mergelab" / "digests"


def _identity(path: Path) -> dict[str, int | str]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "inode": st.st_ino, "device": st.st_dev}


def cached_digest(path: Path, algorithm: DigestAlgorithm = DEFAULT_DIGEST, cache: Path | None = None,
                  stop: threading.Event | None = None) -> tuple[str, bool]:
    """The hex digest of ``path`` and whether it came from the cache (``cache``: the folder; default
    :func:`hash_cache_dir`). A cache that cannot be read or written is ignored, never an error.
    ``stop``: as for :func:`file_digest`."""
    folder = cache if cache is not None else hash_cache_dir()
    if folder is None:
        return file_digest(path, algorithm, stop), False
    identity = _identity(path)
    name = hashlib.sha256(f"{algorithm}:{identity['path']}".encode()).hexdigest()[:32]
    entry = folder / f"{name}.json"
    try:
        known = json.loads(entry.read_text())
        if isinstance(known, dict) and {k: known.get(k) for k in identity} == identity:
            digest = known.get(algorithm)
            if isinstance(digest, str) and len(digest) == 64:  # both are 256-bit digests
                return digest, True
    except (OSError, ValueError):
        pass
    digest = file_digest(path, algorithm, stop)
    if _identity(path) != identity:  # written to while being hashed: remember nothing
        return digest, False
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({**identity, algorithm: digest}, f)
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

    def acquire(self, path: Path, cache: Path | None = None,
                algorithm: DigestAlgorithm = DEFAULT_DIGEST) -> Future[tuple[str, bool]]:
        """(digest, from the cache) of ``path`` as :func:`cached_digest` gives them, computed in the background;
        every call must be paired with :meth:`release` of the future it returns."""
        key: tuple[object, ...] = (*_identity(path).values(), str(cache), algorithm)
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and not job.future.cancelled():
                job.holders += 1
                return job.future
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="mergelab-hash")
            stop = threading.Event()
            job = _Job(self._executor.submit(cached_digest, path, algorithm, cache, stop), stop)
            self._jobs[key] = job
            return job.future

    def drain(self) -> None:
        """Wait for the running jobs (a released one stops within one read block) and let the threads go; a
        later :meth:`acquire` starts new ones. For a process about to end without its interpreter's teardown,
        which would otherwise cut a digest's cache entry short (a stray temporary file in the cache)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

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
