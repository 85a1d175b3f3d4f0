"""Serve tensors a checkpoint lacks from another one (``--take-missing-from base``).

Checkpoints saved by different ``transformers`` versions disagree on buffers: older ones store
``embeddings.position_ids`` or rotary ``inv_freq`` caches, newer ones do not. Such tensors are not trained,
so a fine-tune's missing copy is its base's; borrowing it lets every method see identical inputs there, and
every method returns the base's tensor unchanged when all inputs equal it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mergelab.io.readers import CheckpointReader


class _Borrowed:
    """Stands where a tensor's storage stands in a reader: reads it from ``source`` instead."""

    def __init__(self, source: CheckpointReader) -> None:
        self.source = source

    def get(self, name: str) -> torch.Tensor:
        return self.source.get(name)

    def get_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.source.get_flat(name, start, stop)


def borrow_missing(reader: CheckpointReader, source: CheckpointReader, names: Iterable[str]) -> list[str]:
    """Make ``reader`` serve each of ``names`` it lacks from ``source``; returns the names borrowed."""
    borrowed = [n for n in names if n not in reader and n in source]
    for name in borrowed:
        reader._add(name, source.meta(name), _Borrowed(source), source.path)
    return borrowed
