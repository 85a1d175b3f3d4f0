"""Read checkpoints of any common layout one tensor at a time.

Supported: a Hugging Face model folder (``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, ``pytorch_model.bin`` sharded or not), a single ``.safetensors`` file,
and a PyTorch ``.pt/.pth/.bin`` state dict. Safetensors are read one tensor at a time into fresh buffers
(see io/safetensors_file.py for why not memory-mapped); pickles are loaded with ``weights_only=True``
(memory-mapped where the zip format allows), so no pickled code ever runs.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import CheckpointError
from mergelab.io.safetensors_file import SafetensorsFile

_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class CheckpointReader:
    """One checkpoint: tensor names, shapes and dtypes up front; tensor data on demand.

    Open with :func:`open_checkpoint`. ``files`` are the data files (for hashing), ``folder`` the model
    folder whose ``config.json`` and tokenizer files can be copied to the output.
    """

    def __init__(self, path: Path, files: list[Path], folder: Path | None) -> None:
        self.path = path
        self.files = files
        self.folder = folder
        self._meta: dict[str, TensorMeta] = {}
        self._where: dict[str, Any] = {}
        self._handles: list[Any] = []
        for file in files:
            self._index(file)

    # -- loading ------------------------------------------------------------------------------------------
    def _index(self, file: Path) -> None:
        if file.suffix == ".safetensors":
            handle = SafetensorsFile(file)
            self._handles.append(handle)
            for name, entry in handle.entries.items():
                self._add(name, TensorMeta(entry.shape, entry.dtype), handle, file)
        else:
            state = _load_pickle_state_dict(file)
            for name, tensor in state.items():
                self._add(name, TensorMeta(tuple(tensor.shape), tensor.dtype), tensor, file)

    def _add(self, name: str, meta: TensorMeta, where: Any, file: Path) -> None:
        if name in self._meta:
            raise CheckpointError(f"{file}: tensor '{name}' appears in more than one file of {self.path}")
        self._meta[name] = meta
        self._where[name] = where

    # -- API ----------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def meta(self, name: str) -> TensorMeta:
        return self._meta[name]

    def get(self, name: str) -> torch.Tensor:
        where = self._where[name]
        if isinstance(where, torch.Tensor):
            return where
        return where.get(name)

    def get_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Entries ``[start, stop)`` of the flattened tensor ``name``; safetensors read only those bytes."""
        where = self._where[name]
        if isinstance(where, torch.Tensor):
            return where.reshape(-1)[start:stop]
        return where.get_flat(name, start, stop)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._meta:
            yield name, self.get(name)

    def config(self) -> dict[str, Any]:
        """The model folder's ``config.json`` (empty if there is none)."""
        path = self.folder / "config.json" if self.folder is not None else None
        if path is None or not path.is_file():
            return {}
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
            raise CheckpointError(f"{path}: not a valid config.json ({exc}); fix or remove it") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
        return cfg

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles.clear()
        self._where.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self._meta)} tensors)"


def _load_pickle_state_dict(file: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols its safe unpickler may not fully support; whatever it
            # cannot read becomes a clear error below, so the warning only adds noise before it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc) and "zip" not in str(exc):
                    raise
                obj = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{file}: refused to load: the pickle contains objects other than tensors and plain containers "
            f"({_unpickling_reason(exc)}). mergelab never runs pickled code; convert the checkpoint to "
            "safetensors in an environment you trust"
        ) from None
    except Exception as exc:
        # A damaged or foreign file makes torch.load fail in many ways (RuntimeError, EOFError, OSError,
        # KeyError for a bad legacy magic number, ...): every one of them means "cannot read this file".
        first_line = (str(exc).splitlines() or [""])[0]
        if isinstance(exc, KeyError) or not first_line:  # e.g. KeyError: 101, from a bad magic number
            first_line = f"unrecognised format: {type(exc).__name__} {first_line}".strip()
        raise CheckpointError(f"{file}: cannot read PyTorch checkpoint ({first_line}); it may be truncated "
                              "or not a state dict") from None
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], dict) and not isinstance(obj.get(key), torch.Tensor):
                inner = obj[key]
                if inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                    obj = inner
                    break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{file}: expected a state dict (a mapping of names to tensors), "
                              f"got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{file}: entries {bad[:5]} are not tensors; save model.state_dict() instead")
    return dict(obj)


def _unpickling_reason(exc: pickle.UnpicklingError) -> str:
    """The specific part of torch's weights-only refusal (e.g. "Unsupported global: GLOBAL posix.system ...").

    The rest of torch's message is generic and suggests re-running with ``weights_only=False``, which is
    exactly the arbitrary-code-execution path we refuse, so it is not repeated to the user.
    """
    match = re.search(r"((?:Unsupported|Trying to load)[^\n]*?)(?:\.\s|\.?$)", str(exc), re.MULTILINE)
    return match.group(1) if match else "an object that is not a tensor or a plain container"


def _files_in_folder(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                               for v in weight_map.values()):
                    raise TypeError("'weight_map' must map tensor names to shard file names")
            except (OSError, ValueError, KeyError, TypeError) as exc:  # ValueError: bad JSON
                raise CheckpointError(f"{index}: invalid shard index ({exc}); expected a 'weight_map'") \
                    from None
            files = []
            for shard in dict.fromkeys(weight_map.values()):
                path = folder / shard
                if not path.is_file():
                    raise CheckpointError(f"{index}: lists shard '{shard}', which is missing from {folder}")
                files.append(path)
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    found = (sorted(folder.glob("*.safetensors"))
             or sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES))
    if not found:
        raise CheckpointError(f"{folder}: no model.safetensors, sharded index or pytorch_model.bin found in "
                              "this folder")
    return found


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open a model folder or a checkpoint file.

    Never downloads: a hub id that is not a local path is an error.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        return CheckpointReader(p, _files_in_folder(p), p)
    if p.is_file():
        if p.suffix != ".safetensors" and p.suffix not in _PICKLE_SUFFIXES:
            raise CheckpointError(f"{p}: unknown checkpoint type '{p.suffix}'; use .safetensors, .bin, .pt "
                                  "or .pth")
        return CheckpointReader(p, [p], None)
    raise CheckpointError(f"{p}: no such file or folder (mergelab never downloads; point to a local model "
                          "folder or checkpoint file)")
