"""Task arithmetic: add weighted task vectors to the base.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv:2212.04089).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.methods.registry import MergeMethod, Param, register
from mergelab.methods.task_vectors import generalized_task_arithmetic


def task_arithmetic_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
                          lambda_: float = 1.0, normalize: bool = False,
                          dtype: torch.dtype | None = None) -> torch.Tensor:
    """``θ_base + λ Σ_i w_i (θ_i − θ_base)`` (divided by ``Σ w_i`` when ``normalize``), computed in
    ``dtype`` (float32 when None)."""
    return generalized_task_arithmetic(base, tensors, weights, normalize=normalize, lambda_=lambda_,
                                       dtype=dtype)


register(MergeMethod(
    name="task_arithmetic",
    also_in=("mergekit", "FusionBench"),
    function=task_arithmetic_merge,
    params=(
        Param("weight", float, 1.0, scope="model", help="scale of this model's task vector"),
        Param("lambda", float, 1.0, help="global scale of the summed task vectors"),
        Param("normalize", bool, False, help="divide the sum by Σ w_i"),
        # mergekit's task_arithmetic is its generalized task arithmetic without sparsification: it accepts
        # these and they change nothing (checked: tests/test_mergekit_examples.py)
        Param("rescale", bool, False, arg=None,
              help="accepted for mergekit compatibility; no effect (nothing is sparsified)"),
        Param("int8_mask", bool, False, arg=None, help="accepted for mergekit compatibility; no effect"),
    ),
    summary="Base plus the weighted sum of task vectors θ_i − θ_base.",
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv:2212.04089)",
    elementwise=True,
    propagates_nonfinite=True,
    compiled=True,
    formula="θ = θ_0 + λ Σ_i w_i (θ_i − θ_0)",
))
