"""Weight matching (Ainsworth et al., Git Re-Basin, ICLR 2023, arXiv:2209.04836, algorithm 2).

Find permutations of model B's hidden units that maximise Σ_layers ⟨W_A, P W_B Pᵀ⟩. Coordinate descent: fix
every permutation but one; the best one is then a linear assignment problem on the units' similarity
matrix (solved exactly with ``scipy.optimize.linear_sum_assignment``). Permutations are visited in a
random order each sweep (seeded), and the search stops after a sweep in which no permutation improved.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mergelab.align.specs import (
    Permutation,
    PermutationSpec,
    StateDict,
    apply_permutation,
    identity_permutation,
    is_statistic,
    permute_tensor,
)


@dataclass
class MatchResult:
    """The permutation of B's units, the objective after every sweep and the seed of the visiting order."""

    perm: Permutation
    objective: list[float] = field(default_factory=list)
    sweeps: int = 0
    seed: int = 0
    converged: bool = False


def _similarity(spec: PermutationSpec, p: str, n: int, a: StateDict, b: StateDict,
                perm: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """S[i, j] = Σ over the tensors p acts on of ⟨unit i of A, unit j of B with the other permutations applied⟩."""
    sim = torch.zeros(n, n, dtype=torch.float64, device=device)
    for name, axis in spec.perm_to_axes[p]:
        if is_statistic(name):  # running statistics follow the weights; they are not evidence of a match
            continue
        wa = a[name].to(device, torch.float64)
        wb = permute_tensor(spec, perm, name, b[name].to(device, torch.float64), except_axis=axis)
        sim += torch.movedim(wa, axis, 0).reshape(n, -1) @ torch.movedim(wb, axis, 0).reshape(n, -1).T
    return sim


def objective(spec: PermutationSpec, a: StateDict, b: StateDict, perm: Mapping[str, torch.Tensor]) -> float:
    """Σ ⟨W_A, π(W_B)⟩ over the matched (non-statistic) tensors."""
    pb = apply_permutation(spec, perm, {k: v for k, v in b.items() if k in spec.axes_to_perm})
    return float(sum((a[k].double() * pb[k].double()).sum() for k in pb if not is_statistic(k)))


def weight_matching(spec: PermutationSpec, a: StateDict, b: StateDict, *, seed: int = 0, max_sweeps: int = 100,
                    init: Mapping[str, torch.Tensor] | None = None,
                    device: str | torch.device | None = None) -> MatchResult:
    """Permutations of ``b``'s units that align it to ``a`` (apply them with :func:`apply_permutation`).

    ``device`` is where the similarity matrices are computed (``cuda`` for large models); the assignment
    problems are solved on the CPU. ``seed`` fixes the order in which permutations are visited.
    """
    spec.check(a)
    spec.check(b)
    dev = torch.device(device) if device is not None else a[next(iter(a))].device
    sizes = spec.sizes(a)
    perm: Permutation = {p: ix.clone() for p, ix in (init or identity_permutation(spec, a)).items()}
    # tensors already on the device once, not once per permutation per sweep
    a_dev = {k: v.to(dev) for k, v in a.items() if k in spec.axes_to_perm}
    b_dev = {k: v.to(dev) for k, v in b.items() if k in spec.axes_to_perm}
    names = spec.names
    rng = np.random.default_rng(seed)
    result = MatchResult(perm, seed=seed)
    for sweep in range(max_sweeps):
        improved = False
        for idx in rng.permutation(len(names)):
            p = names[int(idx)]
            n = sizes[p]
            sim = _similarity(spec, p, n, a_dev, b_dev, perm, dev).cpu().numpy()
            _, cols = linear_sum_assignment(sim, maximize=True)
            rows = np.arange(n)
            old = float(sim[rows, perm[p].numpy()].sum())
            new = float(sim[rows, cols].sum())
            # a relative tolerance: rounding alone must not count as progress, or sweeps never stop
            if new > old + 1e-12 * max(1.0, abs(old)):
                improved = True
                perm[p] = torch.as_tensor(cols, dtype=torch.long)
        result.sweeps = sweep + 1
        result.objective.append(objective(spec, a, b, perm))
        if not improved:
            result.converged = True
            break
    result.perm = perm
    return result


def align(spec: PermutationSpec, a: StateDict, b: StateDict, **kwargs: object) -> tuple[dict[str, torch.Tensor],
                                                                                         MatchResult]:
    """``b`` permuted to match ``a`` (same function as ``b``), and the matching result."""
    result = weight_matching(spec, a, b, **kwargs)  # type: ignore[arg-type]
    return apply_permutation(spec, result.perm, b), result
