"""Work space of the top-k passes (TIES', Breadcrumbs' rank rules), allocated once per merge and reused.

A top-k pass holds, per model, the magnitude keys of a whole tensor's task vector (2 bytes per entry in
bfloat16) and, where tied keys straddle a kept rank, the sort replay's flat indices (4 bytes per entry). Made
fresh for every tensor, they were 6 bytes per entry of the model faulted in anew for each fine-tune: 12 GB of
new pages in a TIES merge of 3 × 2 GB, and ``clear_page_erms`` (the kernel zeroing them) the largest single
symbol under ``perf record`` of that merge (8.5 % of its CPU samples, 2026-12-03), on a VM that also makes
the host back each of them again. One buffer of each kind at the largest tensor's size, shared by the models
whose rules are found side by side, is faulted in once. Pages never touched cost no memory, so the buffers
are sized for the widest keys (4 bytes, float32 arithmetic) and positions (8 bytes, 2^31 entries or more)
and a merge touches what it uses. A bfloat16 merge's 2-byte keys get 4 bytes per entry of the keys' buffer,
which the sort replay widens them into in place, each tied entry carrying its flat index
(``std_sort._room``): it touches 4 bytes per entry of the tensor and no positions (TIES at 3 × 0.5 GB, whose
embedding and head have 32.8 M entries: peak RSS of ``mergelab merge`` 649–697 → 593–608 MiB in six
alternations, docs/scale.md).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from mergelab.methods.std_sort import position_dtype

_KEY_BYTES = 4  # the widest keys: int32, of float32 task vectors
_POSITION_BYTES = 8  # the widest flat indices: int64, for 2^31 entries or more


class RankWorkspace:
    """Keys and replay positions for up to ``slots`` models at once, each slot a ``1/slots`` share of buffers
    sized for ``capacity`` entries (the largest tensor a top-k pass sees). The passes run one at a time (the
    engine's single pass thread); the models of one pass take free slots and give them back."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: torch.Tensor | None = None  # allocated on first use
        self._positions: np.ndarray | None = None
        self._lock = threading.Lock()
        self._taken: set[int] = set()

    def take(self, slots: int, numel: int, key_dtype: torch.dtype) -> tuple[int, torch.Tensor, np.ndarray] | None:
        """A free slot of ``slots`` equal shares: its index, flat keys of ``numel`` entries in ``key_dtype`` and
        position scratch for as many (:func:`~mergelab.methods.std_sort.position_dtype`); None where
        ``numel`` exceeds a share or no slot is free. Give the index back with :meth:`give_back`."""
        share = self.capacity // slots
        if numel > share or key_dtype.itemsize > _KEY_BYTES:
            return None
        with self._lock:
            index = next((i for i in range(slots) if i not in self._taken), None)
            if index is None:
                return None
            self._taken.add(index)
            if self._keys is None or self._positions is None:
                self._keys = torch.empty(self.capacity * _KEY_BYTES, dtype=torch.uint8)
                self._positions = np.empty(self.capacity * _POSITION_BYTES, np.uint8)
            keys_bytes, positions_bytes = self._keys, self._positions
        if key_dtype.itemsize == 2:
            # 16-bit keys get their share's 4 bytes per entry, the keys in the first half: the sort replay widens
            # them in place and tags the tied ones with their flat indices (std_sort._room), so that the
            # positions buffer is never touched (6 → 4 bytes per entry of the tensor)
            start = index * share * _KEY_BYTES
            room = keys_bytes[start:start + numel * _KEY_BYTES]
            return index, room[:numel * 2].view(key_dtype), room.numpy()
        # each share starts at its index times the share in the widths used, so that the models of a float32
        # merge touch the same first pages whether they run one or two at a time
        keys = keys_bytes[index * share * _KEY_BYTES:(index * share + numel) * _KEY_BYTES].view(key_dtype)
        position_width = position_dtype(numel).itemsize
        start = index * share * position_width
        return index, keys, positions_bytes[start:start + numel * position_width]

    @staticmethod
    def bytes_per_entry(numel: int, key_dtype: torch.dtype) -> int:
        """What :meth:`take` touches per entry of a tensor of ``numel`` entries and per model: 16-bit keys get
        4 bytes (widened in place by the sort replay), wider keys their own bytes and the replay's positions."""
        return _KEY_BYTES if key_dtype.itemsize == 2 else key_dtype.itemsize + position_dtype(numel).itemsize

    def give_back(self, index: int) -> None:
        with self._lock:
            self._taken.discard(index)

    def shrink_to(self, capacity: int) -> None:
        """Hold no more than ``capacity`` entries from now on: the buffers are let go (and made again, smaller, on
        next use) when no slot is taken and ``capacity`` is at most half of the present one. The engine calls
        this once the largest tensors are behind it, so that their work space does not stay resident beside
        the rest of the merge (3 × 0.5 GB, whose embedding and head come first: TIES' peak RSS 635 → ~620 MiB,
        the old engine's, sampled from /proc)."""
        with self._lock:
            if self._taken or 2 * capacity > self.capacity:
                return
            self.capacity = capacity
            self._keys = self._positions = None
