"""Passthrough: copy one input unchanged, optionally scaled (mergekit's building block of frankenmerges).

With layer-stacking ``slices`` each output layer comes from one source layer; ``scale`` multiplies it (e.g.
0 to silence a duplicated block's output projection). Not a merge of several models, so no paper.
"""

from __future__ import annotations

import torch

from mergelab.methods.registry import MergeMethod, Param, register


def passthrough_merge(tensor: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale · tensor`` in the tensor's dtype (the tensor itself when ``scale`` is 1)."""
    return tensor if scale == 1.0 else tensor * scale


register(MergeMethod(
    name="passthrough",
    function=passthrough_merge,
    inputs={"tensor": "other"},
    params=(Param("scale", float, 1.0, scope="model", help="factor applied to the copied tensor"),),
    summary="Copy one model's tensors (optionally scaled): with slices, stack layers of several models.",
    paper="mergekit (arXiv:2403.13257), passthrough and layer-stacking slices",
    base="ignored",
    min_models=1,
    max_models=1,
    elementwise=True,
    formula="θ = scale · θ_1",
    also_in=("mergekit",),
))
