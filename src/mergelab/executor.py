"""Run independent jobs (study grid cells, search candidates) in worker processes or on a Ray cluster.

Both executors call ``fn(job)`` for every job and return the results in job order, whatever order they
finish in. Every job runs under the same conditions — ``threads_per_job`` torch threads, a fresh process
state from ``spawn`` — so a job's result does not depend on which executor ran it: a study's table is the
same with ``--executor local`` and ``--executor ray``. Jobs and results must be picklable and ``fn`` must be
importable by name on the workers (a module-level function of an installed package).

Pointing Ray at a real cluster: ``executor="ray"`` calls ``ray.init()`` with the address from the
``RAY_ADDRESS`` environment variable when it is set (Ray's own convention, e.g.
``RAY_ADDRESS=ray://head-node:10001``), or ``executor="ray:ray://head-node:10001"`` names it explicitly;
with neither, a local Ray instance is started for the run and stopped afterwards. Every node needs
mergelab installed (same version) and the data the jobs read; an already initialised Ray session (e.g.
started by a notebook or a test) is used as it is and left running.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from types import TracebackType
from typing import Any, Protocol, TypeVar

from mergelab.runtime import available_cores, fixed_threads, make_progress

J = TypeVar("J")
R = TypeVar("R")

def run_job(fn: Callable[[J], R], job: J, threads: int) -> R:
    """Run one job with a fixed number of torch threads (results of reductions can depend on it)."""
    with fixed_threads(threads):
        return fn(job)


class Executor(Protocol):
    name: str

    def map(self, fn: Callable[[J], R], jobs: Sequence[J], *, desc: str = "jobs") -> list[R]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: object) -> None: ...


class _Base:
    name = "base"

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        pass


class LocalExecutor(_Base):
    """A pool of ``spawn``-ed worker processes on this machine, kept for the executor's lifetime.

    ``max_workers=0`` runs the jobs in this process, one after the other (debugging, profiling).
    ``spawn`` rather than ``fork``: forking a process whose torch has already started its thread pools can
    deadlock, and spawned workers start from the same clean state as Ray's.
    """

    name = "local"

    def __init__(self, max_workers: int | None = None, *, threads_per_job: int = 1, show_progress: bool = True
                 ) -> None:
        self.max_workers = available_cores() if max_workers is None else max_workers
        self.threads = threads_per_job
        self.show_progress = show_progress
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.max_workers, mp_context=mp.get_context("spawn"))
        return self._pool

    def map(self, fn: Callable[[J], R], jobs: Sequence[J], *, desc: str = "jobs") -> list[R]:
        results: list[Any] = [None] * len(jobs)
        with make_progress(disable=not self.show_progress) as bar:
            task = bar.add_task(f"{desc} (local ×{max(1, self.max_workers)})", total=len(jobs))
            if self.max_workers == 0:
                for i, job in enumerate(jobs):
                    results[i] = run_job(fn, job, self.threads)
                    bar.advance(task)
                return results
            pool = self._get_pool()
            index: dict[Future[Any], int] = {pool.submit(run_job, fn, job, self.threads): i
                                             for i, job in enumerate(jobs)}
            pending = set(index)
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        results[index[fut]] = fut.result()  # re-raises a job's exception here
                        bar.advance(task)
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor(_Base):
    """Jobs as Ray tasks (one CPU each). ``address``: None (``RAY_ADDRESS`` or a local instance), "auto",
    "local" or "ray://host:port". Ray is imported only here: it is an optional extra."""

    name = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, threads_per_job: int = 1,
                 show_progress: bool = True, init_kwargs: dict[str, Any] | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ImportError("--executor ray needs Ray: pip install 'mergelab[ray]' (or pip install 'ray[default]')"
                              ) from None
        self._ray = ray
        self.threads = threads_per_job
        self.show_progress = show_progress
        self._owns = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, **(init_kwargs or {})}
            addr = address if address is not None else os.environ.get("RAY_ADDRESS")
            if addr in (None, "", "local"):
                # a private single-machine cluster: bound to loopback, nothing listens on other interfaces
                kwargs.setdefault("_node_ip_address", "127.0.0.1")
                ray.init(address="local", num_cpus=num_cpus or available_cores(), **kwargs)
            else:
                ray.init(address=addr, **kwargs)
            self._owns = True
        self._remote = ray.remote(num_cpus=1)(run_job)

    def map(self, fn: Callable[[J], R], jobs: Sequence[J], *, desc: str = "jobs") -> list[R]:
        ray = self._ray
        refs = [self._remote.remote(fn, job, self.threads) for job in jobs]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(jobs)
        with make_progress(disable=not self.show_progress) as bar:
            task = bar.add_task(f"{desc} (ray)", total=len(jobs))
            pending = list(refs)
            try:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    for ref in done:
                        results[index[ref]] = ray.get(ref)
                        bar.advance(task)
            except BaseException:
                for ref in pending:
                    ray.cancel(ref)
                raise
        return results

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns = False


def get_executor(spec: str = "local", *, max_workers: int | None = None, threads_per_job: int = 1,
                 show_progress: bool = True) -> LocalExecutor | RayExecutor:
    """``local``, ``local:N`` (N worker processes; 0 = in this process), ``ray`` or ``ray:ADDRESS``."""
    kind, _, arg = spec.partition(":")
    if kind == "local":
        workers = int(arg) if arg else max_workers
        return LocalExecutor(workers, threads_per_job=threads_per_job, show_progress=show_progress)
    if kind == "ray":
        return RayExecutor(arg or None, threads_per_job=threads_per_job, show_progress=show_progress)
    raise ValueError(f"unknown executor '{spec}'; choose local, local:N, ray or ray:ADDRESS")
