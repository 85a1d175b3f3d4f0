"""Data statistics that data-aware merge methods take as inputs: Fisher diagonals and layer-input Grams.

Kept apart from methods/ so that a method never touches data: compute these once per model on its own
task's data, then pass them to :func:`mergelab.merge_state_dicts` as ``stats``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


def diagonal_fisher(model: nn.Module, batches: Iterable[Batch], *, empirical: bool = False,
                    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                    max_examples: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Diagonal Fisher ``E_x E_{y~p(y|x)} [(∂ log p(y|x)/∂θ)²]`` per parameter, one example at a time.

    With ``empirical`` the label ``y`` is the dataset's; otherwise it is sampled from the model's own
    predictive distribution (the true Fisher, as in Matena & Raffel), with a seeded generator.
    ``forward(model, x)`` returns logits (default ``model(x)``).
    """
    fwd = forward or (lambda m, x: m(x))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    count = 0
    for x, y in batches:
        for i in range(x.shape[0]):
            if max_examples is not None and count >= max_examples:
                break
            model.zero_grad(set_to_none=True)
            logits = fwd(model, x[i: i + 1])
            log_probs = torch.log_softmax(logits, dim=-1)
            if empirical:
                target = y[i: i + 1]
            else:
                target = torch.multinomial(log_probs.detach().exp().cpu(), 1, generator=gen).reshape(1)
            log_probs.gather(-1, target.to(log_probs.device).reshape(1, 1)).sum().backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2
            count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if count == 0:
        raise ValueError("diagonal_fisher: no examples")
    return {n: f / count for n, f in fisher.items()}


@torch.no_grad()
def input_grams(model: nn.Module, batches: Iterable[Batch], *,
                forward: Callable[[nn.Module, torch.Tensor], object] | None = None,
                max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """``G = Xᵀ X / n`` of the inputs of every ``nn.Linear``, keyed by its weight's name (``fc.weight``).

    Inputs with extra dimensions (tokens) are flattened to rows. Averaging by ``n`` keeps models trained
    on datasets of different sizes comparable (RegMean's solution is invariant to a common scale).
    """
    fwd = forward or (lambda m, x: m(x))
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            key = f"{name}.weight" if name else "weight"

            def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: object, key: str = key) -> None:
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                grams[key] = grams.get(key, 0) + x.T @ x  # type: ignore[assignment]
                counts[key] = counts.get(key, 0) + x.shape[0]
            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for b, (x, _) in enumerate(batches):
            if max_batches is not None and b >= max_batches:
                break
            fwd(model, x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {k: (g / counts[k]).float() for k, g in grams.items()}
