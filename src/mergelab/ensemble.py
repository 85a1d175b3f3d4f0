"""Output-space combinations of models: logit ensembles and feature ensembles.

A *logit ensemble* averages the members' logits. A *feature ensemble* averages the members' penultimate
features and applies one linear head: either the members' heads merged by weight averaging (the paper's
"features averaged, heads merged") or the first member's head. For models whose feature map is the
identity (a linear classifier) all three coincide with the uniform soup — a useful sanity check.

Models must be :class:`~mergelab.zoo.models.ZooModel`-like: ``features(x)`` and a linear ``head``.
The functional helpers work on precomputed outputs so that studies evaluate each member once and then
score any subset (greedy ensembles) without new forward passes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from mergelab.evaluation import in_batches
from mergelab.merge.state_dicts import merge_state_dicts

EvalMode = Literal["eval", "train"]
HeadChoice = Literal["merged", "first"]


class FeatureModel(Protocol):
    head: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Outputs:
    """Penultimate features and logits of one model on one data split."""

    features: torch.Tensor
    logits: torch.Tensor


@torch.no_grad()
def model_outputs(model: nn.Module, x: torch.Tensor, *, mode: EvalMode = "eval",
                  batch_size: int = 500) -> Outputs:
    """Features and logits in batches.

    ``mode="train"`` reproduces evaluation with BatchNorm in training mode (batch statistics), as some
    original code did; it runs on a copy so the model's running statistics are never touched.
    """
    net = copy.deepcopy(model).train() if mode == "train" else model.eval()

    def forward(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = net.features(xb)  # type: ignore[operator]
        return f, net.head(f)  # type: ignore[operator]
    return Outputs(*in_batches(forward, x, batch_size))


def ensemble_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of the members' logits."""
    return torch.stack(list(logits)).mean(0)


def merged_head(heads: Sequence[nn.Linear]) -> nn.Linear:
    """One linear head whose weights are the uniform average of ``heads`` (through the merge API)."""
    merged = merge_state_dicts([h.state_dict() for h in heads], "linear")
    head = copy.deepcopy(heads[0])
    head.load_state_dict(merged)
    return head


def feature_ensemble_logits(features: Sequence[torch.Tensor], head: nn.Linear) -> torch.Tensor:
    """Apply ``head`` to the mean of the members' features."""
    with torch.no_grad():
        return head(torch.stack(list(features)).mean(0))


class LogitEnsemble(nn.Module):
    """Averages the logits of its members (cost: the sum of the members' costs)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ensemble_logits([m(x) for m in self.members])


class FeatureEnsemble(nn.Module):
    """Averages the members' features, then applies one head (merged, or the first member's)."""

    def __init__(self, members: Sequence[FeatureModel], head: HeadChoice = "merged") -> None:
        super().__init__()
        if head not in ("merged", "first"):
            raise ValueError(f"head must be 'merged' or 'first', got '{head}'")
        self.members = nn.ModuleList(members)  # type: ignore[arg-type]
        self.head = merged_head([m.head for m in members]) if head == "merged" else copy.deepcopy(members[0].head)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m.features(x) for m in self.members]).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def logit_ensemble(models: Sequence[nn.Module]) -> LogitEnsemble:
    return LogitEnsemble(models)


def feature_ensemble(models: Sequence[FeatureModel], head: HeadChoice = "merged") -> FeatureEnsemble:
    return FeatureEnsemble(models, head)
