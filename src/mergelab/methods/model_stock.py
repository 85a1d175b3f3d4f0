"""Model Stock: interpolate the average of fine-tuned models towards the base by a ratio set by their angle.

Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024 (arXiv:2403.19522).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from mergelab.methods.registry import MergeMethod, Param, register

# mergekit's guard: where 1 + (N−1) cos φ is this close to zero there is no finite estimate of t, and the
# base is kept (t = 0) instead of amplifying opposing task vectors without bound.
SINGULAR = 1e-6


def model_stock_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
                      filter_wise: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``θ = t·θ_avg + (1−t)·θ_0`` with ``t = N cos φ / (1 + (N−1) cos φ)``.

    ``cos φ`` is the mean pairwise cosine between the task vectors ``θ_i − θ_0`` (per row when
    ``filter_wise``), as mergekit does for N > 2, in ``dtype`` (mergekit's arithmetic dtype; float32 when
    None, float64 for float64 inputs). Where ``|1 + (N−1) cos φ| < 1e-6`` the base is kept (mergekit's
    guard); a ``t`` outside [0, 1] (task vectors at an obtuse mean angle: the merge moves away from the
    models' average, and |t| grows without bound as cos φ nears −1/(N−1)) is merged as the formula says but
    warned about. Empty tensors are returned as the base.
    """
    if len(tensors) < 2:
        raise ValueError("model_stock needs a base model and at least two other models")
    if base.numel() == 0:
        return base.clone()
    dtype = dtype or (torch.float64 if base.dtype == torch.float64 else torch.float32)
    w0 = base.to(dtype)
    if filter_wise and w0.dim() >= 2:
        def flat(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(x.shape[0], -1)
    else:  # one ratio for the tensor (a 1-D or 0-dim tensor is one row, as in mergekit)
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
    denominator = 1 + (n - 1) * cos_phi
    singular = denominator.abs() < SINGULAR
    ratio = torch.where(singular, torch.zeros_like(cos_phi),
                        (n * cos_phi) / torch.where(singular, torch.ones_like(denominator), denominator))
    low, high = float(ratio.min()), float(ratio.max())
    if low < 0 or high > 1:
        warnings.warn(f"model_stock: interpolation ratio t = {low:.3g}" + (f"..{high:.3g}" if high != low else "")
                      + f" is outside [0, 1] for a tensor of shape {list(base.shape)}: its task vectors point in "
                      "opposing directions (mean cos φ < 0), so the merge moves away from their average and "
                      "|t| grows without bound as cos φ nears −1/(N−1). Check that every model was fine-tuned "
                      "from this base, or use another method", stacklevel=2)
    avg = sum(flat(t.to(dtype)) for t in tensors) / n
    merged = ratio.unsqueeze(-1) * avg + (1 - ratio.unsqueeze(-1)) * flat(w0)
    return merged.reshape(base.shape).to(base.dtype)


register(MergeMethod(
    name="model_stock",
    also_in=("mergekit", "FusionBench"),
    function=model_stock_merge,
    params=(Param("filter_wise", bool, False, help="one ratio per output row instead of per tensor"),),
    summary="Average of fine-tuned models pulled towards the base by a ratio from their mutual angle.",
    paper="Jang et al. 2024, Model Stock (arXiv:2403.19522)",
    formula="θ = t θ_avg + (1−t) θ_0,  t = N cos φ / (1 + (N−1) cos φ)",
    min_models=2,
))
