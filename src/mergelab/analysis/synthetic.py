"""A multi-task problem where the task-vector papers' regime holds by construction, with exact losses.

Issue 17: on our real suites the comparison of merging methods was uninformative (weight averaging far from
the pretrained model, task arithmetic already near its ceiling). Here the regime CART (Choi et al.,
arXiv:2412.12153) describes is built in, so the claims can be checked with no sampling noise:

- one linear layer ``y = W x + b`` (``W`` is ``out × inp``) with pretrained weights ``θ_0``;
- ``T`` fine-tunes ``θ_t = θ_0 + τ_t`` whose task vectors are a **shared component** ``S`` (rank
  ``shared_rank``, the same for every task) plus a **low-rank task part** ``L_t = A_t B_tᵀ`` (rank
  ``task_rank``, ``B_t`` orthonormal input directions drawn at random for each task) plus **noise**;
  biases get a shared part and noise;
- task ``t``'s inputs are ``x = C_t z`` with ``z ~ N(0, I)``: a share ``focus`` of their variance lies in the
  task's own directions ``B_t``, the rest is isotropic; the target is the fine-tuned model's output.

The loss of any weights ``(W, b)`` on task ``t`` is then exact:
``E‖(W − W_t) x + (b − b_t)‖² = ‖(W − W_t) C_t‖_F² + ‖b − b_t‖²`` (``E x = 0``). We report it relative to the
pretrained model's, ``L_t(θ) / L_t(θ_0)`` (0: as good as the fine-tune, 1: no better than the base), averaged
over tasks. Weight averaging keeps ``S`` but divides each ``L_t`` by ``T``; task arithmetic keeps ``L_t``
only by multiplying ``S`` by ``T λ``; CART adds back the low-rank parts of the centred task vectors
``θ_t − θ_avg``, which are ``L_t``'s (``S`` cancels). With isotropic inputs (``focus = 0``) the average
minimises the summed loss and nothing can beat it by much: the regime needs tasks that read different
input directions.

``python -m mergelab.analysis.synthetic`` prints the method table for three seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mergelab.analysis.interference import row_space_interference, task_matrices

StateDict = Mapping[str, torch.Tensor]
WEIGHT, BIAS = "layer.weight", "layer.bias"


@dataclass(frozen=True)
class SyntheticTasks:
    """The problem of the module docstring: pretrained and fine-tuned state dicts, and each task's input
    factor ``C_t`` (``inp × (task_rank + inp)``, input covariance ``C_t C_tᵀ``)."""

    base: dict[str, torch.Tensor]
    finetuned: list[dict[str, torch.Tensor]]
    inputs: list[torch.Tensor]
    task_rank: int
    seed: int

    def loss(self, state: StateDict, task: int) -> float:
        """Exact expected squared error of ``state`` against fine-tune ``task`` on that task's inputs."""
        target = self.finetuned[task]
        dw = state[WEIGHT].to(torch.float64) - target[WEIGHT]
        db = state[BIAS].to(torch.float64) - target[BIAS]
        return float(torch.linalg.matrix_norm(dw @ self.inputs[task]) ** 2 + (db ** 2).sum())

    def relative_losses(self, state: StateDict) -> list[float]:
        """``L_t(state) / L_t(θ_0)`` per task."""
        return [self.loss(state, t) / self.loss(self.base, t) for t in range(len(self.finetuned))]

    def mean_relative_loss(self, state: StateDict) -> float:
        losses = self.relative_losses(state)
        return sum(losses) / len(losses)

    def shared_fraction(self) -> float:
        """``‖mean τ‖² / mean ‖τ_t‖²`` of the weight matrix: about 1/T for independent task vectors, near 1
        when the shared component dominates (issue 17's regime check)."""
        taus = task_matrices([f[WEIGHT] for f in self.finetuned], self.base[WEIGHT])
        mean_sq = sum(float((t ** 2).sum()) for t in taus) / len(taus)
        return float((torch.stack(taus).mean(0) ** 2).sum()) / mean_sq

    def interference(self, centred: bool, rank: int | None = None) -> float:
        """Row-space interference ``I(k)`` (:mod:`mergelab.analysis.interference`) of the weight's task
        matrices, centred (``θ_t − θ_avg``) or not (``θ_t − θ_0``); ``k`` defaults to ``task_rank``."""
        weights = [f[WEIGHT] for f in self.finetuned]
        deltas = task_matrices(weights, None if centred else self.base[WEIGHT])
        return row_space_interference(deltas, self.task_rank if rank is None else rank)


def make_synthetic_tasks(*, out: int = 64, inp: int = 64, tasks: int = 6, task_rank: int = 4,
                         shared_rank: int = 8, shared_scale: float = 2.0, noise: float = 0.1,
                         focus: float = 0.9, seed: int = 0) -> SyntheticTasks:
    """Draw the problem (module docstring). ``shared_scale`` is ``‖S‖_F / ‖L_t‖_F``; ``noise`` the noise's
    Frobenius norm relative to ``‖L_t‖_F``; ``focus`` the share of each task's input variance in its own
    ``task_rank`` directions. Everything is float64 and drawn from ``seed``."""
    if not 0 <= focus <= 1:
        raise ValueError(f"focus must be in [0, 1], got {focus}")
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def gauss(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=f64)

    def scaled(m: torch.Tensor, norm: float) -> torch.Tensor:
        return m * (norm / float(torch.linalg.vector_norm(m)))

    w0 = gauss(out, inp) / math.sqrt(inp)
    b0 = gauss(out) / math.sqrt(out)
    task_norm = 1.0  # ‖L_t‖_F; everything else is relative to it
    shared = scaled(gauss(out, shared_rank) @ gauss(shared_rank, inp), shared_scale * task_norm)
    # biases: a shared shift and noise, small beside the weights' parts (‖·‖ = 0.1 of the matching weight part)
    shared_bias = scaled(gauss(out), 0.1 * shared_scale * task_norm)
    finetuned, inputs = [], []
    for _ in range(tasks):
        directions = torch.linalg.qr(gauss(inp, task_rank))[0]  # B_t: orthonormal columns
        task_part = scaled(gauss(out, task_rank) @ directions.T, task_norm)
        noise_part = scaled(gauss(out, inp), noise * task_norm)
        finetuned.append({WEIGHT: w0 + shared + task_part + noise_part,
                          BIAS: b0 + shared_bias + scaled(gauss(out), 0.1 * noise * task_norm)})
        # x = C_t z: variance `focus` spread over the task's directions, 1 − focus isotropic (total tr = 1)
        inputs.append(torch.cat([directions * math.sqrt(focus / task_rank),
                                 torch.eye(inp, dtype=f64) * math.sqrt((1 - focus) / inp)], dim=1))
    return SyntheticTasks({WEIGHT: w0, BIAS: b0}, finetuned, inputs, task_rank, seed)


@dataclass(frozen=True)
class MethodScore:
    """A method's best mean relative loss over a grid of ``lambda`` values (lower is better)."""

    method: str
    loss: float
    lambda_: float | None
    inside_grid: bool  # the best value is not an end of the grid (else the grid should be extended)


# λ grids bracket each method's optimum on the default problem (checked by MethodScore.inside_grid)
GRIDS: dict[str, tuple[float, ...]] = {
    "task_arithmetic": tuple(round(0.05 * i, 2) for i in range(1, 21)),
    "cart": (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0),
    "tsv": tuple(round(0.125 * i, 3) for i in range(1, 17)),
    "iso_c": tuple(round(0.1 * i, 1) for i in range(1, 21)),
    "iso_cts": tuple(round(0.1 * i, 1) for i in range(1, 21)),
}


def score_methods(problem: SyntheticTasks, methods: Sequence[str] = tuple(GRIDS),
                  grids: Mapping[str, Sequence[float]] = GRIDS) -> list[MethodScore]:
    """Weight averaging (no parameter) and each of ``methods`` at its best ``lambda`` on its grid; CART at
    rank ``task_rank`` (its rank ratio is ``task_rank / inp``)."""
    from mergelab.merge.state_dicts import merge_state_dicts

    fts, base = problem.finetuned, problem.base
    scores = [MethodScore("average", problem.mean_relative_loss(merge_state_dicts(fts, "linear")), None, True)]
    extra = {"cart": {"rank_ratio": problem.task_rank / base[WEIGHT].shape[1]}}
    for name in methods:
        grid = list(grids[name])
        losses = [problem.mean_relative_loss(merge_state_dicts(
            fts, name, base=base, parameters={"lambda": lam, **extra.get(name, {})})) for lam in grid]
        best = min(range(len(grid)), key=losses.__getitem__)
        scores.append(MethodScore(name, losses[best], grid[best], 0 < best < len(grid) - 1))
    return scores


def main(seeds: Sequence[int] = (0, 1, 2)) -> None:
    """Print the method table and the regime checks for each seed (the numbers in the notes)."""
    for seed in seeds:
        p = make_synthetic_tasks(seed=seed)
        print(f"seed {seed}: shared fraction {p.shared_fraction():.3f}, "
              f"I(k={p.task_rank}) uncentred {p.interference(False):.2f}, centred {p.interference(True):.2f} "
              f"(max {len(p.finetuned) * (len(p.finetuned) - 1)})")
        for s in score_methods(p):
            lam = "" if s.lambda_ is None else f"  λ={s.lambda_:g}{'' if s.inside_grid else ' (grid end!)'}"
            print(f"  {s.method:16s} mean relative loss {s.loss:.4f}{lam}")


if __name__ == "__main__":
    main()
