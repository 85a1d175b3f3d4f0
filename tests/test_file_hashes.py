"""Input digests are remembered while a file is unchanged, recomputed as soon as it may have changed, and
every merge record says which digests came from the cache."""

from __future__ import annotations

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
