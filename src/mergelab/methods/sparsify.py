"""Masks that sparsify task vectors: magnitude top-k (TIES), random drop (DARE), outlier trim (Breadcrumbs).

Masks are exact in count: ties at the threshold are broken by flat index, so the result is deterministic
and keeps exactly ``k`` entries like a sort would, at the O(n) cost of ``kthvalue`` instead of a sort.
"""

from __future__ import annotations

import torch


def topk_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``magnitude`` (any shape), ties broken by flat index."""
    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    work = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
    if work.device.type == "cpu":
        threshold = torch.kthvalue(work, n - k + 1).values
    else:  # kthvalue has no CUDA kernel for every dtype; topk does
        threshold = torch.topk(work, k, sorted=False).values.min()
    mask = work > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        ties = torch.nonzero(work == threshold).reshape(-1)[:missing]
        mask[ties] = True
    return mask.reshape(magnitude.shape)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of largest-magnitude entries (at least one when density > 0).

    Matches mergekit's ``magnitude`` sparsification: ``k = max(1, int(density * numel))``.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    return topk_mask(delta.abs(), max(1, int(density * n)))


def threshold_mask(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep entries with ``|delta| >= threshold`` (global-scope TIES: one threshold for a whole model)."""
    return delta.abs() >= threshold


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` fraction of largest entries and enough small ones to keep ``density``.

    Same counts as mergekit's ``magnitude_outliers``: keep ``int(density*n)`` entries, skipping the
    ``int(gamma*n)`` largest unless that would leave fewer than the target.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    magnitude = delta.abs()
    keep_upto = topk_mask(magnitude, n - n_bottom)
    drop_top = topk_mask(magnitude, n - n_bottom - target)
    return keep_upto & ~drop_top


def bernoulli_mask(shape: torch.Size, density: float, generator: torch.Generator,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Random keep-mask with keep probability ``density``, drawn on the CPU from ``generator``.

    Drawn on the CPU so that the same seed gives the same mask on every device.
    """
    if density >= 1:
        return torch.ones(shape, dtype=torch.bool, device=device)
    draws = torch.rand(shape, generator=generator, dtype=torch.float32)
    return (draws < density).to(device)


def generator_for(seed: int, index: int) -> torch.Generator:
    """A CPU generator for model ``index`` of a tensor whose engine-derived seed is ``seed``."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + index * 7_919) % (2**63 - 1))
    return g
