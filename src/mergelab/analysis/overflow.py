"""Floating-point overflow of scaled networks: non-finite outputs, growth degree, predicted overflow scale.

Multiplying every parameter of a ReLU network with ``L`` weight layers in series by ``c`` multiplies its
logits by about ``c^L`` (exactly, for the bias-free part: ReLU and max-pooling are positively homogeneous;
bias terms grow by lower powers). A float32 logit of magnitude ``A`` at ``c = 1`` therefore overflows
(``> 3.4e38``) near ``c* = (3.4e38 / A)^(1/L)``: ``c* ≈ 107`` for ``L = 19`` and ``A = 1``. The mean of
``N`` members' logits is computed as a sum, which is ``N`` times larger than a member's: it overflows at
``N^(-1/L)`` times a member's ``c*`` (8 % lower for ``N = 5``, ``L = 19``); a soup is one network whose
weights are no larger than its members' (the averaging bounds), so its ``c*`` is at least a member's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

#: the largest finite float32 (about 3.4028e38)
F32_MAX = float(torch.finfo(torch.float32).max)


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """Per example (row): True when any of its logits is ±inf or NaN."""
    return ~torch.isfinite(logits).all(dim=-1)


def max_finite_abs(x: torch.Tensor) -> float:
    """The largest finite |entry| (0.0 when there is none): the magnitude that is about to overflow."""
    finite = x[torch.isfinite(x)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def predicted_overflow_c(magnitude_at_1: float, degree: float, limit: float = F32_MAX) -> float:
    """The ``c`` at which ``c^degree · magnitude_at_1`` reaches ``limit`` (``inf`` for a zero magnitude)."""
    if degree <= 0:
        raise ValueError(f"degree must be positive, got {degree}")
    if magnitude_at_1 <= 0:
        return math.inf
    return math.exp((math.log(limit) - math.log(magnitude_at_1)) / degree)


def predicted_degree(weight_layers: int, bn_layers: int, after_last_bn: int, scaling: str, bn_eval: str) -> float:
    """The ``d`` in ``|logits| ∝ c^d`` when every parameter (``scaling="params"``) or every state-dict entry
    (``"state_dict"``: BN running statistics too, literally ×c) is multiplied by c, for a ReLU net with
    ``weight_layers`` convs/linears and ``bn_layers`` BatchNorms in series (``after_last_bn`` weight layers
    follow the last BN), as c → ∞:

    - no BN: every weight layer multiplies by c → ``L``;
    - running statistics kept: a BN divides by its fixed σ and multiplies by its scaled γ, so each conv → BN
      pair multiplies by c² → ``L + B``;
    - running statistics ×c (the paper): BN divides by √(c·σ²) → each pair multiplies by c^1.5 → ``L + B/2``;
    - batch statistics: each BN removes the scale of its input and multiplies by c (γ, β) → only the layers
      after the last BN grow: ``1 + F``.
    """
    if bn_layers == 0 or bn_eval == "none":
        return float(weight_layers)
    if bn_eval == "batch":
        return float(1 + after_last_bn)
    if scaling == "params":
        return float(weight_layers + bn_layers)
    if scaling == "state_dict":
        return weight_layers + bn_layers / 2
    raise ValueError(f"scaling must be 'params' or 'state_dict', got '{scaling}'")


def growth_degree(c_low: float, mag_low: float, c_high: float, mag_high: float) -> float:
    """Log-log slope of a magnitude between two scales: the ``d`` in ``magnitude ∝ c^d`` (nan if undefined)."""
    if min(c_low, c_high, mag_low, mag_high) <= 0 or c_low == c_high:
        return math.nan
    return (math.log(mag_high) - math.log(mag_low)) / (math.log(c_high) - math.log(c_low))


def crossing_c(cs: Sequence[float], magnitudes: Sequence[float], limit: float = F32_MAX) -> float:
    """The ``c`` where an (exactly computed, e.g. float64) magnitude curve first reaches ``limit``,
    interpolated log-log between grid points; extrapolated with the last two points' slope when the curve
    stays below ``limit`` on the grid; ``nan`` when it cannot be told (fewer than two positive points)."""
    pts = [(c, m) for c, m in zip(cs, magnitudes, strict=True) if c > 0 and m > 0 and math.isfinite(m)]
    if len(pts) < 2:
        return math.nan
    for (c0, m0), (c1, m1) in itertools.pairwise(pts):
        if m0 < limit <= m1:
            d = growth_degree(c0, m0, c1, m1)
            return c0 * math.exp((math.log(limit) - math.log(m0)) / d) if d > 0 else c1
    if pts[0][1] >= limit:
        return pts[0][0]
    (c0, m0), (c1, m1) = pts[-2], pts[-1]
    d = growth_degree(c0, m0, c1, m1)
    return c1 * math.exp((math.log(limit) - math.log(m1)) / d) if d > 0 else math.inf


def first_nonfinite_c(cs: Sequence[float], nonfinite_fraction: Sequence[float]) -> float:
    """The smallest grid ``c`` with any non-finite output (``inf`` when every grid point is finite)."""
    return next((c for c, f in sorted(zip(cs, nonfinite_fraction, strict=True)) if f > 0), math.inf)


__all__ = ["F32_MAX", "crossing_c", "first_nonfinite_c", "growth_degree", "max_finite_abs", "nonfinite_rows",
           "predicted_degree", "predicted_overflow_c"]
