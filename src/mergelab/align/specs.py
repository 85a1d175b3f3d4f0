"""Permutation specs: which axis of which tensor each hidden-unit permutation acts on.

Hidden units of a network can be reordered without changing its function, as long as every tensor that
reads or writes those units is reordered the same way. A :class:`PermutationSpec` lists, for each such
permutation, the (tensor name, axis) pairs it acts on, in PyTorch's ``[out, in, *kernel]`` layout: axis 0
of a weight is the layer's outputs, axis 1 its inputs. BatchNorm parameters and running statistics follow
the channels they normalise. Inputs and the classifier's outputs are never permuted.

:class:`SpecBuilder` helps write a spec for a model by walking its layers; the builders for the zoo's
families live next to the models (:mod:`mergelab.zoo.permutation_specs`), so this package depends on torch
only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mergelab.types import StateDict

Permutation = dict[str, torch.Tensor]  # permutation name → index tensor (new unit i is old unit perm[i])

# Buffers that follow their channels but carry no information for matching (statistics, counters).
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class PermutationSpec:
    """``perm_to_axes[p]``: the (tensor, axis) pairs permutation ``p`` acts on; ``axes_to_perm`` the inverse."""

    perm_to_axes: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    axes_to_perm: dict[str, tuple[str | None, ...]] = field(default_factory=dict)

    @classmethod
    def from_axes(cls, axes_to_perm: Mapping[str, Sequence[str | None]]) -> PermutationSpec:
        perm_to_axes: dict[str, list[tuple[str, int]]] = {}
        for name, perms in axes_to_perm.items():
            for axis, p in enumerate(perms):
                if p is not None:
                    perm_to_axes.setdefault(p, []).append((name, axis))
        return cls(perm_to_axes, {k: tuple(v) for k, v in axes_to_perm.items()})

    @property
    def names(self) -> list[str]:
        return list(self.perm_to_axes)

    def sizes(self, state_dict: StateDict) -> dict[str, int]:
        """Number of units of every permutation, read off ``state_dict`` (checked to agree across tensors)."""
        out: dict[str, int] = {}
        for p, axes in self.perm_to_axes.items():
            sizes = {state_dict[n].shape[a] for n, a in axes}
            if len(sizes) != 1:
                raise ValueError(f"permutation '{p}' acts on axes of different sizes: {sorted(sizes)} ({axes})")
            out[p] = sizes.pop()
        return out

    def check(self, state_dict: StateDict) -> None:
        """Every tensor of ``state_dict`` is covered and every covered tensor exists (catches stale specs)."""
        missing = sorted(set(state_dict) - set(self.axes_to_perm))
        extra = sorted(set(self.axes_to_perm) - set(state_dict))
        if missing or extra:
            raise ValueError(f"permutation spec does not match the state dict: not in spec {missing[:5]}, "
                             f"not in state dict {extra[:5]}")
        for name, perms in self.axes_to_perm.items():
            if len(perms) > state_dict[name].dim() and any(p is not None for p in perms[state_dict[name].dim():]):
                raise ValueError(f"spec permutes axis {len(perms) - 1} of '{name}' of shape "
                                 f"{tuple(state_dict[name].shape)}")
        self.sizes(state_dict)


def is_statistic(name: str) -> bool:
    return name.endswith(_BUFFER_SUFFIXES)


def identity_permutation(spec: PermutationSpec, state_dict: StateDict) -> Permutation:
    return {p: torch.arange(n) for p, n in spec.sizes(state_dict).items()}


def random_permutation(spec: PermutationSpec, state_dict: StateDict, seed: int) -> Permutation:
    gen = torch.Generator().manual_seed(seed)
    return {p: torch.randperm(n, generator=gen) for p, n in spec.sizes(state_dict).items()}


def permute_tensor(spec: PermutationSpec, perm: Mapping[str, torch.Tensor], name: str, tensor: torch.Tensor,
                   except_axis: int | None = None) -> torch.Tensor:
    """``tensor`` with every axis the spec names reordered by its permutation (``except_axis`` left alone)."""
    out = tensor
    for axis, p in enumerate(spec.axes_to_perm.get(name, ())):
        if p is None or axis == except_axis or axis >= tensor.dim():
            continue
        out = torch.index_select(out, axis, perm[p].to(out.device))
    return out


def apply_permutation(spec: PermutationSpec, perm: Mapping[str, torch.Tensor], state_dict: StateDict
                      ) -> dict[str, torch.Tensor]:
    """A new state dict with the units reordered; the network computes the same function."""
    return {k: permute_tensor(spec, perm, k, v) for k, v in state_dict.items()}


def invert(perm: Mapping[str, torch.Tensor]) -> Permutation:
    return {p: torch.argsort(ix) for p, ix in perm.items()}


# -- writing a spec for a model ------------------------------------------------------------------------
class SpecBuilder:
    """Collects ``axes_to_perm`` entries while walking a model's layers in forward order."""

    def __init__(self, model: nn.Module) -> None:
        self.state = model.state_dict()
        self.axes: dict[str, tuple[str | None, ...]] = {}

    def _set(self, prefix: str, suffix: str, perms: tuple[str | None, ...]) -> None:
        name = f"{prefix}.{suffix}" if prefix else suffix
        if name in self.state:
            self.axes[name] = perms

    def dense(self, prefix: str, p_out: str | None, p_in: str | None) -> None:
        """A Linear or Conv: weight [out, in, ...], bias [out]."""
        self._set(prefix, "weight", (p_out, p_in))
        self._set(prefix, "bias", (p_out,))

    def norm(self, prefix: str, p: str) -> None:
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            self._set(prefix, suffix, (p,))
        self._set(prefix, "num_batches_tracked", ())

    def spec(self) -> PermutationSpec:
        spec = PermutationSpec.from_axes(self.axes)
        spec.check(self.state)
        return spec
