"""Permutation alignment (Git Re-Basin weight matching), BatchNorm reset and loss barriers."""

from mergelab.align.barrier import (
    PathResult,
    barrier_height,
    barrier_heights,
    evaluate,
    interpolate,
    linear_path,
    path_example_losses,
)
from mergelab.align.bn_reset import has_batchnorm, reset_bn_stats
from mergelab.align.specs import (
    PermutationSpec,
    SpecBuilder,
    apply_permutation,
    identity_permutation,
    invert,
    random_permutation,
)
from mergelab.align.weight_matching import MatchResult, align, weight_matching

__all__ = [
    "MatchResult",
    "PathResult",
    "PermutationSpec",
    "SpecBuilder",
    "align",
    "apply_permutation",
    "barrier_height",
    "barrier_heights",
    "evaluate",
    "has_batchnorm",
    "identity_permutation",
    "interpolate",
    "invert",
    "linear_path",
    "path_example_losses",
    "random_permutation",
    "reset_bn_stats",
    "weight_matching",
]
