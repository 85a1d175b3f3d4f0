"""Model Stock: interpolate the average of fine-tuned models towards the base by a ratio set by their angle.

Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024 (arXiv:2403.19522).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergelab.kernels import row_reductions as row_sums_compiled
from mergelab.kernels.weighted_sums import model_stock_sum
from mergelab.methods import row_sums
from mergelab.methods.registry import FlatSource, MergeMethod, Param, ScalarPass, VouchedScalars, register

# mergekit's guard: where 1 + (N−1) cos φ is this close to zero there is no finite estimate of t, and the
# base is kept (t = 0) instead of amplifying opposing task vectors without bound.
SINGULAR = 1e-6
_CHUNK = 1 << 20  # entries per chunk of the scalar pass (float32 offsets of every model: bounded scratch)


def _arithmetic_dtype(base: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype or (torch.float64 if base.dtype == torch.float64 else torch.float32)


def _cosine(dot: torch.Tensor, norm_i: torch.Tensor, norm_j: torch.Tensor) -> torch.Tensor:
    return (dot / (norm_i * norm_j).clamp(min=1e-6)).clamp(-1, 1)


def _cosines(offsets: list[torch.Tensor]) -> list[torch.Tensor]:
    """The cosine of every pair of task vectors (rows of ``offsets``), from torch's norms and sums."""
    return [_cosine((offsets[i] * offsets[j]).sum(dim=-1), offsets[i].norm(dim=-1), offsets[j].norm(dim=-1))
            for i in range(len(offsets)) for j in range(i + 1, len(offsets))]


def _ratio(cosines: list[torch.Tensor], n: int, shape: Sequence[int], stacklevel: int = 3) -> torch.Tensor:
    """``t`` from the pairwise cosines (one per row), with mergekit's guard; warns where it leaves [0, 1]."""
    cos_phi = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (n - 1) * cos_phi
    singular = denominator.abs() < SINGULAR
    ratio = torch.where(singular, torch.zeros_like(cos_phi),
                        (n * cos_phi) / torch.where(singular, torch.ones_like(denominator), denominator))
    low, high = float(ratio.min()), float(ratio.max())
    if low < 0 or high > 1:
        warnings.warn(f"model_stock: interpolation ratio t = {low:.3g}" + (f"..{high:.3g}" if high != low else "")
                      + f" is outside [0, 1] for a tensor of shape {list(shape)}: its task vectors point in "
                      "opposing directions (mean cos φ < 0), so the merge moves away from their average and "
                      "|t| grows without bound as cos φ nears −1/(N−1). Check that every model was fine-tuned "
                      "from this base, or use another method", stacklevel=stacklevel)
    return ratio


Sums = tuple[list[torch.Tensor], list[torch.Tensor]]  # the task vectors' norms, the pairs' dot products


def _pairs(count: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(count) for j in range(i + 1, count)]


def _compiled_sums(source: FlatSource, count: int, work: torch.dtype, lanes: int | None) -> Sums | None:
    """The sums of :func:`_replayed_sums` from the compiled loop in one pass over the inputs (2.65 against
    34.6 ms per 1 Mi-entry piece of three bfloat16 models in bfloat16 steps, torch's offsets and products and
    the numpy replay: ``benchmarks/compiled_loops.py``); None where it does not apply."""
    sums = row_sums_compiled.offset_sums(count, source.numel, work, lanes)
    if sums is None:
        return None
    for base, tensors in source.chunks(_CHUNK):
        assert base is not None
        if not sums.add(base, tensors):
            return None
    return sums.results()


def _replayed_sums(source: FlatSource, count: int, work: torch.dtype, lanes: int) -> Sums:
    """Each task vector's norm and each pair's dot product, summed as torch sums a whole ``work`` row on one
    thread, from the chunks' task vectors and products (torch ops) by the numpy replay."""
    pairs = _pairs(count)
    norm_sums = row_sums.RowNorms(count, source.numel, work, lanes)
    dot_sums = row_sums.RowSums(len(pairs), source.numel, work, lanes)
    for base, tensors in source.chunks(_CHUNK):
        assert base is not None
        w0 = base.to(work)
        offsets = [t.to(work) - w0 for t in tensors]
        norm_sums.add(offsets)
        dot_sums.add([offsets[i] * offsets[j] for i, j in pairs])
    return norm_sums.results(), dot_sums.results()


def model_stock_ratio(source: FlatSource, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole-tensor step of :func:`model_stock_merge` (one ratio per tensor, not ``filter_wise``):
    ``t`` from the base and models read in flat chunks, with the norms and dot products of the task
    vectors summed as torch sums a whole row on one thread (:mod:`mergelab.methods.row_sums`), so that
    ``t`` has the bits of the whole-tensor computation. ``dtype`` as in :func:`model_stock_merge`."""
    return model_stock_scalars(source, dtype=dtype).value


def model_stock_scalars(source: FlatSource, *, dtype: torch.dtype | None = None) -> VouchedScalars:
    """:func:`model_stock_ratio`, vouching for the inputs where every task vector's norm is finite (the
    engine then skips the NaN/Inf scan of the inputs it kept: about 1 of 8.4-10.3 CPU s at 3 × 2 GB)."""
    base, tensors = source.read(0, min(source.numel, 1))  # the dtypes and the number of models
    if len(tensors) < 2:
        raise ValueError("model_stock needs a base model and at least two other models")
    assert base is not None  # model_stock requires a base
    work = _arithmetic_dtype(base, dtype)
    lanes = row_sums.lanes_for(work)
    if lanes is None or source.numel < 2 * lanes:  # not replayed: the rows whole, summed by torch itself
        base, tensors = source.read(0, source.numel)
        assert base is not None
        ratio = _ratio(_cosines([_one_row(t.to(work) - base.to(work)) for t in tensors]), len(tensors),
                       source.shape, stacklevel=4)
        return VouchedScalars(ratio, inputs_finite=False)  # a row of a few entries: not worth a proof
    sums = _compiled_sums(source, len(tensors), work, lanes) or _replayed_sums(source, len(tensors), work, lanes)
    norms = sums[0]
    return VouchedScalars(_ratio_of_sums(sums, source.shape, stacklevel=5),
                          inputs_finite=all(bool(torch.isfinite(n).all()) for n in norms))


def _ratio_of_sums(sums: Sums, shape: Sequence[int], stacklevel: int = 4) -> torch.Tensor:
    norms, dots = sums
    pairs = _pairs(len(norms))
    cosines = [_cosine(dot, norms[i], norms[j]) for (i, j), dot in zip(pairs, dots, strict=True)]
    return _ratio(cosines, len(norms), shape, stacklevel=stacklevel)  # by default, names the caller's caller


def model_stock_apply(ratio: torch.Tensor, base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
                      filter_wise: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The element-wise step of :func:`model_stock_merge`: ``t · θ_avg + (1 − t) · θ_0`` per row of
    ``ratio`` (one row unless ``filter_wise``), rounded to the base's dtype; with one ratio, any flat slice
    of the inputs gives that slice of the result. One ratio is applied in one compiled pass where it
    applies (4.8 against 9.0 ms per three 8 Mi-entry bfloat16 tensors in bfloat16 steps), else by torch."""
    work = _arithmetic_dtype(base, dtype)
    flat = _rows if filter_wise and base.dim() >= 2 else _one_row

    def formula(b: torch.Tensor, xs: Sequence[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        avg = sum(flat(x.to(work)) for x in xs) / len(xs)
        merged = t.unsqueeze(-1) * avg + (1 - t.unsqueeze(-1)) * flat(b.to(work))
        return merged.reshape(b.shape).to(b.dtype)

    fused = model_stock_sum(base, tensors, ratio, formula) if flat is _one_row and ratio.dtype == work else None
    return fused if fused is not None else formula(base, tensors, ratio)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _one_row(x: torch.Tensor) -> torch.Tensor:  # one ratio for the tensor (a 1-D or 0-dim tensor: one row)
    return x.reshape(1, -1)


def model_stock_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
                      filter_wise: bool = False, dtype: torch.dtype | None = None,
                      scalars: torch.Tensor | None = None) -> torch.Tensor:
    """``θ = t·θ_avg + (1−t)·θ_0`` with ``t = N cos φ / (1 + (N−1) cos φ)``.

    ``cos φ`` is the mean pairwise cosine between the task vectors ``θ_i − θ_0`` (per row when
    ``filter_wise``), as mergekit does for N > 2, in ``dtype`` (mergekit's arithmetic dtype; float32 when
    None, float64 for float64 inputs). Where ``|1 + (N−1) cos φ| < 1e-6`` the base is kept (mergekit's
    guard); a ``t`` outside [0, 1] (task vectors at an obtuse mean angle: the merge moves away from the
    models' average, and |t| grows without bound as cos φ nears −1/(N−1)) is merged as the formula says but
    warned about. Empty tensors are returned as the base. ``scalars``: ``t`` of the whole tensor
    (:func:`model_stock_ratio`), when ``base`` and ``tensors`` are flat pieces of it (the engine's streamed
    merge).
    """
    if len(tensors) < 2:
        raise ValueError("model_stock needs a base model and at least two other models")
    if scalars is not None:
        return model_stock_apply(scalars, base, tensors, dtype=dtype)
    if base.numel() == 0:
        return base.clone()
    work = _arithmetic_dtype(base, dtype)
    flat = _rows if filter_wise and base.dim() >= 2 else _one_row
    # one ratio on one torch thread (the engine's merges): torch's sums, from the compiled loop where it applies
    sums = (_compiled_sums(FlatSource.of(base, tensors), len(tensors), work, row_sums.lanes_for(work))
            if flat is _one_row and torch.get_num_threads() == 1 else None)
    if sums is not None:
        ratio = _ratio_of_sums(sums, base.shape)
    else:
        w0 = base.to(work)
        ratio = _ratio(_cosines([flat(t.to(work) - w0) for t in tensors]), len(tensors), base.shape)
    return model_stock_apply(ratio, base, tensors, filter_wise=filter_wise, dtype=dtype)


def _streams(params: Mapping[str, Any], dtype: torch.dtype) -> bool:
    """One ratio per tensor, in an arithmetic dtype whose sums :mod:`~mergelab.methods.row_sums` replays
    (float32; the config's bfloat16): filter-wise ratios and other dtypes merge whole tensors."""
    return (not params["filter_wise"] and dtype in row_sums.SUPPORTED
            and all(row_sums.replicates(d) for d in {torch.float32, dtype}))


register(MergeMethod(
    name="model_stock",
    also_in=("mergekit", "FusionBench"),
    function=model_stock_merge,
    params=(Param("filter_wise", bool, False, help="one ratio per output row instead of per tensor"),),
    summary="Average of fine-tuned models pulled towards the base by a ratio from their mutual angle.",
    paper="Jang et al. 2024, Model Stock (arXiv:2403.19522)",
    formula="θ = t θ_avg + (1−t) θ_0,  t = N cos φ / (1 + (N−1) cos φ)",
    min_models=2,
    scalar_pass=ScalarPass(model_stock_scalars, applies=_streams),
    compiled=True,
))
