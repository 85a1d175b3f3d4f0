"""Loading the compiled loops, checking them against torch, and handing tensors to them.

Loading costs ~0.5 CPU s once per process (2026-12-02: numba's import, then its first cache load imports
numba's numpy support, which imports scipy.linalg to look for BLAS), as much as eager torch spends on a 1 GB
linear merge. So nothing loads them implicitly: :func:`warm_up` loads them (tests, benchmarks, a caller about
to merge much), and the engine calls :func:`warm_up_in_background` ahead of a large merge, on a thread of its
own; until they are loaded every call runs the torch formula, which gives the same bits.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch

from mergelab.imports import collector_paused

# bfloat16 travels as its uint16 bit pattern (numpy has no bfloat16)
_NUMPY_VIEW: dict[torch.dtype, tuple[torch.dtype | None, type[np.generic]]] = {
    torch.bfloat16: (torch.int16, np.uint16), torch.float32: (None, np.float32)}

log = logging.getLogger(__name__)


class _Check(NamedTuple):
    thread: int  # the thread running it
    done: threading.Event


_lock = threading.Lock()  # guards _verdicts, _checking and _warming; never held while numba loads or a check runs
_load_lock = threading.Lock()
_loaded: list[ModuleType | None] = []  # empty until loaded; then [the module] or [None] (off, or no numba)
_verdicts: dict[tuple[str, torch.dtype | None], bool] = {}
_checking: dict[tuple[str, torch.dtype | None], _Check] = {}  # the checks running now
_warming: list[threading.Thread] = []


def _memory_limited() -> bool:
    """Whether this process runs under a finite address-space or data limit (``ulimit -v``/``-d``)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return False
    limits = [resource.getrlimit(r)[0] for r in (resource.RLIMIT_AS, resource.RLIMIT_DATA)]
    return any(limit != resource.RLIM_INFINITY for limit in limits)


def _load() -> ModuleType | None:
    with _load_lock:
        if not _loaded:
            module = None
            # Not under a memory limit: numba's first cache load imports scipy.linalg, whose OpenBLAS spins
            # forever in mmap when its thread buffers do not fit (a merge under RLIMIT_DATA 512 MiB hung there,
            # tests/test_memory_bound.py, 2026-12-02); such a merge runs the torch formulas, same bytes.
            if os.environ.get("MERGELAB_KERNELS", "1") != "0" and not _memory_limited():
                try:
                    with collector_paused():
                        from mergelab.kernels import _loops as module
                        module.load_cached()
                except Exception as exc:  # numba absent, or unable to compile or cache here
                    log.debug("compiled loops not loaded (%s: %s); the torch formulas run", type(exc).__name__, exc)
                    module = None
            _loaded.append(module)
    return _loaded[0]


def warm_up() -> bool:
    """Load the loops now (or wait for the background load); whether they are in use."""
    with _lock:
        thread = _warming[0] if _warming else None
    if thread is not None:
        thread.join()
    return _load() is not None


def warm_up_in_background() -> None:
    """Load the loops on a thread of their own (once per process); until then calls run the torch formulas."""
    with _lock:
        if _loaded or _warming:
            return
        thread = threading.Thread(target=_load, name="mergelab-kernels")
        _warming.append(thread)
    thread.start()


def loops() -> ModuleType | None:
    """The loops' module once loaded; None before, or where kernels are off or numba is missing."""
    return _loaded[0] if _loaded else None


def verified(name: str, dtype: torch.dtype | None, check: Callable[[], bool]) -> bool:
    """Whether loop ``name`` gives torch's bits for ``dtype`` (None: for every dtype it takes): ``check()``,
    run once per process. A thread that needs a verdict another thread is finding waits for it: both merge
    threads of a Model Stock merge met its loop at once and each ran the 23-29 ms check (3 x 0.5 GB,
    2026-12-04), CPU that the merge, bound by its 2 cores, had to find elsewhere."""
    key = (name, dtype)
    while True:
        with _lock:
            known = _verdicts.get(key)
            if known is not None:
                return known
            running = _checking.get(key)
            if running is None:
                running = _checking[key] = _Check(threading.get_ident(), threading.Event())
                break
        if running.thread == threading.get_ident():  # a check that needs its own loop cannot vouch for it
            return False
        running.done.wait()  # found, or its thread was interrupted: then this one checks
    # run without the lock: a check may use another loop, which checks itself first (the masked loop's probe
    # rules come from the sort replay)
    verdict: bool | None = None
    try:
        try:
            verdict = bool(check())
        except Exception:  # a loop that cannot run on the probe is not used (tests assert every verdict)
            verdict = False
    finally:
        with _lock:
            if verdict is not None:
                _verdicts[key] = verdict
            del _checking[key]
        running.done.set()
    assert verdict is not None  # else check() raised past the finally
    return verdict


def verdicts() -> dict[tuple[str, torch.dtype | None], bool]:
    """The loops checked in this process and whether each is used (for tests and benchmarks)."""
    with _lock:
        return dict(_verdicts)


def eligible(tensors: Sequence[torch.Tensor]) -> bool:
    """Same shape, same dtype the loops know, contiguous plain CPU tensors that numpy may view."""
    first = tensors[0]
    return first.dtype in _NUMPY_VIEW and all(
        t.dtype == first.dtype and t.shape == first.shape and viewable(t) for t in tensors)


def viewable(t: torch.Tensor) -> bool:
    """Whether ``t`` is a non-empty, contiguous, plain CPU tensor whose memory numpy may view, whatever its dtype."""
    return (t.numel() > 0 and t.device.type == "cpu" and t.layout == torch.strided and t.is_contiguous()
            and not t.requires_grad and type(t) is torch.Tensor)


def as_array(t: torch.Tensor, *, writable: bool = False) -> np.ndarray:
    """``t``'s memory as a flat numpy array, no copy. Inputs are marked read-only, all alike: a numba tuple
    indexed by a variable needs arrays of one type."""
    as_int, np_dtype = _NUMPY_VIEW[t.dtype]
    flat = t.reshape(-1)
    array = (flat.view(as_int) if as_int is not None else flat).numpy().view(np_dtype)
    if not writable:
        array.setflags(write=False)
    return array


def probe(dtype: torch.dtype, count: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``count`` inputs that tell roundings apart: 4096 random entries each (with weights like
    0.3, 0.45, 0.7, a fused and an unfused multiply-add differ on ~1 % of them), then ±Inf, ±0, subnormals,
    values near the dtype's largest (sums that overflow) and NaN, rolled so that they meet."""
    generator = torch.Generator().manual_seed(0)
    big = torch.finfo(dtype).max
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-40, big, -big,
                            big / 2, 3e-39, 1.0], dtype=torch.float32)

    def one(k: int) -> torch.Tensor:
        values = torch.randn(4096, generator=generator) * (0.02 if k % 2 else 1.5)
        return torch.cat([values, special.roll(k)]).to(dtype)

    return one(count), [one(k) for k in range(count)]


def same_bits(fused: torch.Tensor, formula: torch.Tensor) -> bool:
    """Every bit equal, except that a NaN may be any NaN (the loops leave NaN results to the formulas)."""
    if fused.dtype != formula.dtype or fused.shape != formula.shape:
        return False
    as_int = _NUMPY_VIEW[fused.dtype][0] or torch.int32
    nan = formula.isnan()
    return torch.equal(fused.isnan(), nan) and torch.equal(fused.view(as_int)[~nan], formula.view(as_int)[~nan])
