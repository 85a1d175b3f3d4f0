"""Models named by Hugging Face Hub id (``org/name``, optionally ``org/name@revision``), found in the local cache.

mergelab never downloads: an id resolves only to a snapshot already in the Hugging Face cache
(``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``), through ``huggingface_hub`` with
``local_files_only=True``. Anything else is a clear error that says how to get the files there.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from mergelab.errors import CheckpointError

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` if ``spec`` has the form of a Hub id, else None."""
    m = _HUB_ID.match(spec)
    if m is None or spec.startswith(("./", "../")) or spec.endswith((".safetensors", ".bin", ".pt", ".pth")):
        return None
    return m.group("repo"), m.group("rev")


def locate(spec: str, resolve: Callable[[str], Path]) -> Path:
    """The local path of ``spec``: ``resolve(spec)`` if it exists, else the cached snapshot of a Hub id."""
    path = resolve(spec)
    if path.exists() or parse_hub_id(spec) is None:
        return path
    return resolve_hub_id(spec)


def resolve_hub_id(spec: str) -> Path:
    """The local snapshot folder of the Hub id ``spec``; :class:`CheckpointError` if it is not cached."""
    parsed = parse_hub_id(spec)
    if parsed is None:
        raise CheckpointError(f"{spec}: not a Hub id (expected org/name or org/name@revision)")
    repo, revision = parsed
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(f"{spec}: no such file or folder, and huggingface_hub (needed to look it up in the "
                              "Hugging Face cache) is not installed: pip install huggingface_hub") from None
    try:
        folder = snapshot_download(repo, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as exc:
        rev = f" at revision '{revision}'" if revision else ""
        raise CheckpointError(
            f"{spec}: no such file or folder, and Hub model '{repo}'{rev} is not in the local Hugging Face cache "
            f"({_cache_dir()}). mergelab never downloads: fetch it first, e.g. `huggingface-cli download "
            f"{repo}" + (f" --revision {revision}" if revision else "") + "`, or point to a local folder"
            f" ({type(exc).__name__})") from None
    return Path(str(folder))


def _cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - checked by the caller
        return "~/.cache/huggingface/hub"


_LFS_OID = re.compile(r"^[0-9a-f]{64}$")


def cached_lfs_oid(path: Path) -> str | None:
    """The sha256 the Hub gives ``path`` (its LFS oid) where ``path`` is a weight file of a Hugging Face cache
    snapshot, else None. The cache keeps each downloaded LFS file once as ``models--org--name/blobs/<oid>`` and
    links the snapshot's file name to it, so the oid is read from the link's target, not recomputed: it says
    which Hub file this is, at no cost, beside mergelab's own digest of the bytes (io/file_hashes.py)."""
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # gone, or a loop of links
        return None
    blobs = target.parent
    if blobs.name != "blobs" or not blobs.parent.name.startswith("models--") or not _LFS_OID.match(target.name):
        return None
    return target.name
