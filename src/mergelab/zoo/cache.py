"""On-disk cache for trained models and generated data, keyed by a hash of the recipe that made them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

ENV_VAR = "MERGELAB_CACHE"


def cache_dir() -> Path:
    """``$MERGELAB_CACHE`` if set, else ``~/.cache/mergelab/zoo`` (created on first use)."""
    root = os.environ.get(ENV_VAR)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "mergelab" / "zoo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def recipe_hash(recipe: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able recipe (sorted keys, so dict order never matters)."""
    blob = json.dumps(recipe, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def load_entry(key: str, root: Path | None = None) -> dict[str, Any] | None:
    """The cached payload for ``key``, or None when absent or unreadable (a corrupt entry is retrained)."""
    path = (root or cache_dir()) / f"{key}.pt"
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated file from a killed run: treat as a miss
        return None


def save_entry(key: str, payload: dict[str, Any], root: Path | None = None) -> Path:
    """Write atomically (temp file + rename) so concurrent or interrupted runs never leave half a file."""
    folder = root or cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.pt"
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
