"""Read checkpoints of any common layout one tensor at a time.

Supported: a Hugging Face model folder (``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, ``pytorch_model.bin`` sharded or not), a single ``.safetensors`` file,
and a PyTorch ``.pt/.pth/.bin`` state dict. Safetensors are read one tensor at a time into fresh buffers
(see io/safetensors_file.py for why not memory-mapped); pickles are loaded with ``weights_only=True``
(memory-mapped where the zip format allows), so no pickled code ever runs.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import CheckpointError
from mergelab.io.checkpoint_files import PICKLE_SUFFIXES, files_in_folder, refuse_special_file
from mergelab.io.safetensors_file import SAFETENSORS_DTYPES, SafetensorsFile, is_safetensors

_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights")
READABLE_DTYPES = frozenset(SAFETENSORS_DTYPES.values())  # what the writer can write back


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        # dtype.itemsize, not an element_size() of a new tensor: this runs per piece in the engine's loops
        # (0.6 s of a TIES merge's threads at 3 × 2 GB, py-spy)
        return self.numel * self.dtype.itemsize


class CheckpointReader:
    """One checkpoint: tensor names, shapes and dtypes up front; tensor data on demand.

    Open with :func:`open_checkpoint`. ``files`` are the data files (for hashing), ``folder`` the model
    folder whose ``config.json`` and tokenizer files can be copied to the output.
    """

    def __init__(self, path: Path, files: list[Path], folder: Path | None,
                 weight_map: dict[str, str] | None = None) -> None:
        self.path = path
        self.files = files
        self.folder = folder
        self._meta: dict[str, TensorMeta] = {}
        self._where: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._file_of: dict[str, Path] = {}
        try:
            for file in files:
                self._index(file)
            if weight_map is not None:
                self._check_weight_map(weight_map)
            if not self._meta:
                raise CheckpointError(f"{path}: holds no tensors; there is nothing to merge")
        except BaseException:
            self.close()
            raise

    # -- loading ------------------------------------------------------------------------------------------
    def _index(self, file: Path) -> None:
        if _holds_safetensors(file):
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
        self._file_of[name] = file

    def _check_weight_map(self, weight_map: dict[str, str]) -> None:
        """The index and the shards must agree: a listed tensor that no shard holds would be dropped from the
        merge, and one a shard holds but the index does not list is one the index's readers never see."""
        where = self.folder if self.folder is not None else self.path
        for name, shard in weight_map.items():
            found = self._file_of.get(name)
            if found is None:
                raise CheckpointError(f"{where}: the shard index lists tensor '{name}' in '{shard}', but no shard "
                                      "holds it; the checkpoint is incomplete: copy or save it again")
            if self.folder is not None and found != self.folder / shard:
                raise CheckpointError(f"{where}: the shard index lists tensor '{name}' in '{shard}', but it is "
                                      f"in '{found.name}'; fix or regenerate the index")
        unlisted = [n for n in self._meta if n not in weight_map]
        if unlisted:
            raise CheckpointError(f"{where}: shard(s) hold {len(unlisted)} tensor(s) that the shard index does not "
                                  f"list, e.g. {unlisted[:3]}; fix or regenerate the index")

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
        except (OSError, ValueError, RecursionError) as exc:  # bad JSON, not UTF-8, nested too deeply
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
            if file.suffix == ".safetensors":  # torch.load would hand a path so named to safetensors
                with open(file, "rb") as f:
                    obj = torch.load(f, map_location="cpu", weights_only=True)
            else:
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
    odd_keys = [k for k in obj if not isinstance(k, str) or k == "__metadata__"]
    if odd_keys:  # the safetensors output names tensors by strings, and "__metadata__" is the format's own
        raise CheckpointError(f"{file}: state dict keys {odd_keys[:5]!r} are not tensor names (strings other than "
                              "'__metadata__'); save model.state_dict() instead")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{file}: entries {bad[:5]} are not tensors; save model.state_dict() instead")
    for name, tensor in obj.items():
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type != "cpu":
            what = "quantized" if tensor.is_quantized else f"{tensor.layout} on {tensor.device}"
            raise CheckpointError(f"{file}: tensor '{name}' is a {what} tensor; mergelab merges dense tensors: "
                                  "save a dense state dict (tensor.to_dense(), dequantize()) first")
        if tensor.dtype not in READABLE_DTYPES:
            raise CheckpointError(f"{file}: tensor '{name}' has unsupported dtype {tensor.dtype}; mergelab reads "
                                  f"{', '.join(sorted(str(d).removeprefix('torch.') for d in READABLE_DTYPES))}")
    return dict(obj)


def _unpickling_reason(exc: pickle.UnpicklingError) -> str:
    """The specific part of torch's weights-only refusal (e.g. "Unsupported global: GLOBAL posix.system ...").

    The rest of torch's message is generic and suggests re-running with ``weights_only=False``, which is
    exactly the arbitrary-code-execution path we refuse, so it is not repeated to the user.
    """
    match = re.search(r"((?:Unsupported|Trying to load)[^\n]*?)(?:\.\s|\.?$)", str(exc), re.MULTILINE)
    return match.group(1) if match else "an object that is not a tensor or a plain container"


def _holds_safetensors(file: Path) -> bool:
    """Read as safetensors or as a PyTorch pickle? By content first (a ``.bin`` may hold safetensors, and a
    ``.safetensors`` a zip or pickle, which is then loaded with weights_only), by the name otherwise."""
    if is_safetensors(file):
        return True
    try:
        with open(file, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    looks_pickled = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # torch zip / pickle protocol 2+
    return file.suffix == ".safetensors" and not looks_pickled


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open a model folder or a checkpoint file.

    Never downloads: a hub id that is not a local path is an error.
    """
    p = Path(path).expanduser()
    refuse_special_file(p)
    if p.is_dir():
        files, weight_map = files_in_folder(p)
        return CheckpointReader(p, files, p, weight_map)
    if p.is_file():
        if p.suffix != ".safetensors" and p.suffix not in PICKLE_SUFFIXES and not is_safetensors(p):
            raise CheckpointError(f"{p}: unknown checkpoint type '{p.suffix}'; use .safetensors, .bin, .pt "
                                  "or .pth")
        return CheckpointReader(p, [p], None)
    raise CheckpointError(f"{p}: no such file or folder (mergelab never downloads; point to a local model "
                          "folder or checkpoint file)")
