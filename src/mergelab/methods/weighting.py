"""The one rule for normalised weighted sums, shared by every method that divides by Σ w_i."""

from __future__ import annotations

from collections.abc import Sequence


def weight_sum(weights: Sequence[float], method: str) -> float:
    """``Σ w_i``, the divisor of a normalised weighted sum; refuses weights that sum to zero.

    The test is relative: ``0.1 + 0.2 − 0.3`` is 5.6e-17, not 0, and dividing by it gives garbage, while one
    tiny weight (``[1e-9]``) is a legitimate divisor (``w δ / w = δ``). Skipping the division instead, as an
    absolute threshold would, silently returns the unnormalised sum.
    """
    total = float(sum(weights))
    if abs(total) <= 1e-12 * sum(abs(float(w)) for w in weights):
        raise ValueError(f"{method}: the weights {[float(w) for w in weights]} sum to zero, so the result cannot "
                         "be normalised by their sum; set normalize: false or change the weights")
    return total
