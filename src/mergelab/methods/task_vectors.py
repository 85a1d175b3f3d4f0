"""Generalized task arithmetic: the shared core of task arithmetic, TIES, DARE and Breadcrumbs.

``merged = base + λ · Σ_i w_i m_i(δ_i) c_i / D`` with ``δ_i = θ_i − θ_base``, a sparsification mask
``m_i`` (identity, magnitude top-k, random drop, outlier trim), an optional sign-consensus mask ``c_i``
(TIES' elect step) and ``D = Σ_i w_i c_i`` when ``normalize`` (disjoint mean), else 1.

The sum is accumulated model by model instead of stacking all deltas: with consensus it takes two passes
(elect signs, then sum the agreeing entries), keeping each sparsified delta in compact form in between,
so peak memory stays at the inputs plus three tensors and the compact deltas. Where the sparsifier is a
mask (``keep``: TIES, Breadcrumbs), the masks are computed first and the rest runs fused, chunk by chunk
(:func:`_masked_consensus`): the same bits with a byte per entry and model held, and 2–3× less CPU.

Arithmetic dtype: with ``dtype`` (a config's ``dtype``) every step rounds to it where mergekit's does —
deltas, weights, the weighted deltas, the sums over models (accumulated in float32, like torch's
half-precision reductions, and rounded once), the division and the final addition — so float16/bfloat16
merges agree with mergekit bit for bit. Computing in float32 instead flipped TIES sign votes and top-k
boundaries on about 3 % of entries (max 0.03–0.07, issue 12). Without ``dtype``: float32 (float64 inputs:
float64).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from mergelab.kernels.dispatch import loops
from mergelab.kernels.masked import (
    KEY_DTYPES,
    KEY_SPECS,
    magnitude_keys_into,
    masked_consensus_with_masks,
    masked_task_arithmetic,
)
from mergelab.kernels.weighted_sums import task_arithmetic_sum
from mergelab.methods.sparsify import (
    TopK,
    band_of_keys,
    drop_work_dtype,
    magnitude_keys,
    match_l1,
    topk_of_keys,
)
from mergelab.methods.weighting import weight_sum

Sparsifier = Callable[[int, torch.Tensor], torch.Tensor]
"""``(model_index, delta) -> sparsified delta``. ``delta`` is a fresh tensor owned by the caller: a
sparsifier may (and, to save memory, should) modify and return it in place."""

Masker = Callable[[int, torch.Tensor], torch.Tensor]
"""``(model_index, delta) -> boolean mask of the entries kept`` (``delta`` read, not modified): a
sparsifier that only zeroes entries. Given as ``keep``, the merge after the masks runs fused, chunk by chunk
(see :func:`_masked_consensus`)."""


class DrawnMask:
    """A :data:`Masker` that reads only the task vector's shape and device: a random drop (DARE), whose mask is
    coins. :func:`_masked_consensus` then computes no task vector to make the mask: that subtraction was a fifth
    of a DARE-TIES piece's CPU (1.3 of 6.1 ms per 1 Mi entries of two bfloat16 models, one thread, 2026-12-04)."""

    def __init__(self, draw: Callable[[int, torch.Size, torch.device], torch.Tensor]) -> None:
        self.draw = draw  # (model_index, shape, device) -> boolean mask, true where kept

    def __call__(self, i: int, delta: torch.Tensor) -> torch.Tensor:
        return self.draw(i, delta.shape, delta.device)


Consensus = Literal["sum", "count"]

_CHUNK = 1 << 20  # entries per chunk of the element-wise steps (4 MiB of float32)


def arithmetic_dtype(base: torch.Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype a task-vector method computes in: ``dtype`` if given, else float32 (float64 stays)."""
    if dtype is not None:
        return dtype
    return torch.float64 if base.dtype == torch.float64 else torch.float32


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of half-precision values accumulate in float32 and are rounded once (torch's reductions)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` as the nearest ``dtype`` number: mergekit holds weights in a tensor of the arithmetic dtype."""
    return float(torch.tensor(value, dtype=dtype))


def generalized_task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsify: Sparsifier | None = None,
    keep: Masker | None = None,
    divide_kept: Sequence[float] | None = None,
    rescale: bool = False,
    consensus: Consensus | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``dtype``: the arithmetic dtype (see the module's notes); the result has the base's dtype.

    ``keep`` (instead of ``sparsify``) is the same as ``sparsify=lambda i, d: d.masked_fill_(~keep(i, d), 0)``
    with the same result bit for bit, computed with less memory and CPU where there is a consensus.
    ``divide_kept`` (with ``keep``; DARE's rescale): model ``i``'s kept entries are then divided by
    ``divide_kept[i]``, in :func:`~mergelab.methods.sparsify.drop_work_dtype` as DARE's sparsifier does.
    ``rescale`` (with ``keep``; mergekit's option): each kept task vector is scaled back to its L1 norm
    before the mask (:func:`~mergelab.methods.sparsify.match_l1`), which needs whole task vectors, so the
    fused path is not taken.
    """
    if sparsify is not None and keep is not None:
        raise ValueError("give sparsify or keep, not both")
    if divide_kept is not None and (keep is None or rescale):
        raise ValueError("divide_kept applies to a keep mask without rescale")
    if rescale and keep is None:
        raise ValueError("rescale applies to a keep mask")
    if len(tensors) != len(weights):
        raise ValueError(f"got {len(tensors)} tensors but {len(weights)} weights")
    if not tensors:
        return base.clone()
    dtype = arithmetic_dtype(base, dtype)
    acc = accumulator_dtype(dtype)
    weights = [rounded(w, dtype) for w in weights]
    divisors = list(divide_kept) if divide_kept is not None else [1.0] * len(tensors)
    if keep is not None and consensus is not None and not rescale:
        return _masked_consensus(base, tensors, weights, keep, divisors, consensus, normalize, lambda_, dtype)
    if keep is not None:
        def sparsify(i: int, delta: torch.Tensor, keep: Masker = keep) -> torch.Tensor:
            before = delta.abs().sum() if rescale else None
            kept = _divided(delta.masked_fill_(~keep(i, delta), 0), divisors[i])
            return match_l1(kept, before) if before is not None else kept

    if consensus is None:
        divisor = None
        if normalize:
            weight_sum(weights, "normalize")  # the one rule: weights summing to zero are refused
            divisor = rounded(math.fsum(weights), dtype)
        if sparsify is None:
            fused = task_arithmetic_sum(base, tensors, weights, divisor, lambda_, dtype,
                                        functools.partial(_weighted_task_vectors, dtype=dtype))
            if fused is not None:
                return fused
        return _weighted_task_vectors(base, tensors, weights, divisor, lambda_, dtype, sparsify)

    # Pass 1 elects the sign. Sparsification (a sort-like top-k, or a random draw) is the costly step, so
    # each sparsified delta is kept compactly (mask + kept values: 1 + 4·density bytes per entry instead of 4)
    # for pass 2 rather than recomputed.
    elected = torch.zeros_like(base, dtype=acc)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in range(len(tensors)):
        wd = _weighted_task_vector(tensors[i], base, weights[i], dtype, i, sparsify)
        elected += wd if consensus == "sum" else wd.sign()
        if sparsify is not None:
            nonzero = wd != 0
            kept.append((nonzero, wd[nonzero]))
        del wd
    # the vote is rounded to the arithmetic dtype before its sign is read, as mergekit's sum is
    positive = (elected.to(dtype) >= 0).reshape(-1)
    del elected
    mixed = _disjoint_sum(base, tensors, weights, kept if sparsify is not None else None, positive, dtype,
                          normalize)
    if lambda_ != 1:
        mixed *= lambda_
    return mixed.add_(base.to(dtype)).to(base.dtype)


def merge_task_vectors(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
                       consensus: Consensus | None = None, normalize: bool = False, lambda_: float = 1.0,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`generalized_task_arithmetic` of task vectors already computed and sparsified (``deltas[i]``: what
    its ``sparsify`` returns for model ``i``, in the arithmetic dtype), with the same bits, merged by the fused
    passes. The deltas go in as the models of a base of −0, since ``x − (−0)`` is ``x`` and ``y + (−0)`` is ``y``
    bit for bit, signed zeros included; every model's entries are kept (a dropped one is a zero, which no sum
    sees and no sign election counts); the true base is added last, as the formula adds it. For sparsifiers
    with no mask of their own (DELLA's per-entry rescale), whose two-pass election compacted the kept values
    and indexed them back: DELLA of a 2752 × 1024 bf16 tensor of two models took 0.38–0.43 s, 0.27–0.31 s
    with this and its probabilities looked up by rank (cProfile, one thread, 2026-12-03)."""
    if len(deltas) != len(weights):
        raise ValueError(f"got {len(deltas)} task vectors but {len(weights)} weights")
    if not deltas:
        return base.clone()
    arithmetic = arithmetic_dtype(base, dtype)
    if any(d.dtype != arithmetic or d.shape != base.shape for d in deltas):
        raise ValueError(f"task vectors must have the base's shape {list(base.shape)} and dtype {arithmetic}")
    origin = torch.full(base.shape, -0.0, dtype=arithmetic, device=base.device)
    everything = torch.ones(base.numel(), dtype=torch.bool, device=base.device)
    # a DrawnMask: the fused pass then makes no task vector (a copy of each delta) to ask for the mask, which
    # was 0.118 of 0.266 s in three merges of two 5504 × 2048 bfloat16 deltas (cProfile, one thread, 2026-12-05)
    merged = generalized_task_arithmetic(origin, deltas, weights, keep=None if consensus is None else
                                         DrawnMask(lambda i, shape, device: everything), consensus=consensus,
                                         normalize=normalize, lambda_=lambda_, dtype=arithmetic)
    return merged.add_(base.to(arithmetic)).to(base.dtype)


def masked_by_rules(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                    rules: Sequence[TopK], offset: int, *, consensus: Consensus | None, normalize: bool,
                    lambda_: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`generalized_task_arithmetic` of a piece of a tensor (flat entries from ``offset``) whose models'
    task vectors are masked by their top-k ``rules``, found over the whole tensor (TIES, Breadcrumbs streamed
    by the engine): the compiled loops where they apply, else the torch formula; the same bits either way."""
    if len(tensors) != len(weights) or len(rules) != len(tensors):
        raise ValueError(f"got {len(tensors)} tensors, {len(weights)} weights and {len(rules)} rules")
    arithmetic = arithmetic_dtype(base, dtype)
    if tensors and normalize and consensus is None:
        weight_sum(weights, "normalize")  # the one rule: weights summing to zero are refused
    fused = masked_task_arithmetic(base, tensors, [rounded(w, arithmetic) for w in weights], rules, offset,
                                   consensus, normalize, lambda_, arithmetic, _masked_by_rules_torch, _probe_rules)
    return fused if fused is not None else _masked_by_rules_torch(base, tensors, weights, rules, offset, consensus,
                                                                  normalize, lambda_, dtype)


def _keys_formula(base: torch.Tensor, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    keys = magnitude_keys(task_vector(tensor, base, dtype))
    return None if keys is None else keys.reshape(-1)


def task_vector_keys(tensor: torch.Tensor, base: torch.Tensor, dtype: torch.dtype,
                     out: torch.Tensor | None = None) -> torch.Tensor | None:
    """The flat magnitude keys (:func:`~mergelab.methods.sparsify.magnitude_keys`) of the task vector
    ``tensor − base`` computed in ``dtype``, written into ``out`` when given (a flat tensor of the keys' dtype;
    then returned); None where an entry is NaN or keys cannot order the magnitudes (float64, off the CPU).
    One compiled pass where the loops are loaded (mergelab.kernels.masked), torch's three otherwise."""
    found = checked_task_vector_keys(tensor, base, dtype, out)
    return None if found is None else found[0]


def checked_task_vector_keys(tensor: torch.Tensor, base: torch.Tensor, dtype: torch.dtype,
                             out: torch.Tensor | None = None) -> tuple[torch.Tensor, bool] | None:
    """:func:`task_vector_keys`, and whether every key is below +Inf's: then every entry of ``tensor`` and
    ``base`` is finite too (an Inf or NaN in either makes their difference Inf or NaN; a finite difference that
    overflows to Inf proves nothing, and the caller scans)."""
    key_dtype = KEY_DTYPES.get(dtype)
    if key_dtype is not None:
        into = out if out is not None else torch.empty(base.numel(), dtype=key_dtype)
        top = magnitude_keys_into(base, tensor, dtype, into, _keys_formula)
        if top is not None:
            inf_bits = KEY_SPECS[dtype][1]
            return (into, top < inf_bits) if top <= inf_bits else None  # above +Inf's bits: a NaN
    keys = _keys_formula(base, tensor, dtype)
    if keys is None:
        return None
    finite = keys.numel() == 0 or int(keys.amax()) < KEY_SPECS[dtype][1]  # keys exist only for these dtypes
    return (keys if out is None else out.copy_(keys)), finite


def rules_of(base: torch.Tensor, tensors: Sequence[torch.Tensor], dtype: torch.dtype | None,
             rule: Callable[[int, torch.Tensor], TopK | None]) -> list[TopK] | None:
    """Each model's top-k rule, ``rule(i, keys)`` on the magnitude keys of its whole task vector (computed in
    the arithmetic ``dtype``), for :func:`masked_by_rules`; None where a model has none (NaN, float64, a rule
    that needs the real sort), or where the compiled loops are not loaded (the mask is then found as before)."""
    if loops() is None:
        return None
    arithmetic = arithmetic_dtype(base, dtype)
    rules = []
    for i, tensor in enumerate(tensors):
        keys = task_vector_keys(tensor, base, arithmetic)
        found = rule(i, keys) if keys is not None else None
        if found is None:
            return None
        rules.append(found)
    return rules


def _masked_by_rules_torch(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                           rules: Sequence[TopK], offset: int, consensus: Consensus | None, normalize: bool,
                           lambda_: float, dtype: torch.dtype | None) -> torch.Tensor:
    def keep(i: int, delta: torch.Tensor) -> torch.Tensor:
        return rules[i].apply(delta, offset).reshape(delta.shape)

    return generalized_task_arithmetic(base, tensors, weights, keep=keep, consensus=consensus, normalize=normalize,
                                       lambda_=lambda_, dtype=dtype)


def _probe_rules(base: torch.Tensor, tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> list[list[TopK | None]]:
    """TIES' and Breadcrumbs' rules for the compiled loop's probe inputs (:mod:`mergelab.kernels.masked`)."""
    keys = [magnitude_keys(task_vector(x, base, dtype)) for x in tensors]
    if any(k is None for k in keys):
        return []
    densities = [0.3, 0.6, 0.05, 0.5][: len(keys)]
    return [[topk_of_keys(k.clone(), d) for k, d in zip(keys, densities, strict=True)],  # type: ignore[union-attr]
            [band_of_keys(k.clone(), d, 0.05) for k, d in zip(keys, densities, strict=True)]]  # type: ignore[union-attr]


def _weighted_task_vector(tensor: torch.Tensor, base: torch.Tensor, weight: float, dtype: torch.dtype, i: int,
                          sparsify: Sparsifier | None) -> torch.Tensor:
    """``w_i · sparsify(θ_i − base)`` in ``dtype``, a fresh tensor."""
    delta = task_vector(tensor, base, dtype)
    return (sparsify(i, delta) if sparsify is not None else delta).mul_(weight)


def _weighted_task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                           divisor: float | None, lambda_: float, dtype: torch.dtype,
                           sparsify: Sparsifier | None = None) -> torch.Tensor:
    """``base + λ Σ_i w_i s_i(θ_i − base) / divisor`` (no division when ``divisor`` is None; ``s_i``:
    ``sparsify``, or none): task arithmetic in eager torch, each step rounded to ``dtype``, the sum over
    models accumulated as :func:`accumulator_dtype` says (mergelab.kernels.weighted_sums gives the same bits
    without sparsification)."""
    total = torch.zeros_like(base, dtype=accumulator_dtype(dtype))
    for i, (tensor, weight) in enumerate(zip(tensors, weights, strict=True)):
        total += _weighted_task_vector(tensor, base, weight, dtype, i, sparsify)
    mixed = total.to(dtype)
    del total
    if divisor is not None:
        divide_as_the_cpu(mixed, divisor)
    if lambda_ != 1:
        mixed *= lambda_
    return mixed.add_(base.to(dtype)).to(base.dtype)


def _divided(delta: torch.Tensor, divisor: float) -> torch.Tensor:
    """``delta / divisor`` in place, computed in DARE's working dtype (float32 for float16) and rounded back."""
    if divisor == 1:
        return delta
    work = divide_as_the_cpu(delta.to(drop_work_dtype(delta.dtype)), divisor)
    return work if work.dtype == delta.dtype else delta.copy_(work)


def divide_as_the_cpu(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """``x /= divisor`` in place, each entry divided as torch divides on the CPU (in float32 for half
    precision). Given a Python number, torch's CUDA kernel multiplies by its reciprocal instead, which moves
    the last bit of some quotients; divided by a number on the GPU, it divides entry by entry."""
    if x.device.type == "cpu":
        return x.div_(divisor)
    opmath = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    on_device = torch.tensor(divisor, dtype=opmath, device=x.device)
    return x.div_(on_device) if opmath == x.dtype else x.copy_(x.to(opmath).div_(on_device))


def task_vector(tensor: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor − base`` in ``dtype``, as a fresh contiguous tensor the caller owns.

    Subtracted chunk by chunk: a mixed-dtype ``sub_`` (bf16 base into a float32 delta) would first convert
    the whole base, one more tensor of memory. Where nothing converts, one ``torch.sub`` into a fresh tensor:
    the same rounding of each difference, in one pass instead of a copy and a subtraction (DELLA at 3 × 0.5 GB
    bfloat16: 0.85 CPU s of the merge's 6.8 in this function, 2026-12-05).
    """
    if (tensor.dtype == base.dtype == dtype and tensor.shape == base.shape and tensor.is_contiguous()
            and base.is_contiguous()):
        return torch.sub(tensor, base)
    delta = tensor.to(dtype, copy=True, memory_format=torch.contiguous_format)
    for d, b in zip(delta.view(-1).split(_CHUNK), base.reshape(-1).split(_CHUNK), strict=True):
        d.sub_(b)
    return delta


def _disjoint_sum(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                  kept: list[tuple[torch.Tensor, torch.Tensor]] | None, positive: torch.Tensor,
                  dtype: torch.dtype, normalize: bool) -> torch.Tensor:
    """Pass 2 of the sign election: Σ_i w_i δ_i where sgn δ_i agrees with the elected sign (``positive``:
    elected ≥ 0), divided entry-wise by Σ_i w_i [agree] when ``normalize``.

    Every step is element-wise, so it runs over flat chunks: only the result is tensor-sized, which keeps
    the peak of TIES/DARE-TIES near the inputs plus two tensors. Chunking changes no bit of the result.
    """
    n = base.numel()
    acc_dtype = accumulator_dtype(dtype)
    mixed = torch.zeros(n, dtype=dtype, device=base.device)
    base_flat = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors] if kept is None else []
    masks = [nz.reshape(-1) for nz, _ in kept] if kept is not None else []
    starts = list(range(0, n, _CHUNK))
    # where each chunk's kept values begin in model i's compact value list
    offsets = [[0, *torch.tensor([int(torch.count_nonzero(c)) for c in m.split(_CHUNK)]).cumsum(0).tolist()]
               for m in masks]
    for c, a in enumerate(starts):
        b = min(n, a + _CHUNK)
        pos = positive[a:b]
        acc = torch.zeros(b - a, dtype=acc_dtype, device=base.device)
        div = torch.zeros(b - a, dtype=acc_dtype, device=base.device) if normalize else None
        for i, w in enumerate(weights):
            if kept is not None:
                wd = torch.zeros(b - a, dtype=dtype, device=base.device).masked_scatter_(
                    masks[i][a:b], kept[i][1][offsets[i][c]:offsets[i][c + 1]])
            else:
                wd = task_vector(flats[i][a:b], base_flat[a:b], dtype).mul_(w)
            # sign(wd) == elected sign (+1 where elected >= 0, else −1); zeros never agree
            agree = torch.where(pos, wd > 0, wd < 0)
            acc += wd.mul_(agree)
            if div is not None:
                div.add_(agree, alpha=w)
        out = mixed[a:b]
        out.copy_(acc)  # the sum over models, rounded once to the arithmetic dtype
        if div is not None:
            rounded_div = div.to(dtype)
            rounded_div[rounded_div == 0] = 1
            out /= rounded_div
    return mixed.reshape(base.shape)


# Entries per chunk of the fused steps: temporaries stay in L2 (12 of them at most: 64 Ki entries of float32
# are 256 KiB). Its methods run on one torch thread (core.one_thread), so torch's grain size (32 Ki entries:
# two threads on 64 Ki-entry chunks were 10× slower with the cores busy) no longer bounds it. Measured on a
# TIES merge of a 2.8 Mi-entry bf16 tensor in 1 Mi-entry pieces (rules given, one thread, 2026-12-02): 77 ms
# at 32 Ki entries, 58 at 64 Ki and 128 Ki, 66 at 256 Ki; half as many Python calls per piece also means half
# as many turns of the interpreter lock when two pieces merge side by side (merge/engine.py).
_FUSED_CHUNK = 1 << 16

# Same-width integer views of the dtypes whose sign and zero tests the fused path does on bit patterns,
# and the bits of 1.0 in each (element-wise comparisons into bool tensors cost ~10 ms per 8 Mi entries on
# one core, integer and/xor/shift ~1 ms)
_BITS = {torch.bfloat16: (torch.int16, 0x3F80), torch.float16: (torch.int16, 0x3C00),
         torch.float32: (torch.int32, 0x3F800000)}


def _masked_consensus(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                      keep: Masker, divisors: Sequence[float], consensus: Consensus, normalize: bool,
                      lambda_: float, dtype: torch.dtype) -> torch.Tensor:
    """The consensus merge of :func:`generalized_task_arithmetic` where sparsification is a mask.

    The masks need each whole task vector (a top-k is over the tensor); everything after them is
    element-wise, so it runs chunk by chunk with each chunk's task vectors recomputed (one subtraction)
    instead of kept: the same arithmetic on the same values as the two-pass form, hence the same bits,
    with one mask (a byte per entry) per model held instead of compact deltas and a float32 vote, and
    every temporary small enough to stay in cache (the two-pass form streamed about 20 tensor-sized
    temporaries through memory). A dropped entry is +0 here where it may be -0 there, which no result can
    see: every sum starts at +0 and zeros never agree with a sign. Kept entries are divided by
    ``divisors[i]`` before the weight, as DARE's rescale does (:func:`_divided`).
    """
    n = base.numel()

    def bound_term(i: int, delta: torch.Tensor) -> float:  # w_i max|δ_i| / divisor_i
        return float(delta.abs().max()) / divisors[i] * abs(weights[i]) if n else 0.0

    # the compiled loop needs no overflow bound: with it loaded, the bound is found only where it declines
    compiled = loops() is not None
    masks, bound = [], 0.0
    for i in range(len(weights)):
        if compiled and isinstance(keep, DrawnMask):
            masks.append(keep.draw(i, base.shape, base.device).reshape(-1))
            continue
        delta = task_vector(tensors[i], base, dtype)
        masks.append(keep(i, delta).reshape(-1))  # booleans
        bound += 0.0 if compiled else bound_term(i, delta)
        del delta
    fused = masked_consensus_with_masks(base, tensors, weights, masks, divisors, consensus, normalize, lambda_,
                                        dtype, _masked_consensus_float) if compiled else None
    if fused is not None:
        return fused.reshape(base.shape)
    if compiled:
        bound = sum(bound_term(i, task_vector(t, base, dtype)) for i, t in enumerate(tensors))
    bits = _BITS.get(dtype)
    same = all(t.dtype == dtype for t in (base, *tensors))
    # the bit tests read signs and zeros off the patterns, which NaN would fool: only where no weighted
    # task vector nor any sum of them can overflow (bound: Σ_i w_i max|δ_i| far below the dtype's max)
    if bits is None or not same or not math.isfinite(bound) or bound >= torch.finfo(dtype).max / 4:
        return _masked_consensus_float(base, tensors, weights, masks, divisors, consensus, normalize, lambda_,
                                       dtype)
    masks = [m.to(torch.int8).neg_() for m in masks]  # -1 (all bits) kept, 0 dropped
    int_dtype, one = bits
    shift = torch.iinfo(int_dtype).bits - 1
    mag = torch.iinfo(int_dtype).max
    acc_dtype = accumulator_dtype(dtype)
    out = torch.empty(n, dtype=dtype, device=base.device)
    base_flat = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    step = _FUSED_CHUNK if base.device.type == "cpu" else max(n, 1)
    for a in range(0, n, step):
        b = min(n, a + step)
        base_chunk = base_flat[a:b]
        # weighted task vectors, dropped entries zeroed, as integer bit patterns
        wds = [_divided(torch.sub(flat[a:b], base_chunk), divisor).mul_(w).view(int_dtype).bitwise_and_(mask[a:b])
               for flat, w, mask, divisor in zip(flats, weights, masks, divisors, strict=True)]
        if consensus == "sum" and len(wds) == 2:
            # one addition in the dtype is the float32 sum rounded once, as the accumulator gives it
            vote = (wds[0].view(dtype) + wds[1].view(dtype)).view(int_dtype)
        else:
            total = torch.zeros(b - a, dtype=acc_dtype, device=base.device)
            for wd in wds:
                total += wd.view(dtype) if consensus == "sum" else wd.view(dtype).sign()
            # the vote is rounded to the arithmetic dtype before its sign is read, as mergekit's sum is
            vote = total.to(dtype).view(int_dtype)
        # all bits set where the elected sign is negative (vote < 0; -0 counts as ≥ 0)
        not_negative = ~((vote >> shift) & (vote & mag).neg_().bitwise_right_shift_(shift))
        acc = torch.zeros(b - a, dtype=acc_dtype, device=base.device)
        div = torch.zeros(b - a, dtype=acc_dtype, device=base.device) if normalize else None
        for wd, w in zip(wds, weights, strict=True):
            # agree: wd is nonzero and its sign is the elected one (all bits set), else 0
            agree = (wd & mag).neg_().bitwise_right_shift_(shift).bitwise_and_((wd >> shift) ^ not_negative)
            acc += wd.bitwise_and_(agree).view(dtype)
            if div is not None:
                weight_bits = torch.tensor(w, dtype=dtype).view(int_dtype)
                div += agree.bitwise_and_(weight_bits).view(dtype)
        mixed = acc.to(dtype)  # the sum over models, rounded once to the arithmetic dtype
        if div is not None:
            rounded = div.to(dtype).view(int_dtype)  # never -0: a sum from +0 of w_i and +0
            zero = (rounded & mag).neg_().bitwise_right_shift_(shift).bitwise_not_()
            mixed /= rounded.bitwise_or_(zero.bitwise_and_(one)).view(dtype)  # 0 → 1: nothing agreed
        if lambda_ != 1:
            mixed *= lambda_
        torch.add(mixed, base_chunk, out=out[a:b])
    return out.reshape(base.shape)


def _masked_consensus_float(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                            masks: list[torch.Tensor], divisors: Sequence[float], consensus: Consensus,
                            normalize: bool, lambda_: float, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_masked_consensus`'s chunks with float comparisons: any dtype, any values (NaN, overflow)."""
    n = base.numel()
    acc_dtype = accumulator_dtype(dtype)
    out = torch.empty(n, dtype=base.dtype, device=base.device)
    base_flat = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    step = _FUSED_CHUNK if base.device.type == "cpu" else max(n, 1)
    for a in range(0, n, step):
        b = min(n, a + step)
        elected = torch.zeros(b - a, dtype=acc_dtype, device=base.device)
        wds = []
        for i, w in enumerate(weights):
            wd = _divided(task_vector(flats[i][a:b], base_flat[a:b], dtype).masked_fill_(~masks[i][a:b], 0),
                          divisors[i]).mul_(w)
            elected += wd if consensus == "sum" else wd.sign()
            wds.append(wd)
        positive = elected.to(dtype) >= 0
        acc = elected.zero_()
        div = torch.zeros(b - a, dtype=acc_dtype, device=base.device) if normalize else None
        for wd, w in zip(wds, weights, strict=True):
            agree = torch.where(positive, wd > 0, wd < 0)
            acc += wd.mul_(agree)
            if div is not None:
                div.add_(agree, alpha=w)
        mixed = acc.to(dtype)
        if div is not None:
            rounded_div = div.to(dtype)
            rounded_div[rounded_div == 0] = 1
            mixed /= rounded_div
        if lambda_ != 1:
            mixed *= lambda_
        out[a:b] = mixed.add_(base_flat[a:b].to(dtype))
    return out.reshape(base.shape)
