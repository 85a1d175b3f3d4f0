"""DARE: drop task-vector entries at random and rescale the rest, then sum (linear) or TIES-merge.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
ICML 2024 (arXiv:2311.03099).

Rescaling follows the paper: kept entries are divided by the keep probability ``density`` so that the
expectation of the sparsified delta equals the delta. mergekit instead rescales to match the L1 norm of
the delta; ``rescale_mode: l1`` reproduces that. The mask comes from a seeded CPU generator per
(tensor, model), so a seed gives the same merge on every device and in every tensor order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from mergelab.kernels.mersenne_draws import MersenneDraws, mersenne_draws
from mergelab.kernels.random_drops import rescaled_drop
from mergelab.methods.registry import FlatSource, MergeMethod, Param, ScalarPass, register
from mergelab.methods.sparsify import Coins, bernoulli_mask, drop_work_dtype, generator_for, match_l1, uniform_draws
from mergelab.methods.task_vectors import (
    Consensus,
    DrawnMask,
    Sparsifier,
    divide_as_the_cpu,
    generalized_task_arithmetic,
)

KeepProbability = Callable[[int, torch.Tensor], "float | torch.Tensor"]
"""``(model_index, delta) -> keep probability``: one number (DARE) or one value per entry (DELLA)."""


class PieceCoins:
    """The coins of one piece of a tensor merged in flat pieces: each drawing model's uniform draws for the
    piece's ``numel`` entries at flat ``offset``, reserved in the pieces' order (:meth:`CarriedGenerators.for_piece`)
    and drawn on that model's thread. So the pieces may then merge side by side, in any order, each with the
    coins of the whole tensor's draw at its place (a CPU generator drawn in consecutive ranges gives the
    numbers of one whole draw). ``shape``: the whole tensor's."""

    def __init__(self, shape: tuple[int, ...], offset: int, numel: int,
                 draws: list[Future[torch.Tensor] | None]) -> None:
        self.shape, self.offset, self.numel, self._draws = shape, offset, numel, draws

    def take(self, method: str, offset: int, numel: int) -> list[Coins]:
        """Each model's coins (call one with the piece's shape); the piece must be the one reserved."""
        if (offset, numel) != (self.offset, self.numel):
            raise ValueError(f"{method}: coins were reserved for {self.numel} entries at flat entry {self.offset}, "
                             f"not for {numel} at {offset}")
        return [functools.partial(_drawn, draws) for draws in self._draws]


def _drawn(draws: Future[torch.Tensor] | None, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    if draws is None:
        raise ValueError("a model whose density keeps or drops everything draws no coins")
    return draws.result().reshape(shape)


@dataclass
class CarriedGenerators:
    """The scalar pass of a random drop (DARE, DELLA) for a tensor merged in flat pieces: each model's
    generator, carried from piece to piece, and where the next piece must start. A generator advances with
    every draw, so coins reserved out of order, twice or not at all would silently be other coins than the
    whole tensor's: :meth:`for_piece` refuses it. ``shape``: the whole tensor's; ``draws``: which models
    draw (a density of 0 or 1 draws nothing)."""

    generators: list[torch.Generator]
    shape: tuple[int, ...]
    draws: list[bool]
    position: int = 0
    _threads: list[ThreadPoolExecutor] = field(default_factory=list)
    # each drawing model's compiled twin of its generator, made at the first piece (None: torch's kernel draws)
    _twins: list[MersenneDraws | None] = field(default_factory=list)

    def for_piece(self, method: str, offset: int, numel: int) -> PieceCoins:
        """Reserve the coins of the piece of ``numel`` entries at flat ``offset``, which must be the next one:
        each drawing model's are drawn on a thread of its own (torch's CPU uniform kernel is serial, ~4 ms per
        1 Mi draws: two models' coins took longer than DARE-TIES' compiled merge of their piece), by the
        generators' compiled twins where the loops are loaded (:mod:`mergelab.kernels.mersenne_draws`, the same
        numbers at a third of the CPU; the generators themselves then stay where they were)."""
        total = math.prod(self.shape)
        if offset != self.position or offset + numel > total:
            raise ValueError(f"{method}: the pieces of a tensor with carried generators must be merged in order, "
                             f"each once: the next one starts at flat entry {self.position} of {total}, got "
                             f"{numel} entries at {offset}; make a new scalar pass to merge the tensor again")
        if offset == 0:
            self._twins = [mersenne_draws(g) if drawing else None for g, drawing in zip(self.generators, self.draws,
                                                                                        strict=True)]
        self.position += numel
        if not self._threads:
            self._threads = [ThreadPoolExecutor(1, thread_name_prefix="mergelab-coins") for _ in self.generators]
        draws = [None if not drawing else thread.submit(twin.take, numel) if twin is not None else
                 thread.submit(torch.rand, numel, generator=g, dtype=torch.float32)
                 for thread, g, twin, drawing in zip(self._threads, self.generators, self._twins, self.draws,
                                                     strict=True)]
        if self.position == total:  # the last piece: the threads end once its coins are drawn
            for thread in self._threads:
                thread.shutdown(wait=False)
        return PieceCoins(self.shape, offset, numel, draws)

    def take(self, method: str, offset: int, numel: int) -> list[Coins]:
        """Each model's coins for the next piece (:meth:`for_piece` and :meth:`PieceCoins.take` at once)."""
        return self.for_piece(method, offset, numel).take(method, offset, numel)


def random_drop_sparsifier(densities: Sequence[float], keep_probability: KeepProbability, seed: int, *,
                           rescale: bool = True, rescale_mode: str = "density",
                           generators: Sequence[torch.Generator | Coins] | None = None) -> Sparsifier:
    """Keep entry ``j`` of model ``i``'s delta with probability ``p_ij = keep_probability(i, δ_i)`` (a coin
    from the seeded generator of (tensor, model), or ``generators[i]``: a piece's coins, :class:`PieceCoins`), then
    rescale the kept ones by ``1 / p_ij`` (``"density"``, unbiased) or by ``‖δ‖₁ / ‖m ⊙ δ‖₁`` (``"l1"``,
    mergekit). ``densities[i]`` of 1 keeps, 0 drops all."""
    if rescale_mode not in ("density", "l1"):
        raise ValueError(f"rescale_mode must be 'density' or 'l1', got {rescale_mode!r}")

    def drop(i: int, delta: torch.Tensor) -> torch.Tensor:
        density = densities[i]
        if density >= 1:
            return delta
        if density <= 0:
            return torch.zeros_like(delta)
        p = keep_probability(i, delta)
        generator = model_coins(i, seed, generators)
        if rescale and rescale_mode == "density" and isinstance(p, torch.Tensor):  # DELLA's p per entry
            return dropped_by_entry(delta, p, uniform_draws(delta.shape, generator))
        # rescaled in mergekit's working dtype (float16 deltas in float32), then rounded back, as mergekit does
        work = delta.to(drop_work_dtype(delta.dtype)) if rescale else delta
        mask = bernoulli_mask(delta.shape, p, generator, device=delta.device)
        if not rescale:
            return delta.masked_fill_(~mask, 0)  # in place on the caller's fresh copy (see Sparsifier)
        before = work.abs().sum() if rescale_mode == "l1" else None
        kept = work.masked_fill_(~mask, 0)
        del mask
        kept = divide_as_the_cpu(kept, p) if before is None else match_l1(kept, before)
        return kept if kept.dtype == delta.dtype else delta.copy_(kept)
    return drop


def model_coins(i: int, seed: int, generators: Sequence[torch.Generator | Coins] | None) -> torch.Generator | Coins:
    """Model ``i``'s coins: a streamed piece's (``generators[i]``), else fresh ones of the tensor's seed."""
    return generators[i] if generators is not None else fresh_coins(seed, i)


def entry_coins(keep_probability: KeepProbability, seed: int,
                generators: Sequence[torch.Generator | Coins] | None = None,
                ) -> Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Model ``i``'s keep probabilities (one per entry: ``keep_probability`` must give a tensor) and coins for
    its ``delta``, drawn as :func:`random_drop_sparsifier` draws them: for a caller that drops and merges in
    one pass (DELLA's :func:`~mergelab.kernels.random_drops.dropped_consensus`)."""
    def coins(i: int, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = keep_probability(i, delta)
        if not isinstance(p, torch.Tensor):
            raise TypeError("entry_coins needs one keep probability per entry")
        return p, uniform_draws(delta.shape, model_coins(i, seed, generators))
    return coins


def dropped_by_entry(delta: torch.Tensor, probabilities: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """``delta`` kept where ``draws < probabilities`` and divided by them, else 0 (DELLA's drop with the
    paper's rescale), computed in mergekit's working dtype (float16 deltas in float32) and rounded back, as
    mergekit does; ``delta`` (the caller's fresh copy) may be modified."""
    work = delta.to(drop_work_dtype(delta.dtype))
    kept = rescaled_drop(work, probabilities, draws, _rescaled_drop)
    if kept is None:
        kept = _rescaled_drop(work, probabilities, draws)
    return kept if kept.dtype == delta.dtype else delta.copy_(kept)


def _rescaled_drop(delta: torch.Tensor, probabilities: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """``delta`` divided by ``probabilities`` where ``draws < probabilities``, else 0, in place: the mask of
    :func:`~mergelab.methods.sparsify.bernoulli_mask`, then the rescale."""
    return delta.masked_fill_(~(draws.to(probabilities.device) < probabilities), 0).div_(probabilities)


def dare_sparsifier(densities: Sequence[float], seed: int, *, rescale: bool = True,
                    rescale_mode: str = "density") -> Sparsifier:
    """Keep each entry of model ``i``'s delta with probability ``p_i = densities[i]``, then rescale the kept
    ones by ``1 / p_i`` (``"density"``, unbiased) or by ``‖δ‖₁ / ‖m ⊙ δ‖₁`` (``"l1"``, mergekit)."""
    return random_drop_sparsifier(densities, lambda i, _: densities[i], seed, rescale=rescale,
                                  rescale_mode=rescale_mode)


def dare_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
               densities: Sequence[float], *, seed: int, consensus: Consensus | None = None,
               normalize: bool = False, lambda_: float = 1.0, rescale: bool = True,
               rescale_mode: str = "density", dtype: torch.dtype | None = None,
               scalars: CarriedGenerators | PieceCoins | None = None, offset: int = 0) -> torch.Tensor:
    """DARE on one tensor: ``δ̃_i = m_i ⊙ δ_i / p_i`` with ``m_i ~ Bernoulli(p_i)``, ``p_i = density``,
    then task arithmetic (``consensus=None``, dare_linear) or TIES' sign election (``"sum"``, dare_ties),
    computed in ``dtype`` (float32 when None).

    With the paper's rescale (or none) the drop is a mask and a division, given to the task-vector core as
    ``keep``/``divide_kept``: with a consensus it then runs fused, chunk by chunk, with the same bits as the
    sparsifier's two passes but no kept values compacted for the second (their ``nonzero``, indexing and
    ``masked_scatter`` were a quarter of the time): dare_ties on a 32.8 M-entry bf16 tensor of 2 models took
    1.0–1.2 CPU s instead of 2.8–3.7. The L1 rescale needs each whole dropped task vector: the sparsifier.

    ``scalars`` (:func:`dare_generators`, when the engine streams the tensor in flat pieces): each model's
    generator, advanced by this piece's draws, so that the pieces, merged in order, draw the whole tensor's
    masks (a CPU generator drawn in consecutive ranges gives the numbers of one whole draw). ``offset``: where
    this piece starts in the flat tensor; a piece out of order or merged twice is refused."""
    if scalars is not None and not drops_in_pieces({"rescale": rescale, "rescale_mode": rescale_mode}, torch.float32):
        raise ValueError("dare: masks drawn piece by piece apply to rescale_mode: density (or no rescale) only")
    generators = scalars.take("dare", offset, base.numel()) if scalars is not None else None
    if rescale_mode == "l1" and rescale:
        sparsify = dare_sparsifier(densities, seed, rescale=rescale, rescale_mode=rescale_mode)
        return generalized_task_arithmetic(base, tensors, weights, sparsify=sparsify, consensus=consensus,
                                           normalize=normalize, lambda_=lambda_, dtype=dtype)
    if rescale_mode not in ("density", "l1"):
        raise ValueError(f"rescale_mode must be 'density' or 'l1', got {rescale_mode!r}")

    def draw(i: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
        generator = generators[i] if generators is not None else fresh_coins(seed, i)
        return dare_mask(shape, densities[i], generator, device=device)

    divisors = [p if rescale and 0 < p < 1 else 1.0 for p in densities]
    return generalized_task_arithmetic(base, tensors, weights, keep=DrawnMask(draw), divide_kept=divisors,
                                       consensus=consensus, normalize=normalize, lambda_=lambda_, dtype=dtype)


def dare_generators(source: FlatSource, seed: int, densities: Sequence[float]) -> CarriedGenerators:
    """DARE's "scalar pass": nothing of the tensor is read (``source`` gives its shape), only each model's
    generator is made, which the pieces of the tensor then draw from in turn (:func:`dare_merge`'s ``scalars``)."""
    return CarriedGenerators([generator_for(seed, i) for i in range(len(densities))], source.shape,
                             [0 < d < 1 for d in densities])


def drops_in_pieces(params: Mapping[str, Any], dtype: torch.dtype) -> bool:
    """The coins are the only whole-tensor step of a random drop (DARE; DELLA: with its per-row ranks), with
    the density rescale or none (no L1 norm of a whole task vector): merged in pieces."""
    return not params["rescale"] or params["rescale_mode"] == "density"


def fresh_coins(seed: int, index: int) -> torch.Generator | Coins:
    """Model ``index``'s coins for a tensor drawn whole (:func:`generator_for`): the fresh generator's compiled
    twin where the loops give torch's numbers (0.9 against 2.7-2.9 ms per 1 Mi draws; the generator is made
    here and dropped, so nothing else draws from it), else the generator. Every tensor of a GPU merge is
    drawn whole."""
    generator = generator_for(seed, index)
    twin = mersenne_draws(generator)
    if twin is None:
        return generator
    return lambda shape: twin.take(math.prod(shape)).reshape(shape)


def dare_mask(shape: torch.Size, density: float, generator: torch.Generator | Coins,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """The entries DARE keeps: all where ``density ≥ 1``, none where ``≤ 0`` (nothing drawn), else a draw."""
    if density <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    return bernoulli_mask(shape, density, generator, device=device)


def random_drop_params(normalize_default: bool, *, density_help: str, rescale_help: str,
                       extra: tuple[Param, ...] = ()) -> tuple[Param, ...]:
    """Parameters of the drop-and-rescale methods (DARE, DELLA), with a method's ``extra`` ones."""
    return (
        Param("weight", float, 1.0, scope="model", help="scale of this model's task vector"),
        Param("density", float, 1.0, scope="model", low=0.0, high=1.0, help=density_help),
        *extra,
        Param("lambda", float, 1.0, help="global scale of the merged task vector"),
        Param("normalize", bool, normalize_default, help="divide by the (agreeing) weights"),
        Param("rescale", bool, True, help="rescale kept entries"),
        Param("rescale_mode", str, "density", choices=("density", "l1"), help=rescale_help),
        Param("int8_mask", bool, False, arg=None, help="accepted for mergekit compatibility; masks are boolean here"),
    )


def _params(normalize_default: bool) -> tuple[Param, ...]:
    return random_drop_params(normalize_default, density_help="keep probability p",
                              rescale_help="divide by p (paper) or match the delta's L1 norm (mergekit)")


_PAPER = "Yu et al. 2024, Language Models are Super Mario (DARE) (arXiv:2311.03099)"

register(MergeMethod(
    name="dare_linear", function=dare_merge, params=_params(False),
    also_in=("mergekit", "FusionBench"),
    summary="Randomly drop task-vector entries (keep prob. p), rescale by 1/p, then task arithmetic.",
    paper=_PAPER, randomized=True, scalar_pass=ScalarPass(dare_generators, applies=drops_in_pieces),
    formula="θ = θ_0 + λ Σ_i w_i (m_i ⊙ δ_i) / p_i,  m_i ~ Bernoulli(p_i)",
))
register(MergeMethod(
    name="dare_ties", function=dare_merge, params=_params(False), fixed={"consensus": "sum"},
    also_in=("mergekit", "FusionBench"),
    summary="DARE drop-and-rescale followed by TIES sign election and disjoint merge.",
    paper=_PAPER + "; Yadav et al. 2023, TIES (arXiv:2306.01708)", randomized=True,
    scalar_pass=ScalarPass(dare_generators, applies=drops_in_pieces), compiled=True,
    formula="θ = θ_0 + λ Σ_i w_i [sgn(δ̃_i)=γ] δ̃_i,  γ = sgn Σ_i w_i δ̃_i,  δ̃_i = m_i ⊙ δ_i / p_i "
            "(÷ Σ_i w_i [sgn(δ̃_i)=γ] with normalize)",
))
