"""Templates: a linear classifier's weight vector for class k, reshaped to the input, looks like class k.

For a linear model logits = W x + b, row W_k is a *template* matched against the input by a dot product.
Averaging two models averages their templates; averaging templates of different classes (i and i+5, as
in the paper's Fig. 2) superimposes two patterns — the picture of why merging unrelated weights interferes.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Dataset(Protocol):
    """What :func:`class_means` reads (a :class:`mergelab.zoo.data.Dataset` fits; analysis never imports the zoo)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    norm: tuple[float, float]


def class_means(data: Dataset, *, pixels: bool = True) -> torch.Tensor:
    """(K, *input_shape) mean input per class; ``pixels`` undoes the normalisation (images in [0, 1])."""
    mean, std = data.norm
    x = data.x * std + mean if pixels else data.x
    return torch.stack([x[data.y == k].mean(0) for k in range(data.num_classes)])


def linear_templates(head: nn.Linear, input_shape: tuple[int, ...]) -> torch.Tensor:
    """(K, *input_shape): each class's weight row reshaped to the input."""
    return head.weight.detach().reshape(head.out_features, *input_shape).clone()


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(K, K) cosine similarities between the rows of ``a`` and ``b`` (flattened)."""
    a = nn.functional.normalize(a.flatten(1).double(), dim=1)
    b = nn.functional.normalize(b.flatten(1).double(), dim=1)
    return a @ b.T


def template_match(templates: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cosine of each template with each *centred* class mean (μ_k − μ), and the fraction of classes whose
    template is closest to its own class. Centring removes what every class shares (the bias handles it)."""
    centred = means - means.mean(0, keepdim=True)
    sims = cosine_matrix(templates, centred)
    matched = float((sims.argmax(1) == torch.arange(sims.shape[0])).double().mean())
    return sims, matched


def first_conv_kernels(model: nn.Module) -> torch.Tensor:
    """(C_out, kh, kw) kernels of the first convolution (input channel 0)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Conv1d):
            w = m.weight.detach()
            return w[:, 0].clone()
    raise ValueError("model has no convolution")
