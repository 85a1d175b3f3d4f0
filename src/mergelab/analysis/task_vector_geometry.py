"""How large the task vectors are and how much of them is shared: the regime checks of the task-vector benchmark.

For task vectors τ_t = θ_t − θ_0 over every floating-point tensor:

- ``relative_norms[t] = ‖τ_t‖ / ‖θ_0‖``: how far fine-tuning moved; CLIP-style fine-tuning (small lr, few steps)
  keeps it small, the regime in which task arithmetic and its successors work.
- ``shared_fraction = ‖(1/T) Σ_t τ_t‖² / ((1/T) Σ_t ‖τ_t‖²)``: 1 when every task moved the same way, 1/T when the
  task vectors are orthogonal (with equal norms it is ``(1 + (T − 1) c̄) / T`` for c̄ the mean pairwise cosine).
  CART's centring removes exactly this shared part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TaskVectorGeometry:
    relative_norms: tuple[float, ...]
    shared_fraction: float
    mean_cosine: float  # mean over task pairs of cos(τ_i, τ_j); nan for one task

    @property
    def tasks(self) -> int:
        return len(self.relative_norms)


def task_vector_geometry(base: Mapping[str, torch.Tensor],
                         states: Sequence[Mapping[str, torch.Tensor]]) -> TaskVectorGeometry:
    """Norms, shared fraction and mean pairwise cosine of the task vectors of ``states`` against ``base``
    (float64 sums over every floating-point tensor of ``base``)."""
    if not states:
        raise ValueError("task_vector_geometry needs at least one fine-tuned state")
    names = [n for n, t in base.items() if t.is_floating_point()]
    t = len(states)
    gram = torch.zeros(t, t, dtype=torch.float64)
    base_sq = 0.0
    for name in names:
        b = base[name].to(torch.float64).flatten()
        base_sq += float(b @ b)
        taus = torch.stack([s[name].to(torch.float64).flatten() - b for s in states])
        gram += taus @ taus.T
    sq = gram.diagonal()
    if base_sq == 0:
        raise ValueError("the base model's weights are all zero: relative norms are undefined")
    shared = float(gram.sum() / t**2 / sq.mean()) if float(sq.mean()) > 0 else float("nan")
    norms = sq.sqrt()
    cos = gram / torch.outer(norms, norms)
    pairs = [float(cos[i, j]) for i in range(t) for j in range(i + 1, t)]
    return TaskVectorGeometry(tuple(float(n) / base_sq**0.5 for n in norms), shared,
                              sum(pairs) / len(pairs) if pairs else float("nan"))
