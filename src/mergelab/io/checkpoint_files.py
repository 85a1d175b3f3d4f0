"""Which files hold a model's weights: the shard index's files, else the single checkpoint, else every
safetensors (or pickle) file of the folder. Paths and JSON only, no torch: the CLI finds a merge's input files
with it before torch is imported, to start their digests (merge/inputs.py) while the import runs."""

from __future__ import annotations

import json
from pathlib import Path

from mergelab.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _shard_path(folder: Path, shard: str, index: Path) -> Path:
    """``folder / shard``, refusing a name that leaves the folder (``../x``, ``/abs``): an index must not
    make mergelab read (and hash into the record) files outside the model it describes. Checked on the name,
    not the resolved path, so that shards which are symlinks (the Hugging Face cache) still work."""
    parts = Path(shard).parts
    # a backslash is a folder separator where the index may have been written (Windows)
    if not parts or Path(shard).is_absolute() or ".." in parts or "\\" in shard:
        raise CheckpointError(f"{index}: shard '{shard}' is not a file name inside {folder}; an index may only "
                              "name files in its own folder")
    return folder / shard


def read_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("'weight_map' must map tensor names to shard file names")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:  # ValueError: bad JSON
        raise CheckpointError(f"{index}: invalid shard index ({type(exc).__name__}: {exc}); expected a "
                              "'weight_map'") from None
    if not weight_map:
        raise CheckpointError(f"{index}: the shard index lists no tensors ('weight_map' is empty); there is "
                              "nothing to merge")
    return weight_map


def files_in_folder(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of a model folder and its shard index's weight map (None without an index); a
    :class:`CheckpointError` names what is missing or malformed."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = read_weight_map(index)
            files: dict[Path, None] = {}  # "x" and "./x" are one file
            for shard in dict.fromkeys(weight_map.values()):
                path = _shard_path(folder, shard, index)
                refuse_special_file(path)
                if not path.is_file():
                    raise CheckpointError(f"{index}: lists shard '{shard}', which is missing from {folder}")
                files[path] = None
            return list(files), weight_map
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single], None
    found = (sorted(folder.glob("*.safetensors"))
             or sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES))
    for path in found:
        refuse_special_file(path)
    if not found:
        raise CheckpointError(f"{folder}: no model.safetensors, sharded index or pytorch_model.bin found in "
                              "this folder")
    return found, None


def refuse_special_file(path: Path) -> None:
    """A :class:`CheckpointError` for a path that exists but is no regular file (a FIFO, socket or device,
    perhaps behind a symlink): reading one blocks or never ends."""
    if path.exists() and not path.is_file() and not path.is_dir():
        raise CheckpointError(f"{path}: not a regular file (a FIFO, socket or device); a checkpoint must be a "
                              "file on disk")
