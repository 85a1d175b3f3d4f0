"""Model soups (Wortsman et al. 2022) and greedy ensembles, driven by an evaluator callable.

Nothing here loads data: the caller passes ``evaluate`` (state dict → validation score, for soups) or
``evaluate_subset`` (member indices → validation score, for greedy ensembles). Averaging always goes
through :func:`mergelab.merge_state_dicts` with the ``linear`` method.

Greedy procedure (the standard model-soups recipe): sort the members by their own validation score, best
first; start from the best; try adding each next member and keep it only if the validation score of the
combination *strictly* improves (``strict=False`` keeps ties, as the original soups code does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mergelab.merge.state_dicts import merge_state_dicts
from mergelab.types import StateDict


@dataclass
class GreedyResult:
    """Which members were kept (in the order tried), the final validation score and the trace."""

    selected: list[int]
    score: float
    order: list[int]
    #: (candidate index, score of the combination with it, accepted?)
    history: list[tuple[int, float, bool]] = field(default_factory=list)


def uniform_soup(state_dicts: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """The uniform average of all members' weights."""
    return merge_state_dicts(list(state_dicts), "linear")


def greedy_select(scores: Sequence[float], evaluate_subset: Callable[[list[int]], float], *,
                  strict: bool = True) -> GreedyResult:
    """Greedy forward selection over members ranked by ``scores`` (higher is better)."""
    if not scores:
        raise ValueError("greedy selection needs at least one member")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))  # ties broken by index: deterministic
    selected = [order[0]]
    best = float(scores[order[0]])
    history: list[tuple[int, float, bool]] = [(order[0], best, True)]
    for i in order[1:]:
        score = float(evaluate_subset([*selected, i]))
        accept = score > best or (not strict and score >= best)
        history.append((i, score, accept))
        if accept:
            selected.append(i)
            best = score
    return GreedyResult(selected, best, order, history)


def greedy_soup(state_dicts: Sequence[StateDict], evaluate: Callable[[StateDict], float], *,
                val_scores: Sequence[float] | None = None,
                strict: bool = True) -> tuple[dict[str, torch.Tensor], GreedyResult]:
    """Greedy soup: (merged state dict, selection). ``val_scores`` saves re-evaluating the members."""
    scores = list(val_scores) if val_scores is not None else [float(evaluate(sd)) for sd in state_dicts]
    if len(scores) != len(state_dicts):
        raise ValueError(f"got {len(state_dicts)} state dicts but {len(scores)} validation scores")
    result = greedy_select(scores, lambda idx: evaluate(uniform_soup([state_dicts[i] for i in idx])),
                           strict=strict)
    return uniform_soup([state_dicts[i] for i in result.selected]), result


def greedy_ensemble(val_scores: Sequence[float], evaluate_subset: Callable[[list[int]], float], *,
                    strict: bool = True) -> GreedyResult:
    """Greedy ensemble: the same selection, scored by the ensemble of the chosen members."""
    return greedy_select(val_scores, evaluate_subset, strict=strict)
