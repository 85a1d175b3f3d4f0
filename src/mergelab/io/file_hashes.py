"""sha256 of input files for the merge record, remembered between runs.

Hashing costs about 1 s of CPU per 1.5 GB (measured by benchmarks/vs_mergekit.py), on cores the merge
needs. A file's digest is kept in a small JSON entry keyed by its resolved path and reused while the file's
size, mtime_ns, ctime_ns, inode and device are all unchanged (ctime moves on any write or ``touch``, and
no tool can set it back). Each merge record says which digests were computed and which came from the
cache. ``$MERGELAB_HASH_CACHE`` chooses the folder (default ``~/.cache/mergelab/sha256``; ``off``: always
compute).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

ENV_VAR = "MERGELAB_HASH_CACHE"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_cache_dir() -> Path | None:
    """Where digests are remembered, or None when ``$MERGELAB_HASH_CACHE`` is ``off``."""
    root = os.environ.get(ENV_VAR)
    if root is not None and root.strip().lower() in ("off", "0", "no", "false", ""):
        return None
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mergelab" / "sha256"


def _identity(path: Path) -> dict[str, int | str]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "inode": st.st_ino, "device": st.st_dev}


def cached_sha256(path: Path, cache: Path | None = None) -> tuple[str, bool]:
    """The sha256 hex digest of ``path`` and whether it came from the cache (``cache``: the folder;
    default :func:`hash_cache_dir`). A cache that cannot be read or written is ignored, never an error."""
    folder = cache if cache is not None else hash_cache_dir()
    if folder is None:
        return sha256_file(path), False
    identity = _identity(path)
    entry = folder / (hashlib.sha256(str(identity["path"]).encode()).hexdigest()[:32] + ".json")
    try:
        known = json.loads(entry.read_text())
        if isinstance(known, dict) and {k: known.get(k) for k in identity} == identity:
            digest = known.get("sha256")
            if isinstance(digest, str) and len(digest) == 64:
                return digest, True
    except (OSError, ValueError):
        pass
    digest = sha256_file(path)
    if _identity(path) != identity:  # written to while being hashed: remember nothing
        return digest, False
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({**identity, "sha256": digest}, f)
        os.replace(tmp, entry)  # atomic: a concurrent merge reads the old entry or the new one
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return digest, False
