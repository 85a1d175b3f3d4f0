"""Stream tensors into sharded safetensors files without holding a shard in memory.

Because the engine knows every output tensor's name, shape and dtype before merging, the shard layout and
every safetensors header can be fixed up front; each merged tensor is then written straight to its place
and dropped. Peak memory is one tensor, not one shard. Files follow the Hugging Face layout
(``model.safetensors``, or ``model-0000k-of-0000N.safetensors`` plus ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergelab.io.output_file import OutputFile, open_output_file
from mergelab.io.readers import TensorMeta
from mergelab.io.safetensors_file import SAFETENSORS_DTYPES
from mergelab.io.safetensors_header import FORMAT_DTYPES

DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# The library's Dtype enum order (smallest element first): it writes tensors in the reverse of this order.
_LIBRARY_ORDER = {name: rank for rank, name in enumerate(FORMAT_DTYPES)}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(size: int | str) -> int:
    """``"2GB"`` → 2·10⁹, ``"500MiB"`` → 500·2²⁰, ``1000`` → 1000 bytes."""
    if isinstance(size, int):
        return size
    match = _SIZE.match(size)
    if not match:
        raise ValueError(f"invalid size {size!r}; use bytes or a unit like 500MB, 2GB, 1GiB")
    unit = (match.group(2) or "B").upper()
    unit = unit[:-1] if len(unit) > 1 and unit.endswith("B") else unit
    if unit not in _UNITS:
        raise ValueError(f"invalid size unit in {size!r}; use B, KB, MB, GB, TB or KiB, MiB, GiB")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass
class _Shard:
    names: list[str] = field(default_factory=list)
    size: int = 0


@dataclass
class ShardPlan:
    """Which tensor goes to which shard file, and each shard's header."""

    shards: list[_Shard]
    metas: dict[str, TensorMeta]

    @classmethod
    def build(cls, metas: Mapping[str, TensorMeta], max_shard_size: int) -> ShardPlan:
        shards = [_Shard()]
        for name, meta in metas.items():
            if shards[-1].names and shards[-1].size + meta.nbytes > max_shard_size:
                shards.append(_Shard())
            shards[-1].names.append(name)
            shards[-1].size += meta.nbytes
        return cls(shards, dict(metas))

    def filenames(self) -> list[str]:
        n = len(self.shards)
        if n == 1:
            return ["model.safetensors"]
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def layout(self, index: int) -> dict[str, int]:
        """Each tensor's byte offset in shard ``index``'s data area, laid out as the safetensors library does:
        by dtype from the largest element to the smallest (then by name), so that with the data area starting
        8-byte aligned every tensor starts at a multiple of its element size, and a reader may view the bytes
        as the dtype in place. The engine still writes tensors in its own order (the writer seeks)."""
        order = sorted(self.shards[index].names, key=lambda n: (-_LIBRARY_ORDER[DTYPE_NAMES[self.metas[n].dtype]], n))
        offsets, offset = {}, 0
        for name in order:
            offsets[name] = offset
            offset += self.metas[name].nbytes
        return offsets

    def header(self, index: int, metadata: Mapping[str, str]) -> bytes:
        entries: dict[str, object] = {"__metadata__": dict(metadata)}
        for name, offset in self.layout(index).items():
            meta = self.metas[name]
            entries[name] = {"dtype": DTYPE_NAMES[meta.dtype], "shape": list(meta.shape),
                             "data_offsets": [offset, offset + meta.nbytes]}
        raw = json.dumps(entries, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
        return len(raw).to_bytes(8, "little") + raw

    def weight_map(self) -> dict[str, str]:
        files = self.filenames()
        return {name: files[i] for i, shard in enumerate(self.shards) for name in shard.names}


class StreamingSafetensorsWriter:
    """Write tensors, in the plan's order or in ``order``, into the shard files of ``folder``.

    ``write`` must be called once per planned tensor, in that order, with the planned shape and dtype (or
    ``write_part`` for its parts, one after the other); ``close`` checks that every tensor was written and
    writes the index for sharded output. Where a tensor goes in its shard is fixed by the plan
    (:meth:`ShardPlan.layout`), so the order of the writes does not change a byte of the files: a shard's file
    stays open from its first tensor written to its last. ``direct``: write the shards with ``O_DIRECT`` where
    the file system takes it (io/output_file.py says when that pays); ``direct_io`` then says whether every
    shard got it.
    """

    def __init__(self, folder: Path, plan: ShardPlan, metadata: Mapping[str, str] | None = None, *,
                 direct: bool = False, order: Sequence[str] | None = None) -> None:
        self.folder = folder
        self.plan = plan
        self.metadata = dict(metadata or {"format": "pt"})
        self.direct = direct
        self.direct_io = direct
        shard_of = {n: i for i, s in enumerate(plan.shards) for n in s.names}
        names = [n for s in plan.shards for n in s.names] if order is None else list(order)
        if sorted(names) != sorted(shard_of):
            raise ValueError("the order of the writes must name every planned tensor once")
        self._order: list[tuple[int, str]] = [(shard_of[n], n) for n in names]
        self._next = 0
        self._files: dict[int, OutputFile] = {}  # open shards: from their first tensor written to their last
        self._left = [len(s.names) for s in plan.shards]  # tensors of each shard not yet written
        self._offsets: dict[str, int] = {}  # tensor -> file offset of its data, in its shard
        self._partial = 0  # bytes of the current tensor written so far (write_part)
        self._position = 0  # file offset of the next byte of the current tensor
        self.bytes_written = 0

    def _open_shard(self, index: int) -> None:
        file = open_output_file(self.folder / self.plan.filenames()[index], direct=self.direct)
        self._files[index] = file
        self.direct_io = self.direct_io and file.direct
        header = self.plan.header(index, self.metadata)
        file.write_at(memoryview(header), 0)
        self._offsets.update({name: len(header) + offset for name, offset in self.plan.layout(index).items()})

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the whole tensor ``name``."""
        meta = self._expect(name)
        if self._partial or tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
            raise RuntimeError(f"tensor '{name}' is {tuple(tensor.shape)} {tensor.dtype}, planned {meta.shape} "
                               f"{meta.dtype}" + (" (and partly written already)" if self._partial else ""))
        self._put(meta, tensor)

    def write_part(self, name: str, part: torch.Tensor) -> None:
        """Write the next entries of the flattened tensor ``name``; the tensor is done when its parts add up.

        Lets a merge stream a large tensor in pieces, so that neither it nor its inputs are ever whole in
        memory.
        """
        meta = self._expect(name)
        if part.dtype != meta.dtype or self._partial + part.numel() * part.element_size() > meta.nbytes:
            raise RuntimeError(f"part of tensor '{name}' ({part.numel()} × {part.dtype}) does not fit: "
                               f"{self._partial} of {meta.nbytes} bytes written, planned {meta.dtype}")
        self._put(meta, part)

    def _expect(self, name: str) -> TensorMeta:
        if self._next >= len(self._order):
            raise RuntimeError(f"tensor '{name}' was not planned for this output")
        shard, expected = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"tensor '{name}' written out of order; expected '{expected}'")
        if shard not in self._files:
            self._open_shard(shard)
        if self._partial == 0:
            self._position = self._offsets[name]
        return self.plan.metas[name]

    def _put(self, meta: TensorMeta, tensor: torch.Tensor) -> None:
        shard = self._order[self._next][0]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._files[shard].write_at(memoryview(data), self._position)
        self._position += data.nbytes
        self._partial += data.nbytes
        self.bytes_written += data.nbytes
        if self._partial == meta.nbytes:
            self._next += 1
            self._partial = 0
            self._left[shard] -= 1
            if self._left[shard] == 0:
                self._files.pop(shard).close()

    def close(self) -> list[Path]:
        for file in self._files.values():  # shards left open by an incomplete output
            file.close()
        self._files.clear()
        if self._next != len(self._order):
            missing = [n for _, n in self._order[self._next:]][:5]
            raise RuntimeError(f"output incomplete: {len(self._order) - self._next} tensors not written, "
                               f"e.g. {missing}")
        names = self.plan.filenames()
        if len(names) > 1:
            total = sum(m.nbytes for m in self.plan.metas.values())
            index = {"metadata": {"total_size": total}, "weight_map": self.plan.weight_map()}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [self.folder / n for n in names]

    def abort(self) -> None:
        files = list(self._files.values())
        self._files.clear()
        for file in files:
            file.abandon()


def write_state_dict(path: Path, tensors: Sequence[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
                     max_shard_size: int | str = 2**62) -> list[Path]:
    """Write an in-memory state dict to ``path`` (a folder) in the same layout; for tests and studies."""
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    metas = {n: TensorMeta(tuple(t.shape), t.dtype) for n, t in items}
    path.mkdir(parents=True, exist_ok=True)
    writer = StreamingSafetensorsWriter(path, ShardPlan.build(metas, parse_size(max_shard_size)))
    for name, tensor in items:
        writer.write(name, tensor)
    return writer.close()
