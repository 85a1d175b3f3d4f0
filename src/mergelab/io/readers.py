"""Read checkpoints of any common layout one tensor at a time.

Supported: a Hugging Face model folder (``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, ``pytorch_model.bin`` sharded or not), a single ``.safetensors`` file,
and a PyTorch ``.pt/.pth/.bin`` state dict. Safetensors are memory-mapped and only the requested tensor
is materialised; pickles are loaded with ``weights_only=True`` (memory-mapped where the zip format allows),
so no pickled code ever runs.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mergelab.errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
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
            try:
                handle = safe_open(str(file), framework="pt")
                names = list(handle.keys())
                for name in names:
                    sl = handle.get_slice(name)
                    dtype_name = sl.get_dtype()
                    if dtype_name not in SAFETENSORS_DTYPES:
                        raise CheckpointError(f"{file}: tensor '{name}' has unsupported dtype {dtype_name}")
                    self._add(name, TensorMeta(tuple(sl.get_shape()), SAFETENSORS_DTYPES[dtype_name]),
                              handle, file)
            except SafetensorError as exc:
                raise CheckpointError(
                    f"{file}: not a valid safetensors file ({exc}); it is probably truncated or corrupted: "
                    "copy or save it again"
                ) from None
            self._handles.append(handle)
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
        try:
            return where.get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor '{name}' ({exc}); the file may be "
                                  "truncated: copy or save it again") from None

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._meta:
            yield name, self.get(name)

    def config(self) -> dict[str, Any]:
        """The model folder's ``config.json`` (empty if there is none)."""
        if self.folder is None or not (self.folder / "config.json").is_file():
            return {}
        return json.loads((self.folder / "config.json").read_text())

    def close(self) -> None:
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
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            obj = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{file}: refused to load: the pickle contains objects other than tensors and plain containers "
            f"(torch.load weights_only=True said: {str(exc).splitlines()[0]}). mergelab never runs pickled "
            "code; convert the checkpoint to safetensors in an environment you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot read PyTorch checkpoint ({str(exc).splitlines()[0]}); it may be "
                              "truncated or not a state dict") from None
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], dict) and not isinstance(obj.get(key), torch.Tensor):
                inner = obj[key]
                if inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                    obj = inner
                    break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{file}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{file}: entries {bad[:5]} are not tensors; save model.state_dict() instead")
    return dict(obj)


def _files_in_folder(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: invalid shard index ({exc}); expected a 'weight_map'") from None
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
    found = sorted(folder.glob("*.safetensors")) or sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if not found:
        raise CheckpointError(f"{folder}: no model.safetensors, sharded index or pytorch_model.bin found in this folder")
    return found


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open a model folder or a checkpoint file. Never downloads: a hub id that is not a local path is an error."""
    p = Path(path).expanduser()
    if p.is_dir():
        return CheckpointReader(p, _files_in_folder(p), p)
    if p.is_file():
        if p.suffix != ".safetensors" and p.suffix not in _PICKLE_SUFFIXES:
            raise CheckpointError(f"{p}: unknown checkpoint type '{p.suffix}'; use .safetensors, .bin, .pt or .pth")
        return CheckpointReader(p, [p], None)
    raise CheckpointError(f"{p}: no such file or folder (mergelab never downloads; point to a local model folder "
                          "or checkpoint file)")
