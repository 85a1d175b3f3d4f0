"""A safetensors reader that copies each tensor into its own buffer instead of memory-mapping the file.

``safetensors.safe_open`` maps whole files: every page a merge touches stays in the process's resident
set until the file is closed, so merging three 10 GB models shows ~30 GB RSS even though each tensor is
needed only once. Reading with ``readinto`` into a fresh tensor keeps RSS at the tensors in flight (the
data still goes through the OS page cache, which the kernel can drop). The header is validated against
the file size when the file is opened, so a truncated or corrupt file fails before any merging starts.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from mergelab.errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20  # the format's own limit


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


class SafetensorsFile:
    """Header parsed and checked on open; ``get(name)`` reads one tensor into a new CPU tensor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 (kept open for reads, closed in close())
        self._lock = threading.Lock()
        try:
            self.entries = self._parse(size)
        except BaseException:
            self._file.close()
            raise

    def _bad(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a valid safetensors file: {why}. It is probably truncated or "
                               "corrupted: copy or save it again")

    def _parse(self, size: int) -> dict[str, _Entry]:
        if size < 8:
            raise self._bad(f"only {size} bytes long")
        n = int.from_bytes(self._file.read(8), "little")
        if n > min(size - 8, _MAX_HEADER):
            raise self._bad(f"header length {n} does not fit in the file's {size} bytes")
        try:
            header = json.loads(self._file.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self._bad(f"header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        data_start = 8 + n
        entries: dict[str, _Entry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"tensor '{name}' has a malformed header entry {info!r}") from None
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or begin < 0:
                raise self._bad(f"tensor '{name}' claims bytes [{begin}, {end}) but {shape} {info['dtype']} needs "
                                f"{nbytes}")
            if data_start + end > size:
                raise self._bad(f"tensor '{name}' ends at byte {data_start + end} but the file has {size} bytes")
            entries[name] = _Entry(dtype, shape, data_start + begin, nbytes)
        return entries

    def get(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        return self._read(name, e.start, e.nbytes).view(e.dtype).reshape(e.shape)

    def get_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Entries ``[start, stop)`` of the flattened tensor, reading only their bytes."""
        e = self.entries[name]
        size = e.dtype.itemsize
        if not 0 <= start <= stop <= e.nbytes // size:
            raise IndexError(f"{self.path}: range [{start}, {stop}) outside tensor '{name}' of "
                             f"{e.nbytes // size} entries")
        return self._read(name, e.start + start * size, (stop - start) * size).view(e.dtype)

    def _read(self, name: str, offset: int, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            with self._lock:
                self._file.seek(offset)
                got = self._file.readinto(memoryview(buf.numpy()))
            if got != nbytes:
                raise self._bad(f"tensor '{name}' could be read only partly ({got} of {nbytes} bytes)")
        return buf

    def close(self) -> None:
        self._file.close()
