"""Model Stock: interpolate the average of fine-tuned models towards the base by a ratio set by their angle.

Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024 (arXiv:2403.19522).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.methods.registry import MergeMethod, Param, TensorInputs, register


def model_stock_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
                      filter_wise: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``θ = t·θ_avg + (1−t)·θ_0`` with ``t = N cos φ / (1 + (N−1) cos φ)``.

    ``cos φ`` is the mean pairwise cosine between the task vectors ``θ_i − θ_0`` (per row when
    ``filter_wise``), as mergekit does for N > 2. Computed in ``dtype`` (mergekit's arithmetic dtype;
    float32 when None, float64 for float64 inputs).
    """
    if len(tensors) < 2:
        raise ValueError("model_stock needs a base model and at least two other models")
    dtype = dtype or (torch.float64 if base.dtype == torch.float64 else torch.float32)
    w0 = base.to(dtype)
    if filter_wise:
        flat = (lambda x: x.unsqueeze(0)) if w0.dim() == 1 else (lambda x: x.reshape(x.shape[0], -1))
    else:
        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(1, -1)
    offsets = [flat(t.to(dtype) - w0) for t in tensors]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)
            cos = (offsets[i] * offsets[j]).sum(dim=-1) / norms.clamp(min=1e-6)
            cosines.append(cos.clamp(-1, 1))
    cos_phi = torch.stack(cosines).mean(dim=0)
    n = len(tensors)
    ratio = (n * cos_phi) / (1 + (n - 1) * cos_phi)
    avg = sum(flat(t.to(dtype)) for t in tensors) / n
    merged = ratio.unsqueeze(-1) * avg + (1 - ratio.unsqueeze(-1)) * flat(w0)
    return merged.reshape(base.shape).to(base.dtype)


def _adapter(x: TensorInputs) -> torch.Tensor:
    assert x.base is not None
    return model_stock_merge(x.base, x.tensors, filter_wise=x.params["filter_wise"], dtype=x.dtype)


register(MergeMethod(
    name="model_stock",
    also_in=("mergekit", "FusionBench"),
    adapter=_adapter,
    function=model_stock_merge,
    params=(Param("filter_wise", bool, False, help="one ratio per output row instead of per tensor"),),
    summary="Average of fine-tuned models pulled towards the base by a ratio from their mutual angle.",
    paper="Jang et al. 2024, Model Stock (arXiv:2403.19522)",
    formula="θ = t θ_avg + (1−t) θ_0,  t = N cos φ / (1 + (N−1) cos φ)",
    min_models=2,
))
