"""Weighted sums (linear, task arithmetic) in one compiled pass, or None where the torch formula must run.

Each function takes the arguments of the torch formula it replaces and the formula itself: on first use per
dtype both run on :func:`~mergelab.kernels.dispatch.probe` inputs, and the loop is used only if every bit
agrees. A result with a NaN is left to the formula (see ``_loops``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from mergelab.kernels.dispatch import as_array, eligible, loops, probe, same_bits, verified

LinearFormula = Callable[[Sequence[torch.Tensor], Sequence[float], bool], torch.Tensor]
TaskArithmeticFormula = Callable[[torch.Tensor, Sequence[torch.Tensor], Sequence[float], "float | None", float],
                                 torch.Tensor]


def linear_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool,
               formula: LinearFormula) -> torch.Tensor | None:
    """``formula(tensors, weights, normalize)``: ``Σ w_i x_i`` accumulated in float32 by fused multiply-adds,
    ``/ Σ w_i`` when ``normalize``, in the inputs' dtype; or None where the loop does not apply."""
    module = loops() if tensors else None
    if module is None or not eligible(tensors):
        return None
    dtype = tensors[0].dtype

    def run(xs: Sequence[torch.Tensor], ws: Sequence[float], norm: bool) -> tuple[torch.Tensor, int]:
        out = torch.empty(xs[0].shape, dtype=dtype)
        nans = module.linear_loop(tuple(as_array(x) for x in xs), np.asarray(ws, np.float32),
                                  np.float32(float(sum(ws)) if norm else 1.0), as_array(out, writable=True))
        return out, nans

    def check() -> bool:
        _, xs = probe(dtype, 3)
        return all(same_bits(run(xs, ws, norm)[0], formula(xs, ws, norm))
                   for ws, norm in (([0.3, 0.45, 0.7], True), ([1 / 3] * 3, True), ([0.7, -1.3, 2.1], False)))

    if not verified("linear", dtype, check):
        return None
    out, nans = run(tensors, weights, normalize)
    return None if nans else out


def task_arithmetic_sum(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                        divisor: float | None, lambda_: float, arithmetic: torch.dtype,
                        formula: TaskArithmeticFormula) -> torch.Tensor | None:
    """``formula(base, tensors, weights, divisor, lambda_)``: ``b + λ Σ_i w_i (x_i − b)`` (``/ divisor``
    before ``λ``) with every step rounded to ``arithmetic`` (float32; or bfloat16 for bfloat16 inputs, the
    sum over models in float32), in the base's dtype; or None where the loop does not apply. ``weights`` and
    ``divisor`` are ``arithmetic`` numbers already (the formula's rounding)."""
    module = loops() if tensors else None
    if module is None or not eligible([base, *tensors]):
        return None
    dtype = base.dtype
    if arithmetic not in (torch.float32, dtype):
        return None
    like = np.uint16(0) if arithmetic == torch.bfloat16 else np.float32(0)  # the loop's rounding of each step

    def run(b: torch.Tensor, xs: Sequence[torch.Tensor], ws: Sequence[float], div: float | None,
            lam: float) -> tuple[torch.Tensor, int]:
        out = torch.empty(b.shape, dtype=dtype)
        nans = module.task_arithmetic_loop(
            as_array(b), tuple(as_array(x) for x in xs), np.asarray(ws, np.float32),
            np.float32(div if div is not None else 1.0), np.float32(lam), like, as_array(out, writable=True))
        return out, nans

    def check() -> bool:
        b, xs = probe(dtype, 3)
        cases: list[tuple[list[float], float | None, float]] = [
            ([0.3, 0.45, 0.7], None, 1.0), ([0.3, 0.45, 0.7], 1.45, 0.7), ([1.0, -0.5, 2.0], 2.5, 1.0)]
        return all(same_bits(run(b, xs, ws, div, lam)[0], formula(b, xs, ws, div, lam)) for ws, div, lam in cases)

    if not verified(f"task_arithmetic in {arithmetic}", dtype, check):
        return None
    out, nans = run(base, tensors, weights, divisor, lambda_)
    return None if nans else out


InterpolationFormula = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ModelStockFormula = Callable[[torch.Tensor, Sequence[torch.Tensor], torch.Tensor], torch.Tensor]


def interpolation_sum(a: torch.Tensor, b: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor,
                      formula: InterpolationFormula) -> torch.Tensor | None:
    """``formula(a, b, ca, cb)``: ``ca · a + cb · b`` in float32 (``ca``, ``cb``: float32 scalars), in
    ``a``'s dtype; or None where the loop does not apply."""
    module = loops()
    if module is None or ca.dtype != torch.float32 or not eligible([a, b]):
        return None
    dtype = a.dtype

    def run(x: torch.Tensor, y: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> tuple[torch.Tensor, int]:
        out = torch.empty(x.shape, dtype=dtype)
        nans = module.interpolation_loop(as_array(x), as_array(y), np.float32(float(cx)), np.float32(float(cy)),
                                         as_array(out, writable=True))
        return out, nans

    def check() -> bool:
        _, (x, y) = probe(dtype, 2)
        cases = [(0.8090169943749475, 0.30901699437494745), (0.6, 0.4), (1.7, -0.35)]
        return all(same_bits(run(x, y, *cs)[0], formula(x, y, *cs))
                   for cs in [tuple(torch.tensor([[c]], dtype=torch.float32) for c in pair) for pair in cases])

    if not verified("interpolation", dtype, check):
        return None
    out, nans = run(a, b, ca, cb)
    return None if nans else out


def model_stock_sum(base: torch.Tensor, tensors: Sequence[torch.Tensor], ratio: torch.Tensor,
                    formula: ModelStockFormula) -> torch.Tensor | None:
    """``formula(base, tensors, ratio)``: ``t · mean(x_i) + (1 − t) · base`` with every step rounded to
    ``ratio``'s dtype (float32, or bfloat16 for bfloat16 inputs), in the base's dtype; or None where the loop
    does not apply."""
    module = loops() if tensors else None
    if module is None or ratio.numel() != 1 or not eligible([base, *tensors]):
        return None
    dtype, arithmetic = base.dtype, ratio.dtype
    if arithmetic not in (torch.float32, dtype):
        return None
    like = np.uint16(0) if arithmetic == torch.bfloat16 else np.float32(0)

    def run(b: torch.Tensor, xs: Sequence[torch.Tensor], t: torch.Tensor) -> tuple[torch.Tensor, int]:
        out = torch.empty(b.shape, dtype=dtype)
        nans = module.model_stock_loop(as_array(b), tuple(as_array(x) for x in xs), np.float32(float(t)),
                                       np.float32(float(1 - t)), np.float32(len(xs)), like,
                                       as_array(out, writable=True))
        return out, nans

    def check() -> bool:
        b, xs = probe(dtype, 3)
        return all(same_bits(run(b, xs[:k], t)[0], formula(b, xs[:k], t)) for k in (2, 3)
                   for t in (torch.tensor([v], dtype=arithmetic) for v in (0.37, 0.9, -0.2, 1.3)))

    if not verified(f"model_stock in {arithmetic}", dtype, check):
        return None
    out, nans = run(base, tensors, ratio)
    return None if nans else out
