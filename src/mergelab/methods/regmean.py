"""RegMean: merge linear layers in closed form so the merged layer best matches every model on its inputs.

Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023
(arXiv:2212.09849). For a linear layer ``y = W x`` (PyTorch layout ``W: [out, in]``) and Gram matrices
``G_i = X_iᵀ X_i`` of each model's layer inputs, ``min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²`` gives
``Wᵀ = (Σ_i G_i)⁻¹ Σ_i G_i W_iᵀ``. Off-diagonal entries are scaled by ``α`` (``G̃ = α G + (1−α) diag G``),
which the paper found necessary for stability. Tensors without a Gram matrix (biases, norms, embeddings)
get the plain average. The Grams come from :func:`mergelab.statistics.input_grams`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.methods.registry import MergeMethod, Param, register


def regmean_merge(tensors: Sequence[torch.Tensor], grams: Sequence[torch.Tensor | None] | None = None, *,
                  alpha: float = 0.9) -> torch.Tensor:
    """``Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ`` for 2-D weights with Grams; the mean otherwise (no ``grams``, or a
    None among them: a tensor that is not a linear layer's weight has none)."""
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    if first.dim() != 2 or grams is None or any(g is None for g in grams):
        return (sum(t.to(dtype) for t in tensors) / len(tensors)).to(first.dtype)
    if len(grams) != len(tensors):
        raise ValueError(f"got {len(tensors)} weights but {len(grams)} Gram matrices")
    n_in = first.shape[1]
    lhs = torch.zeros(n_in, n_in, dtype=torch.float64, device=first.device)
    rhs = torch.zeros(n_in, first.shape[0], dtype=torch.float64, device=first.device)
    for w, g in zip(tensors, grams, strict=True):
        assert g is not None
        if g.shape != (n_in, n_in):
            raise ValueError(f"Gram matrix of shape {tuple(g.shape)} for a weight of shape {tuple(w.shape)}")
        g = g.to(device=first.device, dtype=torch.float64)
        g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        lhs += g
        rhs += g @ w.to(torch.float64).T
    # lstsq rather than solve: a layer whose inputs never vary (dead features) makes Σ G singular
    merged_t = torch.linalg.lstsq(lhs, rhs).solution if lhs.device.type == "cpu" else torch.linalg.pinv(lhs) @ rhs
    return merged_t.T.to(first.dtype).contiguous()


register(MergeMethod(
    name="regmean",
    also_in=("FusionBench",),
    function=regmean_merge,
    inputs={"grams": "stats"},
    params=(Param("alpha", float, 0.9, low=0.0, high=1.0, help="scale of the Gram matrices' off-diagonal"),),
    summary="Closed-form least-squares merge of linear layers from each model's input Gram matrices.",
    paper="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (arXiv:2212.09849)",
    formula="Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ,  G̃ = α G + (1−α) diag G",
    base="ignored",
    needs_stats=True,
))
