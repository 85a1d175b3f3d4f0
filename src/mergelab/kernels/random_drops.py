"""DELLA's random drop with its per-entry rescale in one compiled pass, or None where the torch formula must run.

Each entry is kept with its own probability ``p`` (a coin ``u < p``) and divided by it: torch takes a
comparison, a mask, a fill and a division, four passes over the tensor (2 × 16 ms per 2752 × 1024 bfloat16
task vector of the 3 × 0.5 GB benchmark models, one thread, 2026-12-03); the loop reads each entry once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mergelab.kernels.dispatch import as_array, eligible, loops, probe, same_bits, verified

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
