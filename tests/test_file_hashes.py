"""Input digests are remembered while a file is unchanged, recomputed as soon as it may have changed, and
every merge record says which digests came from the cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import pytest

from cli_helpers import write_config
from mergelab.io.file_hashes import cached_sha256, hash_cache_dir


def _file(tmp_path: Path, data: bytes = b"weights" * 1000) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    return path


def test_digest_is_sha256_and_the_second_read_comes_from_the_cache(tmp_path: Path) -> None:
    path, cache = _file(tmp_path), tmp_path / "cache"
    assert cached_sha256(path, cache) == (hashlib.sha256(path.read_bytes()).hexdigest(), False)
    assert cached_sha256(path, cache) == (hashlib.sha256(path.read_bytes()).hexdigest(), True)


def test_same_size_rewrite_with_the_old_mtime_is_hashed_again(tmp_path: Path) -> None:
    path, cache = _file(tmp_path, b"a" * 4096), tmp_path / "cache"
    cached_sha256(path, cache)
    st = path.stat()
    path.write_bytes(b"b" * 4096)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    digest, from_cache = cached_sha256(path, cache)
    assert not from_cache and digest == hashlib.sha256(b"b" * 4096).hexdigest()


def test_a_corrupt_or_foreign_entry_is_ignored(tmp_path: Path) -> None:
    path, cache = _file(tmp_path), tmp_path / "cache"
    cached_sha256(path, cache)
    (entry,) = cache.glob("*.json")
    for text in ("{not json", json.dumps({**json.loads(entry.read_text()), "sha256": "0" * 63}), "[]"):
        entry.write_text(text)
        assert cached_sha256(path, cache) == (hashlib.sha256(path.read_bytes()).hexdigest(), False)


def test_an_unwritable_cache_never_fails_the_hash(tmp_path: Path) -> None:
    path = _file(tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    assert cached_sha256(path, blocker / "cache") == (hashlib.sha256(path.read_bytes()).hexdigest(), False)


def test_the_cache_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MERGELAB_HASH_CACHE", "off")
    assert hash_cache_dir() is None
    path = _file(tmp_path)
    assert cached_sha256(path) == cached_sha256(path) == (hashlib.sha256(path.read_bytes()).hexdigest(), False)


def test_merge_record_says_which_digests_came_from_the_cache(families: dict[str, tuple[Path, list[Path]]],
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mergelab

    monkeypatch.setenv("MERGELAB_HASH_CACHE", str(tmp_path / "cache"))
    base, fts = families["llama"]
    config = write_config(tmp_path, {"merge_method": "linear", "models": [{"model": str(p)} for p in (base, *fts)]})
    first = mergelab.merge(config, tmp_path / "one", progress=False).record
    second = mergelab.merge(config, tmp_path / "two", progress=False).record
    assert first["inputs_sha256"] == second["inputs_sha256"] and len(first["inputs_sha256"]) == 4
    assert first["inputs_sha256_from_cache"] == []
    assert sorted(second["inputs_sha256_from_cache"]) == sorted(second["inputs_sha256"])


def test_readinto_digest_equals_hashlib_across_block_edges(tmp_path: Path) -> None:
    from mergelab.io import file_hashes

    for size in (0, 1, file_hashes._READ_BLOCK - 1, file_hashes._READ_BLOCK, 2 * file_hashes._READ_BLOCK + 7):
        data = os.urandom(size)
        path = _file(tmp_path, data)
        assert file_hashes.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_a_file_held_twice_is_hashed_once_and_a_released_one_is_hashed_again(tmp_path: Path) -> None:
    from mergelab.io.file_hashes import DigestPool

    pool, cache, path = DigestPool(), tmp_path / "cache", _file(tmp_path)
    first = pool.acquire(path, cache)
    assert pool.acquire(path, cache) is first
    assert first.result() == (hashlib.sha256(path.read_bytes()).hexdigest(), False)
    pool.release(first)
    assert pool.acquire(path, cache) is first  # still held once
    pool.release(first)
    pool.release(first)
    again = pool.acquire(path, cache)
    assert again is not first and again.result() == (first.result()[0], True)  # from the cache this time
    pool.release(again)


def test_the_digest_of_a_changed_file_is_a_new_job(tmp_path: Path) -> None:
    from mergelab.io.file_hashes import DigestPool

    pool, path = DigestPool(), _file(tmp_path)
    before = pool.acquire(path, tmp_path / "cache")
    before.result()
    path.write_bytes(b"other weights")
    after = pool.acquire(path, tmp_path / "cache")
    assert after is not before and after.result()[0] == hashlib.sha256(b"other weights").hexdigest()


def test_a_digest_nobody_holds_stops_within_one_block(tmp_path: Path) -> None:
    import threading

    from mergelab.io.file_hashes import DigestAbandoned, sha256_file

    stop = threading.Event()
    stop.set()
    path = _file(tmp_path, b"x" * (3 << 22))
    with pytest.raises(DigestAbandoned):
        sha256_file(path, stop)


def test_a_released_running_job_is_cancelled_and_forgotten(tmp_path: Path) -> None:
    from concurrent.futures import CancelledError

    from mergelab.io.file_hashes import DigestAbandoned, DigestPool

    pool = DigestPool(threads=1)
    big = []
    for i in range(3):
        (tmp_path / str(i)).mkdir()
        big.append(_file(tmp_path / str(i), os.urandom(1 << 23)))
    futures = [pool.acquire(p, None) for p in big]
    for f in futures:
        pool.release(f)
    for f in futures:  # each either never started (cancelled) or stopped at its next block
        with contextlib.suppress(CancelledError, DigestAbandoned):
            f.result(timeout=60)
    assert pool._jobs == {}


def test_a_failed_cli_merge_leaves_no_digest_held(families: dict[str, tuple[Path, list[Path]]], tmp_path: Path) -> None:
    from cli_helpers import run_cli
    from mergelab.io.file_hashes import DIGESTS

    base, fts = families["llama"]
    config = write_config(tmp_path, {"merge_method": "ties", "base_model": str(base),
                                     "models": [{"model": str(p), "parameters": {"density": 7}} for p in fts]})
    result = run_cli(config, tmp_path / "out")
    assert result.exit_code != 0 and "density" in result.output
    assert DIGESTS._jobs == {}
    assert not (tmp_path / "out").exists()


def test_a_fifo_is_not_hashed_and_does_not_block(tmp_path: Path) -> None:
    from mergelab.io.file_hashes import sha256_file

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        sha256_file(fifo)  # opened without waiting for a writer
