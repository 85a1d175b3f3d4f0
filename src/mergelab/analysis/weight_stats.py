"""Weight magnitude: scaling models, max-norm and variance before/after averaging, and the paper's bounds.

For a convex combination θ̄ = Σ_i w_i θ_i (w_i ≥ 0, Σ w_i = 1) of tensors with entries bounded by M:

- max-entry bound: max_k |θ̄_k| ≤ Σ_i w_i max_k |θ_i,k| ≤ M (triangle inequality);
- variance bound: the standard deviation over entries is a seminorm, so std(θ̄) ≤ Σ_i w_i std(θ_i) and
  Var(θ̄) ≤ max_i Var(θ_i) = max σ².

Averaging therefore never *increases* magnitude or spread; large, dissimilar weights shrink (cancel) —
which is why merging is sensitive to weight magnitude while ensembling (averaging outputs) is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from mergelab.types import StateDict

Which = Literal["all", "weights"]

BN_STATS = ("running_mean", "running_var")


def is_bn_stat(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in BN_STATS


def selected(name: str, tensor: torch.Tensor, which: Which, *, include_bn_stats: bool = False) -> bool:
    """Whether ``name`` is scaled/measured: float parameters (``weights``: only those with ≥ 2 dims, i.e.
    conv/linear kernels, not biases or norm affines); BatchNorm running stats only when asked."""
    if not tensor.is_floating_point():
        return False
    if is_bn_stat(name):
        return include_bn_stats
    return which == "all" or tensor.dim() >= 2


def scale_state_dict(sd: StateDict, c: float, *, which: Which = "all",
                     include_bn_stats: bool = False) -> dict[str, torch.Tensor]:
    """A copy of ``sd`` with the selected tensors multiplied by ``c`` (c = 1 returns equal tensors)."""
    return {k: (v * c if selected(k, v, which, include_bn_stats=include_bn_stats) else v.clone())
            for k, v in sd.items()}


def _flat(sd: StateDict, which: Which, include_bn_stats: bool) -> torch.Tensor:
    parts = [v.detach().double().flatten() for k, v in sd.items()
             if selected(k, v, which, include_bn_stats=include_bn_stats)]
    return torch.cat(parts) if parts else torch.zeros(1, dtype=torch.float64)


@dataclass(frozen=True)
class BoundCheck:
    """Max-entry and variance of the members and of their average, for one tensor (or ``*`` = all)."""

    name: str
    max_members: float  # M = max_i max_k |θ_i,k|
    max_merged: float
    var_members_max: float  # max_i Var(θ_i)
    var_merged: float

    @property
    def max_bound_holds(self) -> bool:
        return self.max_merged <= self.max_members * (1 + 1e-6) + 1e-12

    @property
    def var_bound_holds(self) -> bool:
        return self.var_merged <= self.var_members_max * (1 + 1e-6) + 1e-12


def check_bounds(members: Sequence[StateDict], merged: StateDict, *, which: Which = "all",
                 include_bn_stats: bool = False) -> list[BoundCheck]:
    """Per-tensor checks, then one global check over all selected entries concatenated (name ``*``)."""
    out = []
    for name, t in merged.items():
        if not selected(name, t, which, include_bn_stats=include_bn_stats) or t.numel() < 2:
            continue
        ms = [m[name].detach().double() for m in members]
        out.append(BoundCheck(name, max(float(m.abs().max()) for m in ms), float(t.double().abs().max()),
                              max(float(m.var(unbiased=False)) for m in ms), float(t.double().var(unbiased=False))))
    flats = [_flat(m, which, include_bn_stats) for m in members]
    fm = _flat(merged, which, include_bn_stats)
    out.append(BoundCheck("*", max(float(f.abs().max()) for f in flats), float(fm.abs().max()),
                          max(float(f.var(unbiased=False)) for f in flats), float(fm.var(unbiased=False))))
    return out
