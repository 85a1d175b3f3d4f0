"""Output files written by offset: ``O_DIRECT`` (whole aligned blocks) gives the bytes of a buffered write.

The engine writes each tensor at its own offset in the merge's order, not the file's, in pieces of any
length; ``O_DIRECT`` takes only aligned blocks. These tests cut a byte string into pieces that start and end
inside blocks, span many blocks or the staging buffer, or are empty, write them in a shuffled order, and
compare the file with the string; then a merge written both ways, byte for byte, and what happens where the
file system refuses ``O_DIRECT``.
"""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import pytest

import mergelab.io.output_file as output_file
from cli_helpers import (
    assert_ok,
    assert_refused,
    assert_same_safetensors,
    run_cli,
    weighted_config,
    write_config,
)
from mergelab.io.output_file import BufferedOutputFile, DirectOutputFile, open_output_file
from mergelab.merge.engine import run_merge

BLOCK = output_file._BLOCK


def _direct_or_skip(path: Path) -> DirectOutputFile:
    try:
        return DirectOutputFile(path)
    except OSError as exc:  # a file system without O_DIRECT: the fallback tests below cover it
        pytest.skip(f"O_DIRECT refused under {path.parent}: {exc}")
    except AttributeError:
        pytest.skip("no O_DIRECT on this platform")


def _pieces(size: int, seed: int) -> list[tuple[int, int]]:
    """(offset, length) pieces that tile [0, size): random lengths from 0 to 3 blocks and one of 5 blocks."""
    rng = random.Random(seed)
    pieces, pos = [], 0
    lengths = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 17]
    while pos < size:
        length = min(size - pos, rng.choice(lengths) if rng.random() < 0.3 else rng.randrange(0, 3 * BLOCK))
        pieces.append((pos, length))
        pos += length
    rng.shuffle(pieces)
    return pieces


@pytest.mark.parametrize("size", [1, BLOCK - 3, BLOCK, 7 * BLOCK + 5, 40 * BLOCK])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pieces_written_in_any_order_at_any_offset_make_the_bytes_of_the_whole(tmp_path: Path, size: int,
                                                                                 seed: int) -> None:
    data = random.Random(seed + size).randbytes(size)
    target = _direct_or_skip(tmp_path / "out.bin")
    for offset, length in _pieces(size, seed):
        target.write_at(memoryview(data[offset: offset + length]), offset)
    target.close()
    assert (tmp_path / "out.bin").read_bytes() == data


def test_writes_longer_than_the_staging_buffer_go_through_it_in_turns(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output_file, "_STAGE", 2 * BLOCK)  # a 2-block buffer: 9 blocks take 5 turns
    data = random.Random(7).randbytes(9 * BLOCK + 100)
    target = _direct_or_skip(tmp_path / "out.bin")
    target.write_at(memoryview(data[:50]), 0)
    target.write_at(memoryview(data[50:]), 50)
    target.close()
    assert (tmp_path / "out.bin").read_bytes() == data


def test_a_file_that_ends_inside_a_block_is_cut_to_its_size(tmp_path: Path) -> None:
    target = _direct_or_skip(tmp_path / "out.bin")
    target.write_at(memoryview(b"safetensors"), 0)
    target.close()
    assert (tmp_path / "out.bin").read_bytes() == b"safetensors"


def test_an_abandoned_file_writes_nothing_more(tmp_path: Path) -> None:
    target = _direct_or_skip(tmp_path / "out.bin")
    target.write_at(memoryview(b"x" * (BLOCK + 10)), 0)  # one whole block written, 10 bytes kept back
    target.abandon()
    target.abandon()  # twice is harmless (a writer may be aborted after a failed close)
    assert (tmp_path / "out.bin").stat().st_size == BLOCK


def test_a_file_system_that_refuses_o_direct_gets_a_buffered_file(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: DirectOutputFile, path: Path) -> None:
        raise OSError(errno.EINVAL, "Invalid argument", str(path))

    monkeypatch.setattr(DirectOutputFile, "__init__", refuse)
    target = open_output_file(tmp_path / "out.bin", direct=True)
    assert isinstance(target, BufferedOutputFile) and not target.direct
    target.write_at(memoryview(b"tail"), 4)
    target.write_at(memoryview(b"head"), 0)
    target.close()
    assert (tmp_path / "out.bin").read_bytes() == b"headtail"


def test_other_errors_are_not_hidden_by_the_fallback(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_output_file(tmp_path / "missing" / "out.bin", direct=True)


def test_a_merge_written_with_direct_io_has_the_bytes_of_a_buffered_one(
        tmp_path: Path, sharded_family: tuple[Path, list[Path]]) -> None:
    base, fts = sharded_family
    config = write_config(tmp_path, weighted_config("ties", base, fts, parameters={"density": 0.4}))
    run_merge(config, tmp_path / "buffered", max_shard_size="30KB", progress=False)
    direct = run_merge(config, tmp_path / "direct", max_shard_size="30KB", progress=False, direct_io=True)
    assert len(list((tmp_path / "direct").glob("model-*-of-*.safetensors"))) >= 2  # several shards, odd sizes
    assert_same_safetensors(tmp_path / "buffered", tmp_path / "direct")
    try:  # whether this file system takes O_DIRECT: the record must say what the merge got
        DirectOutputFile(tmp_path / "probe.bin").close()
        takes_direct = True
    except OSError:
        takes_direct = False
    assert direct.record["direct_io"] is takes_direct
    assert json.loads((tmp_path / "direct" / "mergelab.json").read_text())["direct_io"] is takes_direct
    assert json.loads((tmp_path / "buffered" / "mergelab.json").read_text())["direct_io"] is False


def test_the_cli_flag_asks_for_direct_io(tmp_path: Path, sharded_family: tuple[Path, list[Path]],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[bool] = []
    real = output_file.open_output_file

    def spy(path: Path, *, direct: bool) -> output_file.OutputFile:
        asked.append(direct)
        return real(path, direct=direct)

    monkeypatch.setattr("mergelab.io.writer.open_output_file", spy)
    base, fts = sharded_family
    config = write_config(tmp_path, weighted_config("linear", base, fts))
    assert_ok(run_cli(config, tmp_path / "out", "--direct-io", "--no-hash"))
    assert asked and all(asked)


def test_a_device_that_fills_up_under_direct_io_is_the_disk_full_error(
        tmp_path: Path, sharded_family: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.pwrite

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        calls.append(offset)
        if len(calls) > 5:  # the probe and a few blocks, then the device is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    base, fts = sharded_family
    out = tmp_path / "out"
    config = write_config(tmp_path, weighted_config("linear", base, fts))
    assert_refused(run_cli(config, out, "--direct-io", "--no-hash", "--max-shard-size", "30KB"), out,
                   "No space left on device", "temporary files were removed")
    assert len(calls) > 5
