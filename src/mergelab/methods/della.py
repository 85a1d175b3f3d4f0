"""DELLA: drop task-vector entries with magnitude-aware probabilities (MagPrune), rescale, then merge.

Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling", 2024
(arXiv:2406.11617).

MagPrune ranks the entries of each row of a task vector by magnitude and keeps the larger ones with a higher
probability. The keep probabilities are mergekit's: ``density − ε`` for the smallest entry of a row up to
``density + ε`` for the largest, linear in the rank, so their mean is ``density`` (the paper states the same
linear rule for the drop probabilities). A "row" is dim 1 of the tensor as in mergekit (each output row of a
2-D weight; a 1-D tensor is one row).

Survivors are rescaled as in the paper, each by ``1 / p_j`` with ``p_j`` its own keep probability
(``E[δ̃] = δ``); mergekit instead scales the whole tensor to the delta's L1 norm — ``rescale_mode: l1``
gives that rule. Masks come from the same seeded CPU generators as DARE's (one per tensor and model), so a
seed gives the same merge on every device, thread count and tensor order. In the config's ``dtype`` the
probabilities, ties and rescaling follow mergekit's, so that with the same coins the merge is mergekit's bit
for bit, float16 and bfloat16 included (tests/test_mergekit_conformance.py replaces both tools' coins).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from mergelab.kernels.random_drops import dropped_consensus, dropped_consensus_applies
from mergelab.kernels.row_ranks import argsort_ranks, stable_ranks
from mergelab.methods.dare import (
    CarriedGenerators,
    KeepProbability,
    PieceCoins,
    dare_generators,
    dropped_by_entry,
    drops_in_pieces,
    entry_coins,
    random_drop_params,
    random_drop_sparsifier,
)
from mergelab.methods.registry import MergeMethod, Param, ScalarPass, VouchedMerge, register
from mergelab.methods.sparsify import TIE_ORDERS, Coins, TieOrder, drop_work_dtype, magnitude_keys
from mergelab.methods.task_vectors import (
    Consensus,
    Sparsifier,
    arithmetic_dtype,
    merge_task_vectors,
    rounded,
    task_vector,
)
from mergelab.methods.weighting import weight_sum


def check_epsilon(density: float, epsilon: float) -> None:
    """Keep probabilities ``density ± epsilon`` must lie inside (0, 1), as mergekit requires."""
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        most = min(density, 1 - density)
        raise ValueError(f"della: keep probabilities density ± epsilon must lie inside (0, 1), got density "
                         f"{density} and epsilon {epsilon}; use an epsilon below {most:.4g}")


def magprune_probabilities(delta: torch.Tensor, density: float, epsilon: float,
                           tie_order: TieOrder = "sort") -> torch.Tensor:
    """Keep probability of every entry of ``delta`` (same shape; in :func:`drop_work_dtype`, like mergekit).

    Per row (dim 1; a 1-D tensor is one row) of ``n`` entries, the entry of magnitude rank ``r`` (0 for the
    smallest) gets ``(density − ε) + 2ε · r / (n − 1)``. Tied magnitudes are ranked in the order of the same
    CPU ``torch.argsort`` mergekit calls (``tie_order`` "stable": a stable sort's, the lower flat index first),
    and the formula runs in mergekit's dtype (bfloat16 for bfloat16 deltas, where ranks above 256 round), so
    half-precision merges draw on the same probabilities. A row of one entry gets ``density`` (mergekit's
    formula divides 0 by 0 there and fails).
    """
    work = drop_work_dtype(delta.dtype)
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    n = rows.shape[1] if rows.dim() > 1 else 1
    if rows.numel() == 0 or n == 1:
        return torch.full(delta.shape, density, dtype=work, device=delta.device)
    table = rank_probabilities(n, density, epsilon, work)
    if tie_order == "stable":
        looked_up = stable_ranks(rows.cpu(), table) if rows.dim() == 2 else None  # compiled, from the bits
        if looked_up is None:
            looked_up = stable_rank_values(rows.abs().cpu(), table)
        return looked_up.reshape(delta.shape).to(delta.device)
    # sorted on the CPU whatever the device: CUDA orders ties differently (see sparsify._sorted_range)
    magnitudes = rows.abs().cpu()
    looked_up = argsort_ranks(magnitudes, table)  # the compiled replay of that sort, where it applies
    if looked_up is not None:
        return looked_up.reshape(delta.shape).to(delta.device)
    order = torch.argsort(magnitudes, dim=1)
    del magnitudes
    # each entry's rank is the inverse permutation of ``order``, put in place by one scatter: mergekit's second
    # argsort gives the same (a permutation has no ties) at 11× the CPU (2048 × 4096 bf16, one thread: 0.415 s
    # against 0.037)
    positions = torch.arange(n).view(1, n, *[1] * (order.dim() - 2)).expand_as(order)  # along dim 1, any rank
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    del order
    return table[ranks].reshape(delta.shape).to(delta.device)


_STABLE_CHUNK = 1 << 16  # entries ranked at a time: their int64 order is 8 bytes per entry


def stable_rank_values(magnitudes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[r]`` for each entry of ``magnitudes`` (at least 2-D, CPU), ``r`` its rank along dim 1 in a stable
    ascending sort: tied entries ranked by their index; where the compiled ranks
    (:func:`~mergelab.kernels.row_ranks.stable_ranks`) do not apply. A 2-D tensor with magnitude keys
    (bfloat16, float16, float32, no NaN) is sorted by numpy's stable sort of the keys, a radix sort for 16-bit
    ones, a block of rows at a time, and the table scattered to where each rank's entry sits (2048 × 1024
    bfloat16, one thread: 5.5 ns per entry, against 20–24 for ``torch.argsort(stable=True)`` alone and 25.6 for
    the replay of the unstable sort with its lookup, 2026-12-05); anything else by ``torch.argsort(stable=True)``,
    the same."""
    n = magnitudes.shape[1]
    keys = magnitude_keys(magnitudes) if magnitudes.dim() == 2 else None
    if keys is None:
        order = torch.argsort(magnitudes, dim=1, stable=True)
        return torch.empty(order.shape, dtype=table.dtype).scatter_(
            1, order, table.view(1, n, *[1] * (order.dim() - 2)).expand_as(order))
    rows = keys.reshape(magnitudes.shape).numpy()
    out = torch.empty(magnitudes.shape, dtype=table.dtype)
    step = max(1, _STABLE_CHUNK // n)
    for a in range(0, rows.shape[0], step):
        order = torch.from_numpy(np.argsort(rows[a:a + step], axis=1, kind="stable"))
        out[a:a + step].scatter_(1, order, table.expand(order.shape[0], n))
    return out


def rank_probabilities(n: int, density: float, epsilon: float, work: torch.dtype) -> torch.Tensor:
    """The keep probability of ranks ``0 … n − 1`` in a row of ``n`` entries: mergekit's operations in mergekit's
    order, in ``work``, so that they are the same numbers. Every row's ranks are a permutation of these, so its
    lowest and highest rank are the table's, and looking an entry's probability up by its rank gives what the
    formula over the tensor gives (on a 2752 × 1024 bf16 task vector 9 instead of 15 ms, one thread)."""
    ranks = torch.arange(n).to(work) + 1
    lowest, highest = ranks.min(), ranks.max()
    rank_norm = ((ranks - lowest) / (highest - lowest)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def della_sparsifier(densities: Sequence[float], epsilons: Sequence[float], seed: int, *, rescale: bool = True,
                     rescale_mode: str = "density",
                     generators: Sequence[torch.Generator | Coins] | None = None,
                     tie_orders: Sequence[TieOrder] | None = None) -> Sparsifier:
    """MagPrune for model ``i``: keep entry ``j`` with probability ``p_j`` (:func:`magprune_probabilities`),
    then rescale survivors by ``1 / p_j`` (``"density"``, the paper) or by ``‖δ‖₁ / ‖m ⊙ δ‖₁`` (``"l1"``,
    mergekit). ``generators``: each model's coins for a streamed piece (else generators made from ``seed``)."""
    return random_drop_sparsifier(densities, _keep_probability(densities, epsilons, tie_orders), seed,
                                  rescale=rescale, rescale_mode=rescale_mode, generators=generators)


def _keep_probability(densities: Sequence[float], epsilons: Sequence[float],
                      tie_orders: Sequence[TieOrder] | None) -> KeepProbability:
    for density, epsilon in zip(densities, epsilons, strict=True):
        check_epsilon(density, epsilon)
    return lambda i, delta: magprune_probabilities(delta, densities[i], epsilons[i],
                                                   tie_orders[i] if tie_orders else "sort")


def della_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                densities: Sequence[float], epsilons: Sequence[float], *, seed: int,
                consensus: Consensus | None = "sum", normalize: bool = True, lambda_: float = 1.0,
                rescale: bool = True, rescale_mode: str = "density", dtype: torch.dtype | None = None,
                scalars: CarriedGenerators | PieceCoins | None = None, offset: int = 0,
                tie_orders: Sequence[TieOrder] | None = None) -> torch.Tensor:
    """DELLA on one tensor (:func:`vouched_della_merge` says more): ``δ̃_i = m_i ⊙ δ_i / p_i`` with ``m_i ~
    Bernoulli(p_i)`` and ``p_i`` from the magnitude ranks of ``δ_i`` (MagPrune), then TIES' sign election and
    disjoint mean (``consensus="sum"``, della) or task arithmetic (``consensus=None``, della_linear), computed in
    ``dtype`` (float32 when None)."""
    return vouched_della_merge(base, tensors, weights, densities, epsilons, seed=seed, consensus=consensus,
                               normalize=normalize, lambda_=lambda_, rescale=rescale, rescale_mode=rescale_mode,
                               dtype=dtype, scalars=scalars, offset=offset, tie_orders=tie_orders).merged


def vouched_della_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                        densities: Sequence[float], epsilons: Sequence[float], *, seed: int,
                        consensus: Consensus | None = "sum", normalize: bool = True, lambda_: float = 1.0,
                        rescale: bool = True, rescale_mode: str = "density", dtype: torch.dtype | None = None,
                        scalars: CarriedGenerators | PieceCoins | None = None, offset: int = 0,
                        tie_orders: Sequence[TieOrder] | None = None) -> VouchedMerge:
    """DELLA on one tensor, and whether its one compiled pass (below) found every task-vector entry finite,
    dropped ones included (the engine then skips the NaN/Inf scan of the inputs: 0.5–2.0 CPU s at 3 × 2 GB,
    by VM); the other paths vouch for nothing.

    ``δ̃_i = m_i ⊙ δ_i / p_i`` with ``m_i ~ Bernoulli(p_i)`` and ``p_i`` from the magnitude ranks of ``δ_i``
    (MagPrune), then TIES' sign election and disjoint mean (``consensus="sum"``, della) or task arithmetic
    (``consensus=None``, della_linear), computed in ``dtype`` (float32 when None).

    ``scalars`` (:func:`~mergelab.methods.dare.dare_generators`, when the engine streams the tensor in flat
    pieces): each model's generator carried from piece to piece, as DARE's. Each entry's keep probability
    depends only on its row (the entries along dim 1 that share its other indices), so a piece of whole
    slices along dim 0 (:func:`slab_entries`; ``offset``: where it starts in the flat tensor) ranks exactly
    what the whole tensor ranks there, and everything after the coins is element-wise: the pieces, merged in
    order, make the bytes of the whole-tensor merge. The L1 rescale needs each whole dropped task vector:
    merged whole.
    """
    flat_shape = base.shape
    generators = None
    if scalars is not None:
        if not drops_in_pieces({"rescale": rescale, "rescale_mode": rescale_mode}, torch.float32):
            raise ValueError("della: coins drawn piece by piece apply to rescale_mode: density (or no rescale) only")
        slab = slab_entries(scalars.shape)
        if slab is None or offset % slab or base.numel() % slab:
            raise ValueError(f"della: a piece of a tensor of shape {list(scalars.shape)} merged with carried "
                             f"generators must hold whole slices along dim 0 ({slab} entries each), got "
                             f"{base.numel()} entries at flat entry {offset}")
        generators = scalars.take("della", offset, base.numel())
        rows = (-1, *scalars.shape[1:])
        base, tensors = base.reshape(rows), [t.reshape(rows) for t in tensors]
    arithmetic = arithmetic_dtype(base, dtype)
    if (rescale and rescale_mode == "density" and all(0 < d < 1 for d in densities)
            and dropped_consensus_applies(base, arithmetic)):
        # every model's coins kept until one compiled pass drops, rescales and merges: the drop wrote each kept
        # task vector out for the merge to read back (3 × 0.5 GB della_stable in-process: drop and merge 0.49 +
        # 1.06 -> 0.93 CPU s, the merge 5.50 -> 5.13; peak RSS 533-546 MiB either way, 2026-12-05)
        coins = entry_coins(_keep_probability(densities, epsilons, tie_orders), seed, generators)
        deltas = [task_vector(tensor, base, arithmetic) for tensor in tensors]
        drawn = [coins(i, delta) for i, delta in enumerate(deltas)]
        probabilities, draws = [p for p, _ in drawn], [u for _, u in drawn]
        del drawn
        if consensus is None and normalize:
            weight_sum(weights, "normalize")  # as generalized_task_arithmetic refuses them: the loop would divide by 0
        rounded_weights = [rounded(w, arithmetic) for w in weights]
        fused = dropped_consensus(base, deltas, probabilities, draws, rounded_weights, consensus, normalize, lambda_,
                                  arithmetic, _dropped_then_merged)
        if fused is not None:
            return VouchedMerge(fused.merged.reshape(flat_shape), fused.deltas_finite)
        merged = _dropped_then_merged(base, deltas, probabilities, draws, weights, consensus, normalize,
                                      lambda_, arithmetic)
        return VouchedMerge(merged.reshape(flat_shape), False)
    sparsify = della_sparsifier(densities, epsilons, seed, rescale=rescale, rescale_mode=rescale_mode,
                                generators=generators, tie_orders=tie_orders)
    deltas = [sparsify(i, task_vector(tensor, base, arithmetic)) for i, tensor in enumerate(tensors)]
    merged = merge_task_vectors(base, deltas, weights, consensus=consensus, normalize=normalize, lambda_=lambda_,
                                dtype=dtype)
    return VouchedMerge(merged.reshape(flat_shape), False)


def _dropped_then_merged(base: torch.Tensor, deltas: Sequence[torch.Tensor], probabilities: Sequence[torch.Tensor],
                         draws: Sequence[torch.Tensor], weights: Sequence[float], consensus: Consensus | None,
                         normalize: bool, lambda_: float, arithmetic: torch.dtype) -> torch.Tensor:
    """Each task vector dropped and rescaled by its coins, then merged: DELLA's two steps, each model's kept
    task vector written out between them (``deltas`` are modified)."""
    kept = [dropped_by_entry(d, p, u) for d, p, u in zip(deltas, probabilities, draws, strict=True)]
    return merge_task_vectors(base, kept, weights, consensus=consensus, normalize=normalize, lambda_=lambda_,
                              dtype=arithmetic)


def slab_entries(shape: Sequence[int]) -> int | None:
    """Entries of one slice along dim 0 of a tensor of ``shape``, the unit DELLA streams in: every row it
    ranks (along dim 1) lies inside one such slice. None for a tensor of fewer than 2 dims (one row)."""
    return math.prod(shape[1:]) if len(shape) >= 2 and math.prod(shape[1:]) > 0 else None


def _params(normalize_default: bool) -> tuple[Param, ...]:
    epsilon = Param("epsilon", float, 0.15, scope="model", low=0.0, high=0.5,
                    help="keep probabilities run from density − epsilon (smallest |δ|) to density + epsilon")
    tie_order = Param("tie_order", str, "sort", scope="model", choices=TIE_ORDERS,
                      help="tied magnitudes ranked in torch's CPU sort order (mergekit's) or a stable sort's "
                           "(lower index first; no sort replayed)")
    return random_drop_params(
        normalize_default, density_help="mean keep probability", extra=(epsilon, tie_order),
        rescale_help="divide each kept entry by its keep probability (paper) or match the delta's L1 norm "
                     "(mergekit)")


_PAPER = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"
# streamed in pieces of whole dim-0 slices, each model's generator carried from piece to piece
_SCALAR_PASS = ScalarPass(dare_generators, applies=drops_in_pieces, unit=slab_entries)
_DROP = "m_i ~ Bernoulli(p_i), p_ij = density − ε + 2ε rank_j / (n − 1) by |δ_ij| within its row"

register(MergeMethod(
    name="della", function=della_merge, vouching=vouched_della_merge, params=_params(True),
    summary="Magnitude-ranked random drop (MagPrune), rescale, then TIES sign election and disjoint mean.",
    paper=_PAPER + "; Yadav et al. 2023, TIES (arXiv:2306.01708)", randomized=True, also_in=("mergekit",),
    scalar_pass=_SCALAR_PASS, compiled=True,
    formula="θ = θ_0 + λ Σ_i w_i [sgn(δ̃_i)=γ] δ̃_i / Σ_i w_i [sgn(δ̃_i)=γ],  γ = sgn Σ_i w_i δ̃_i,  "
            f"δ̃_i = m_i ⊙ δ_i / p_i,  {_DROP}",
))
register(MergeMethod(
    name="della_linear", function=della_merge, vouching=vouched_della_merge, params=_params(False),
    fixed={"consensus": None},
    summary="Magnitude-ranked random drop (MagPrune), rescale, then task arithmetic.",
    paper=_PAPER, randomized=True, also_in=("mergekit",), scalar_pass=_SCALAR_PASS, compiled=True,
    formula=f"θ = θ_0 + λ Σ_i w_i (m_i ⊙ δ_i) / p_i,  {_DROP}",
))
