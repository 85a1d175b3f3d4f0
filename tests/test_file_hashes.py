"""Input digests (blake3 by default, sha256 on request) are remembered while a file is unchanged, recomputed as
soon as it may have changed, and every merge record says which algorithm and which digests came from the cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import pytest

from cli_helpers import write_config
from mergelab.io.file_hashes import cached_digest, hash_cache_dir


def _file(tmp_path: Path, data: bytes = b"weights" * 1000) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    return path


def _blake3(data: bytes) -> str:
    import blake3

    return str(blake3.blake3(data).hexdigest())


def cached_sha256(path: Path, cache: Path | None = None) -> tuple[str, bool]:
    return cached_digest(path, "sha256", cache)


# the algorithms' published digests of the empty input (BLAKE3's test vectors; FIPS 180-4's SHA-256 of "")
EMPTY = {"blake3": "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
         "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}


@pytest.mark.parametrize("algorithm", sorted(EMPTY))
def test_the_digest_of_an_empty_file_is_the_published_one(tmp_path: Path, algorithm: str) -> None:
    from mergelab.io.file_hashes import file_digest

    assert file_digest(_file(tmp_path, b""), algorithm) == EMPTY[algorithm]  # type: ignore[arg-type]


def test_the_default_digest_is_blake3_and_the_cache_keeps_each_algorithm_apart(tmp_path: Path) -> None:
    path, cache = _file(tmp_path), tmp_path / "cache"
    data = path.read_bytes()
    assert cached_digest(path, cache=cache) == (_blake3(data), False)
    # a sha256 is never answered with the blake3 digest remembered for the same file, nor the other way round
    assert cached_digest(path, "sha256", cache) == (hashlib.sha256(data).hexdigest(), False)
    assert cached_digest(path, "sha256", cache) == (hashlib.sha256(data).hexdigest(), True)
    assert cached_digest(path, "blake3", cache) == (_blake3(data), True)
    assert len(list(cache.glob("*.json"))) == 2


def test_an_unknown_algorithm_is_refused_by_name(tmp_path: Path) -> None:
    from mergelab.io.file_hashes import file_digest

    with pytest.raises(ValueError, match=r"'md5'.*blake3, sha256"):
        file_digest(_file(tmp_path), "md5")  # type: ignore[arg-type]


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
    for text in ("{not json", json.dumps({**json.loads(entry.read_text()), "sha256": "0" * 63}), "[]",
                 json.dumps({**json.loads(entry.read_text()), "sha256": None, "blake3": "0" * 64})):
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
    one, two = first["input_digests"], second["input_digests"]
    assert one["algorithm"] == two["algorithm"] == "blake3"
    assert one["files"] == two["files"] and len(one["files"]) == 4
    assert all(d == _blake3(Path(f).read_bytes()) for f, d in one["files"].items())
    assert one["from_cache"] == []
    assert sorted(two["from_cache"]) == sorted(two["files"])


def test_a_merge_hashes_with_the_algorithm_asked_for_or_not_at_all(families: dict[str, tuple[Path, list[Path]]],
                                                                  tmp_path: Path) -> None:
    import mergelab
    from mergelab.errors import UsageError

    base, fts = families["llama"]
    config = write_config(tmp_path, {"merge_method": "linear", "models": [{"model": str(p)} for p in (base, *fts)]})
    record = mergelab.merge(config, tmp_path / "sha", progress=False, digest="sha256").record
    assert record["input_digests"]["algorithm"] == "sha256"
    files = record["input_digests"]["files"]
    assert len(files) == 4 and all(d == hashlib.sha256(Path(f).read_bytes()).hexdigest() for f, d in files.items())
    assert mergelab.merge(config, tmp_path / "none", progress=False, hash_inputs=False).record["input_digests"] is None
    with pytest.raises(UsageError, match=r"'md5'.*blake3, sha256"):
        mergelab.merge(config, tmp_path / "md5", progress=False, digest="md5")  # type: ignore[arg-type]
    assert not (tmp_path / "md5").exists()


def test_the_cli_hashes_with_sha256_on_request_and_refuses_an_unknown_algorithm(
        families: dict[str, tuple[Path, list[Path]]], tmp_path: Path) -> None:
    from cli_helpers import run_cli

    base, fts = families["llama"]
    config = write_config(tmp_path, {"merge_method": "linear", "models": [{"model": str(p)} for p in (base, *fts)]})
    refused = run_cli(config, tmp_path / "md5", "--hash", "md5")
    assert refused.exit_code == 2  # a usage error, as --device potato
    assert "--hash md5" in refused.output and "blake3, sha256" in refused.output
    assert "Traceback" not in refused.output and not (tmp_path / "md5").exists()
    done = run_cli(config, tmp_path / "sha", "--hash", "sha256")
    assert done.exit_code == 0, done.output
    record = json.loads((tmp_path / "sha" / "mergelab.json").read_text())
    assert record["input_digests"]["algorithm"] == "sha256"
    assert record["input_digests"]["files"][str(fts[0] / "model.safetensors")] == hashlib.sha256(
        (fts[0] / "model.safetensors").read_bytes()).hexdigest()


def test_readinto_digest_equals_the_whole_buffers_digest_across_block_edges(tmp_path: Path) -> None:
    from mergelab.io import file_hashes

    for size in (0, 1, file_hashes._READ_BLOCK - 1, file_hashes._READ_BLOCK, 2 * file_hashes._READ_BLOCK + 7):
        data = os.urandom(size)
        path = _file(tmp_path, data)
        assert file_hashes.file_digest(path, "sha256") == hashlib.sha256(data).hexdigest()
        assert file_hashes.file_digest(path) == _blake3(data)


def test_a_file_held_twice_is_hashed_once_and_a_released_one_is_hashed_again(tmp_path: Path) -> None:
    from mergelab.io.file_hashes import DigestPool

    pool, cache, path = DigestPool(), tmp_path / "cache", _file(tmp_path)
    first = pool.acquire(path, cache)
    assert pool.acquire(path, cache) is first
    assert first.result() == (_blake3(path.read_bytes()), False)
    assert pool.acquire(path, cache, "sha256") is not first  # another algorithm, another job
    pool.release(pool.acquire(path, cache, "sha256"))
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
    assert after is not before and after.result()[0] == _blake3(b"other weights")


def test_a_digest_nobody_holds_stops_within_one_block(tmp_path: Path) -> None:
    import threading

    from mergelab.io.file_hashes import DigestAbandoned, file_digest

    stop = threading.Event()
    stop.set()
    path = _file(tmp_path, b"x" * (3 << 22))
    for algorithm in ("blake3", "sha256"):
        with pytest.raises(DigestAbandoned):
            file_digest(path, algorithm, stop)


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
    from mergelab.io.file_hashes import file_digest

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        file_digest(fifo)  # opened without waiting for a writer
