"""Recompute BatchNorm running statistics after interpolating weights (the reset step of REPAIR).

Averaging two aligned networks averages their BatchNorm running means and variances too, but the averaged
network's activations have different statistics (interpolated units are less correlated, so their variance
collapses: Jordan et al., REPAIR, ICLR 2023, arXiv:2211.08403). Re-estimating the statistics on a few
training batches, with the weights frozen, removes most of the resulting barrier for BN networks.
"""

from __future__ import annotations

import torch
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) for m in model.modules())


@torch.no_grad()
def reset_bn_stats(model: nn.Module, x: torch.Tensor, *, num_batches: int = 10, batch_size: int = 128,
                   seed: int = 0) -> int:
    """Re-estimate every BatchNorm's running statistics on ``num_batches`` random batches of ``x``.

    Uses the exact average over the batches (``momentum=None``) instead of an exponential one, so the
    result does not depend on how many batches came before. The batches are drawn without replacement with
    ``seed``. Returns how many examples were used; a model without BatchNorm is left untouched (0).
    """
    norms = [m for m in model.modules() if isinstance(m, _BN)]
    if not norms:
        return 0
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=gen)[: num_batches * batch_size]
    saved = [(m, m.momentum) for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        device = next(model.parameters()).device
        for start in range(0, len(order), batch_size):
            batch = x[order[start:start + batch_size]]
            if batch.shape[0] < 2:  # train-mode BN needs two values per channel
                break
            model(batch.to(device))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return len(order)
