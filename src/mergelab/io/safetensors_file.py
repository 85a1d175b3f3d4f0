"""A safetensors reader that copies each tensor into its own buffer instead of memory-mapping the file.

``safetensors.safe_open`` maps whole files: every page a merge touches stays in the process's resident
set until the file is closed, so merging three 10 GB models shows ~30 GB RSS even though each tensor is
needed only once. Reading with ``readinto`` into a fresh tensor keeps RSS at the tensors in flight (the
data still goes through the OS page cache, which the kernel can drop). The header is validated against
the file size when the file is opened, so a truncated or corrupt file fails before any merging starts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from mergelab.errors import CheckpointError
from mergelab.io.safetensors_header import MAX_HEADER, HeaderError, header_length, parse_header

# Every dtype of the format that torch can hold; the sub-byte ones (F4, F6_*) are packed several to a byte
# and cannot be read tensor by tensor here: they are refused by name (see safetensors_header.FORMAT_DTYPES).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "C64": torch.complex64,
}
_MAX_DIM = 2**63 - 1  # torch sizes are int64


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def is_safetensors(path: Path) -> bool:
    """Whether the file starts like a safetensors file (a plausible header length, then a JSON object),
    whatever its name: a ``.bin`` holding safetensors is read as safetensors, not unpickled."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
        size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= min(size - 8, MAX_HEADER) and head[8:].lstrip(b" \t\r\n")[:1] == b"{"


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
        return CheckpointError(f"{self.path}: not a valid safetensors file: {why}. The safetensors library refuses "
                               "it too; if the file was copied or downloaded, it is probably truncated or "
                               "corrupted: copy or save it again")

    def _parse(self, size: int) -> dict[str, _Entry]:
        try:
            n = header_length(self._file.read(8), size)
            header, _ = parse_header(self._file.read(n), size)
        except HeaderError as exc:
            raise self._bad(str(exc)) from None
        data_start = 8 + n
        entries: dict[str, _Entry] = {}
        for name, e in header.items():
            dtype = SAFETENSORS_DTYPES.get(e.dtype)
            if dtype is None:
                raise CheckpointError(f"{self.path}: tensor '{name}' has unsupported dtype {e.dtype} (packed "
                                      "sub-byte floats cannot be merged); convert it to BF16 or F32 first")
            if any(d > _MAX_DIM for d in e.shape):
                raise CheckpointError(f"{self.path}: tensor '{name}' has shape {list(e.shape)}, beyond what torch "
                                      "can hold (sizes up to 2^63 - 1)")
            entries[name] = _Entry(dtype, e.shape, data_start + e.begin, e.end - e.begin)
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
