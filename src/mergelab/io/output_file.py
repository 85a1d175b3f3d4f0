"""Positional writes into a new output file, through the page cache or around it (``O_DIRECT``).

Why ``O_DIRECT`` at all: on a virtual machine whose balloon driver hands free memory back to the host (Linux
free page reporting, seen here as ``/sys/module/page_reporting``), memory that stayed free for about a second
must be backed by the host again on its next use, and a buffered write of a new file puts every byte into
such memory. On this project's 2-vCPU machine a new 0.47 GiB file took 0.8-1.35 s to write that way, 0.09-0.46 s
into memory freed a moment before, and 0.19-0.21 s with ``O_DIRECT`` (the device's speed, no page cache):
``python benchmarks/page_backing.py``, 2026-12-03 01:05 UTC. A merge larger than the free memory also keeps
its inputs' cached pages instead of evicting them for its output.

``O_DIRECT`` takes only block-aligned buffers, offsets and lengths, while the engine writes each tensor at its
own offset, in the merge's order rather than the file's. Whole blocks go through one page-aligned staging
buffer; a block two writes share waits in memory until all its bytes are there; the last block is written
padded and the file then cut to its size. File systems that refuse ``O_DIRECT`` (tmpfs on older kernels,
some network and FUSE file systems: ``EINVAL`` on open or on the first aligned write) get the buffered file
instead, and the caller is told which it got.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from pathlib import Path
from typing import Protocol

_BLOCK = 4096  # a multiple of every logical block size O_DIRECT is commonly asked for (512 B, 4 KiB)
_STAGE = 8 << 20  # bytes copied and written per O_DIRECT call: 2 MiB pieces are written in one
_REFUSED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


class OutputFile(Protocol):
    """A new file written by offset; every byte once, in any order."""

    direct: bool

    def write_at(self, data: memoryview, offset: int) -> None: ...

    def close(self) -> None: ...

    def abandon(self) -> None:
        """Close without finishing the file (a failed merge removes it)."""


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        done = os.pwrite(fd, data, offset)
        if done == 0:  # a full device answers ENOSPC; zero bytes without an error would loop forever
            raise OSError(errno.EIO, "the file system wrote nothing")
        data, offset = data[done:], offset + done


class BufferedOutputFile:
    """Writes through the page cache (the kernel writes the pages back later)."""

    direct = False

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    def write_at(self, data: memoryview, offset: int) -> None:
        _write_all(self._fd, data.cast("B"), offset)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    abandon = close


class DirectOutputFile:
    """Writes whole aligned blocks with ``O_DIRECT``; raises ``OSError`` where the file system refuses it."""

    direct = True

    def __init__(self, path: Path) -> None:
        self._pending: dict[int, tuple[bytearray, int]] = {}  # block offset -> (its bytes, how many are there)
        self._size = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_DIRECT, 0o644)
        try:
            self._stage = mmap.mmap(-1, _STAGE)  # anonymous, so page-aligned
            self._view = memoryview(self._stage)
            self._write_blocks(memoryview(bytes(_BLOCK)), 0)  # EINVAL here, not halfway through the merge
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def write_at(self, data: memoryview, offset: int) -> None:
        data = data.cast("B")
        end = offset + len(data)
        self._size = max(self._size, end)
        first = -(-offset // _BLOCK) * _BLOCK  # the first block boundary at or after offset
        last = end // _BLOCK * _BLOCK
        if first >= last:  # no whole block inside this write
            self._gather(data, offset)
            return
        self._gather(data[: first - offset], offset)
        self._write_blocks(data[first - offset: last - offset], first)
        self._gather(data[last - offset:], last)

    def _write_blocks(self, data: memoryview, offset: int) -> None:
        """``data`` (whole blocks, any address) at the aligned ``offset``, through the staging buffer."""
        for start in range(0, len(data), _STAGE):
            part = data[start: start + _STAGE]
            self._view[: len(part)] = part
            _write_all(self._fd, self._view[: len(part)], offset + start)

    def _gather(self, data: memoryview, offset: int) -> None:
        """Bytes of blocks this write does not fill: kept until their blocks are whole."""
        pos, end = offset, offset + len(data)
        while pos < end:
            block = pos // _BLOCK * _BLOCK
            upto = min(block + _BLOCK, end)
            kept = self._pending.pop(block, None)
            buf, have = kept if kept is not None else (bytearray(_BLOCK), 0)
            buf[pos - block: upto - block] = data[pos - offset: upto - offset]
            have += upto - pos
            if have == _BLOCK:
                self._write_blocks(memoryview(buf), block)
            else:
                self._pending[block] = (buf, have)
            pos = upto

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            # the block that holds the end of the file (zeros past it, cut off below), and any block whose
            # bytes were not all written (an incomplete output: its writer says so)
            for block in sorted(self._pending):
                self._write_blocks(memoryview(self._pending[block][0]), block)
            self._pending.clear()
            os.ftruncate(self._fd, self._size)
        finally:
            self.abandon()

    def abandon(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self._pending.clear()
            os.close(fd)
            self._view.release()
            # a slice of it may still be held (by a failed write's traceback): then it is unmapped with it
            with contextlib.suppress(BufferError):
                self._stage.close()


def open_output_file(path: Path, *, direct: bool) -> OutputFile:
    """A new file at ``path``: ``O_DIRECT`` when asked and the platform and file system take it, else buffered."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return DirectOutputFile(path)
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
    return BufferedOutputFile(path)
