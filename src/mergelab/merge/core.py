"""Merge one tensor name with parameters resolved for it: call the method's adapter. Shared by the engine and the
API, which resolve each tensor's parameters once (merge/plan.py, merge/state_dicts.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from mergelab.merge.params import ResolvedParams
from mergelab.methods.registry import FlatSource, MergeMethod, TensorInputs, VouchedMerge, VouchedScalars


def tensor_seed(seed: int, tensor_name: str) -> int:
    """Seed for one tensor, from the merge seed and the tensor's name (order-independent, reproducible)."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**62 - 1)


def passthrough(base: torch.Tensor | None, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Non-floating tensors (BatchNorm counters, position ids) are copied from the base or the first model."""
    return base if base is not None else tensors[0]


def merge_tensor(method: MergeMethod, name: str, tensors: Sequence[torch.Tensor], **kwargs: Any) -> torch.Tensor:
    """Merge the tensors of one name (or one flat piece of them): :func:`vouched_merge_tensor`'s result."""
    return vouched_merge_tensor(method, name, tensors, **kwargs).merged


def vouched_merge_tensor(
    method: MergeMethod,
    name: str,
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    params: ResolvedParams | None,
    seed: int,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    stats: Sequence[Any] | None = None,
    thresholds: Sequence[float] | None = None,
    topk: Sequence[Any] | None = None,
    offset: int = 0,
    scalars: Any = None,
) -> VouchedMerge:
    """Merge the tensors of one name (or one flat piece of them) with ``params``, resolved for that name
    (:func:`~mergelab.merge.params.resolve_parameters`; None only for a tensor that is not floating point).
    A piece of a tensor merged after a whole-tensor pass gets that pass's result: ``topk`` rules (and the
    piece's ``offset``) or the method's ``scalars`` (:func:`tensor_scalars`). With whether the method's pass
    proved every input entry finite (:attr:`~mergelab.methods.registry.MergeMethod.vouching`; never, for a
    method that does not say)."""
    reference = base if base is not None else tensors[0]
    if not reference.is_floating_point():
        return VouchedMerge(passthrough(base, tensors), inputs_finite=False)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return prepared(x, device, compute_dtype)

    if params is None:
        raise ValueError(f"tensor '{name}': no parameters were resolved for this floating-point tensor")
    inputs = TensorInputs(
        name=name,
        tensors=[prepare(x) for x in tensors],
        model_params=params.model_params,
        params=params.params,
        base=prepare(base) if base is not None else None,
        seed=tensor_seed(seed, name),
        stats=stats,
        thresholds=thresholds,
        dtype=compute_dtype,
        topk=topk,
        offset=offset,
        scalars=scalars,
    )
    adapter = method.vouching_adapter or method.adapter
    if method.elementwise or (inputs.base if inputs.base is not None else inputs.tensors[0]).device.type != "cpu":
        result = adapter(inputs)
    else:
        with one_thread():
            result = adapter(inputs)
    vouched = result if isinstance(result, VouchedMerge) else VouchedMerge(result, inputs_finite=False)
    if compute_dtype is None and reference.dtype in FLOAT8_DTYPES:
        # float8 inputs were computed on float32 copies (see prepare): the result is in the inputs' dtype again
        return VouchedMerge(vouched.merged.to(reference.dtype), vouched.inputs_finite)
    return vouched


def tensor_scalars(method: MergeMethod, name: str, source: FlatSource, *, params: ResolvedParams,
                   compute_dtype: torch.dtype | None = None, seed: int = 0) -> Any:
    """The scalar pass of ``method`` (:attr:`~mergelab.methods.registry.MergeMethod.scalar_pass`) over the
    inputs of tensor ``name``, read from ``source`` (ranges already as :func:`prepared` makes them), on one
    thread as :func:`merge_tensor` runs it: its sums are the whole-tensor merge's, bit for bit. ``seed``: the
    merge seed; the pass gets the tensor's (:func:`tensor_seed`), as :func:`merge_tensor` gives the method."""
    return vouched_scalars(method, name, source, params=params, compute_dtype=compute_dtype, seed=seed).value


def vouched_scalars(method: MergeMethod, name: str, source: FlatSource, *, params: ResolvedParams,
                    compute_dtype: torch.dtype | None = None, seed: int = 0) -> VouchedScalars:
    """:func:`tensor_scalars` with what the pass vouches for: whether its sums proved every input entry finite
    (never, for a pass that does not say)."""
    adapter = method.scalar_adapter
    if adapter is None:
        raise ValueError(f"method '{method.name}' has no scalar pass")
    inputs = TensorInputs(name=name, tensors=[], model_params=params.model_params, params=params.params,
                          dtype=compute_dtype, source=source, seed=tensor_seed(seed, name))
    with one_thread():
        result = adapter(inputs)
    return result if isinstance(result, VouchedScalars) else VouchedScalars(result, inputs_finite=False)


def prepared(x: torch.Tensor, device: torch.device | None, compute_dtype: torch.dtype | None) -> torch.Tensor:
    """An input as the method gets it: on ``device``, in ``compute_dtype`` (float8: float32)."""
    if device is not None:
        x = x.to(device, non_blocking=True)
    if compute_dtype is not None:
        return x.to(compute_dtype)
    # torch refuses to promote float8 in arithmetic ("Promotion for Float8 Types is not supported"):
    # methods compute on float32 copies, and the engine casts the result back to the output dtype
    return x.float() if x.dtype in FLOAT8_DTYPES else x


FLOAT8_DTYPES = frozenset({torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu, torch.float8_e4m3fnuz,
                           torch.float8_e5m2fnuz})


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed torch ops on one CPU thread, so that their result does not depend on the thread count.

    A reduction (norm, dot, sum) or a LAPACK call (SVD) splits its work by the number of threads and adds the
    partial results in that order: SLERP, Model Stock and CART gave results differing in the last bits
    between 1 and 2 threads (tests/test_determinism.py). Element-wise methods are exact on any thread count
    and keep their threads. The setting is process-wide (measured: another thread sees it too); what runs
    beside the merge (reading, the NaN/Inf scan by min/max) gives the same result on any thread count.
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
