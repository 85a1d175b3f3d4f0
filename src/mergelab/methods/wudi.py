"""WUDI-Merging: data-free interference minimisation guided by the task vectors.

Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task
Vectors", ICML 2025 (arXiv:2503.08099). For a linear layer the rows of a task vector ``τ_i`` approximately
span that task's inputs, so they stand in for data: per 2-D weight the merged task vector ``τ_m`` minimises

    L(τ_m) = Σ_i ‖(τ_m − τ_i) τ_iᵀ‖_F² / ‖τ_i‖_F²,

the interference ``τ_m`` causes on each task's (proxy) inputs, each task weighted by its inverse squared
norm. As in the paper and FusionBench 0.2.33's implementation (``fusion_bench.method.wudi.wudi_merging``),
``τ_m`` starts from the sum ``Σ_i τ_i`` and takes ``steps`` Adam steps (that function's defaults: 300 steps,
learning rate 1e-5, no weight decay; FusionBench's shipped config uses 400 steps); ``θ = θ_0 + λ τ_m`` with
``λ = 1`` (the paper uses no rescaling). Other tensors (biases, norms, convolutions) get the mean of the task
vectors, as in that implementation.

Scale: an Adam step moves each entry by about ``lr`` whatever the gradient's size, so ``steps · lr`` (3e-3 at
the defaults) bounds how far any entry of ``τ_m`` leaves the sum. On task vectors with entries much larger
than that (the paper's CLIP fine-tunes), WUDI is a small correction of task arithmetic at λ = 1; raise
``steps`` or ``lr`` to reach the loss's minimum (tests/test_methods_wudi.py reaches it in 3000 steps at 1e-2).

The loss is quadratic, with gradient ``2 (τ_m A − C)``, ``A = Σ_i τ_iᵀτ_i/‖τ_i‖²``, ``C = Σ_i τ_i τ_iᵀτ_i/‖τ_i‖²``;
it is computed from these two precomputed matrices, so no autograd is needed (the function works under
``torch.no_grad`` or inference mode) and a step costs one ``m × n × n`` product instead of ``T`` pairs of
``m × n × m`` ones.
Adam is written out with torch's update order (``torch.optim.Adam``) and no randomness: the result is the same
bytes on every run on one thread.

``solver="exact"`` returns the loss's minimiser itself, ``τ_m = C A⁺`` (the normal equations ``τ_m A = C``; the
pseudo-inverse from ``A``'s eigendecomposition in float64, since ``A`` is singular when the task vectors' rows do
not span the inputs; its null space holds no row of any ``τ_i``, so nothing of them is lost). Why it is offered:
on the vision task-vector benchmark (seed 0, docs/task_vectors.md) the default 300 Adam steps at 1e-5 went a
median 16 % of the way from the sum to the minimiser, leaving the summed loss at 37 % of its start (the
minimiser's: 6 %), and the minimiser merged better (normalised val 52.2 at λ = 1 against 48.8–49.7 for the
defaults at their best λ).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.methods.registry import MergeMethod, Param, register
from mergelab.methods.spectral import merge_task_matrices

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
"""torch.optim.Adam's defaults, which the reference implementation uses."""
SOLVERS = ("adam", "exact")


def wudi_loss(merged: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Σ_i ‖(τ_m − τ_i) τ_iᵀ‖_F² / ‖τ_i‖_F²`` over the non-zero task vectors (a zero ``τ_i`` adds nothing:
    its term is 0/0, whose limit is 0)."""
    total = merged.new_zeros(())
    for tau in taus:
        norm2 = tau.square().sum()
        if norm2 > 0:
            total = total + ((merged - tau) @ tau.T).square().sum() / norm2
    return total


def wudi_normal_equations(taus: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = Σ_i τ_iᵀτ_i / ‖τ_i‖²`` and ``C = Σ_i τ_i τ_iᵀτ_i / ‖τ_i‖²`` in ``dtype`` (zero task vectors skipped):
    :func:`wudi_loss` is ``tr(τ_m A τ_mᵀ) − 2 tr(τ_m Cᵀ) + const``, minimal where ``τ_m A = C``."""
    n = taus[0].shape[1]
    gram = torch.zeros((n, n), dtype=dtype, device=taus[0].device)
    target = torch.zeros(taus[0].shape, dtype=dtype, device=taus[0].device)
    for tau in taus:
        t = tau.to(dtype)
        norm2 = t.square().sum()
        if norm2 > 0:
            g = (t.T @ t) / norm2
            gram += g
            target += t @ g
    return gram, target


def wudi_task_matrix(taus: Sequence[torch.Tensor], *, steps: int = 300, lr: float = 1e-5) -> torch.Tensor:
    """``τ_m`` after ``steps`` Adam steps on :func:`wudi_loss` from ``Σ_i τ_i`` (module docstring)."""
    merged = torch.stack(list(taus)).sum(0)
    gram, target = wudi_normal_equations(taus, merged.dtype)
    beta1, beta2 = ADAM_BETAS
    m = torch.zeros_like(merged)
    v = torch.zeros_like(merged)
    for step in range(1, steps + 1):
        grad = 2 * (merged @ gram - target)
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(ADAM_EPS)
        merged.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
    return merged


def wudi_exact_task_matrix(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """The minimiser of :func:`wudi_loss`, ``C A⁺`` (module docstring), computed in float64, in the dtype of
    ``taus``."""
    gram, target = wudi_normal_equations(taus, torch.float64)
    return (target @ torch.linalg.pinv(gram, hermitian=True)).to(taus[0].dtype)


def wudi_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *,
               lambda_: float = 1.0, steps: int = 300, lr: float = 1e-5, solver: str = "adam",
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """``θ_0 + λ τ_m`` on 2-D weights (:func:`wudi_task_matrix`; with ``solver="exact"``
    :func:`wudi_exact_task_matrix`, which ignores ``steps`` and ``lr``), ``θ_0 + λ (1/T) Σ_t τ_t`` elsewhere.

    ``τ_t = w_t (θ_t − θ_0)``. Computed in float32 (float64 for float64 inputs or ``dtype``); the result has
    the base's dtype.
    """
    if solver not in SOLVERS:
        raise ValueError(f"wudi: solver must be one of {list(SOLVERS)}, got {solver!r}")
    if solver == "exact":
        return merge_task_matrices(base, tensors, weights, wudi_exact_task_matrix, lambda_=lambda_, dtype=dtype)
    return merge_task_matrices(base, tensors, weights, lambda taus: wudi_task_matrix(taus, steps=steps, lr=lr),
                               lambda_=lambda_, dtype=dtype)


register(MergeMethod(
    name="wudi",
    function=wudi_merge,
    params=(
        Param("weight", float, 1.0, scope="model", help="scale of this model's task vector"),
        Param("lambda", float, 1.0, help="scale of the merged task vector (the paper uses none: 1.0)"),
        Param("steps", int, 300, low=0, help="Adam steps on the interference loss (FusionBench's default 300)"),
        Param("lr", float, 1e-5, low=0.0,
              help="Adam learning rate (FusionBench's 1e-5); steps · lr bounds each entry's move"),
        Param("solver", str, "adam", choices=SOLVERS,
              help="adam: the paper's steps from the sum; exact: the loss's minimiser (steps and lr unused)"),
    ),
    summary="Per 2-D weight, the merged task vector is optimised (Adam from the sum) to minimise its "
            "interference on each task's own task-vector rows, which stand in for the inputs.",
    paper="Cheng et al. 2025, Whoever Started the Interference Should End It: Guiding Data-Free Model Merging "
          "via Task Vectors, ICML (arXiv:2503.08099)",
    also_in=("FusionBench",),
    formula="θ = θ_0 + λ τ_m, τ_m = Adam_{steps, lr} from Σ τ_i of min Σ_i ‖(τ_m − τ_i) τ_iᵀ‖_F² / ‖τ_i‖_F² "
            "(solver exact: the minimiser C A⁺); θ_0 + λ mean τ_i on non-2-D tensors",
))
