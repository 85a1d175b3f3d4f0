"""DELLA's random drop with its per-entry rescale in one compiled pass, or None where the torch formula must run.

Each entry is kept with its own probability ``p`` (a coin ``u < p``) and divided by it: torch takes a
comparison, a mask, a fill and a division, four passes over the tensor (2 × 16 ms per 2752 × 1024 bfloat16
task vector of the 3 × 0.5 GB benchmark models, one thread, 2026-12-03); the loop reads each entry once.
:func:`dropped_consensus` also merges the dropped task vectors in the same pass (sign election, disjoint
mean or sum, the base added), where the drop wrote each one out for the merge to read back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from mergelab.kernels.dispatch import as_array, eligible, loops, probe, same_bits, verified
from mergelab.kernels.masked import ELECTIONS

DropFormula = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``formula(delta, probabilities, draws)``: ``delta`` (modified in place and returned) divided by
``probabilities`` where ``draws < probabilities``, else 0."""


def rescaled_drop(delta: torch.Tensor, probabilities: torch.Tensor, draws: torch.Tensor,
                  formula: DropFormula) -> torch.Tensor | None:
    """``formula(delta, probabilities, draws)`` as a new tensor (``delta`` is left as it is) in one pass; None
    where the loop does not apply: not loaded, ``delta`` and ``probabilities`` not of one dtype the loops know,
    ``draws`` not float32 on the CPU, or a result NaN (whose bits the formula decides)."""
    module = loops()
    if (module is None or not eligible([delta, probabilities]) or draws.dtype != torch.float32
            or draws.shape != delta.shape or not draws.is_contiguous() or draws.device.type != "cpu"):
        return None

    def run(d: torch.Tensor, p: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, int]:
        out = torch.empty_like(d)
        nans = module.rescaled_drop_loop(as_array(d), as_array(p), u.reshape(-1).numpy(), as_array(out, writable=True))
        return out, int(nans)

    def check() -> bool:
        _, (d, p) = probe(delta.dtype, 2)
        p = p.abs().clamp(1e-3, 1).nan_to_num(0.5).to(delta.dtype)  # keep probabilities: positive
        u = torch.rand(d.shape, generator=torch.Generator().manual_seed(3))
        u[::7] = p[::7].float()  # a coin equal to its probability: dropped
        d = d.nan_to_num(0.0)
        fused, nans = run(d, p, u)
        return nans == 0 and same_bits(fused, formula(d.clone(), p, u))

    if not verified("rescaled drop", delta.dtype, check):
        return None
    out, nans = run(delta, probabilities, draws)
    return None if nans else out


DroppedFormula = Callable[..., torch.Tensor]
"""``formula(base, deltas, probabilities, draws, weights, consensus, normalize, lambda_, arithmetic)``: each
delta dropped and rescaled by its coins, then merged onto ``base`` (DELLA's two steps, in torch)."""


class DroppedMerge(NamedTuple):
    """:func:`dropped_consensus`' merged tensor, and whether its pass found every entry of every task vector
    finite (dropped ones included): then every entry of the inputs they were computed from is finite too."""

    merged: torch.Tensor
    deltas_finite: bool


def dropped_consensus_applies(base: torch.Tensor, arithmetic: torch.dtype) -> bool:
    """Whether :func:`dropped_consensus` may run for a tensor like ``base`` merged in ``arithmetic`` (the caller
    then keeps every model's coins until the merge instead of dropping one model at a time)."""
    return loops() is not None and eligible([base]) and arithmetic in (torch.float32, base.dtype) and (
        arithmetic in (torch.float32, torch.bfloat16))


def dropped_consensus(base: torch.Tensor, deltas: Sequence[torch.Tensor], probabilities: Sequence[torch.Tensor],
                      draws: Sequence[torch.Tensor], weights: Sequence[float], consensus: str | None,
                      normalize: bool, lambda_: float, arithmetic: torch.dtype,
                      formula: DroppedFormula) -> DroppedMerge | None:
    """``formula(...)`` in one compiled pass: model ``i``'s task vector ``deltas[i]`` (in ``arithmetic``) kept
    where ``draws[i] < probabilities[i]`` and divided by that probability, then merged onto ``base`` by sign
    election (``consensus`` "sum" or "count") or summed (None), divided by the agreeing (or all) weights with
    ``normalize``, times ``lambda_``; ``weights`` already ``arithmetic`` numbers; with whether every delta entry
    is finite. None where the loop does not apply or a result is NaN (whose bits the formula decides)."""
    module = loops() if deltas else None
    if module is None or not dropped_consensus_applies(base, arithmetic) or not eligible([*deltas, *probabilities]):
        return None
    if deltas[0].dtype != arithmetic or deltas[0].shape != base.shape or any(
            u.dtype != torch.float32 or u.shape != base.shape or not u.is_contiguous() or u.device.type != "cpu"
            for u in draws):
        return None
    dtype = base.dtype
    like = np.uint16(0) if arithmetic == torch.bfloat16 else np.float32(0)

    def run(b: torch.Tensor, ds: Sequence[torch.Tensor], ps: Sequence[torch.Tensor], us: Sequence[torch.Tensor],
            ws: Sequence[float], election: str | None, norm: bool, lam: float) -> tuple[torch.Tensor, int, bool]:
        out = torch.empty(b.shape, dtype=dtype)
        divisor = float(torch.tensor(math.fsum(ws), dtype=arithmetic))  # as generalized_task_arithmetic rounds it
        nans, finite = module.dropped_consensus_loop(
            as_array(b), tuple(as_array(d) for d in ds), tuple(as_array(p) for p in ps),
            tuple(u.reshape(-1).numpy() for u in us), np.asarray(ws, np.float32), ELECTIONS[election], norm,
            np.float32(divisor), np.float32(lam), like, as_array(out, writable=True))
        return out, int(nans), bool(finite)

    def check() -> bool:
        big = torch.finfo(dtype).max
        b, xs = probe(dtype, 3)
        b = b.nan_to_num(0.0, big, -big)
        ds = [x.nan_to_num(0.0, big, -big).to(arithmetic) for x in xs]
        generator = torch.Generator().manual_seed(3)
        ps = [torch.rand(b.shape, generator=generator).clamp(0.05, 1).to(arithmetic) for _ in ds]
        us = [torch.rand(b.shape, generator=generator) for _ in ds]
        for p, u in zip(ps, us, strict=True):
            u[::7] = p[::7].float()  # a coin equal to its probability: dropped
        ws = [float(torch.tensor(w, dtype=arithmetic)) for w in (0.5, 0.75, -0.3)]
        cases = [("sum", True, 1.0), ("count", False, 0.7), (None, False, 1.0), (None, True, 1.0), ("sum", True, 1.3),
                 ("sum", False, -1.0)]
        for election, norm, lam in cases:
            fused, _, finite = run(b, ds, ps, us, ws, election, norm, lam)
            expected = formula(b, [d.clone() for d in ds], ps, us, ws, election, norm, lam, arithmetic)
            if not same_bits(fused, expected) or not finite:
                return False
        # a NaN and an Inf where every coin drops them: gone from the result, told by the flag
        dropped = [d.clone() for d in ds]
        dropped[0][0], dropped[-1][-1] = float("nan"), float("inf")
        never = [torch.ones_like(u) for u in us]  # a coin of 1 is never below a probability
        fused, nans, finite = run(b, dropped, ps, never, ws, "sum", True, 1.0)
        return nans == 0 and not finite and bool(torch.isfinite(fused).all())

    if not verified(f"dropped consensus in {arithmetic}", dtype, check):
        return None
    merged, nans, finite = run(base, deltas, probabilities, draws, weights, consensus, normalize, lambda_)
    return None if nans else DroppedMerge(merged, finite)
