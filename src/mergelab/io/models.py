"""Open a model as a config names it: a local folder or file, a Hub id from the local cache, a PEFT LoRA
adapter folder (folded into the base its config names), or mergekit's ``model+adapter``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mergelab.errors import CheckpointError
from mergelab.io.hub import locate
from mergelab.io.peft import adapter_base_name, fold_lora, is_adapter_folder
from mergelab.io.readers import CheckpointReader, open_checkpoint


def _plain(spec: str) -> Path:
    return Path(spec).expanduser()


def open_model(spec: str, resolve: Callable[[str], Path] = _plain) -> CheckpointReader:
    """A reader for the model ``spec``; ``resolve`` turns a relative path into a local one (config folder)."""
    path = resolve(spec)
    if not path.exists() and "+" in spec:
        model, adapter = spec.rsplit("+", 1)
        return _with_adapter(open_model(model, resolve), locate(adapter, resolve), spec)
    path = locate(spec, resolve)
    if is_adapter_folder(path):
        base = adapter_base_name(path)
        if base is None:
            raise CheckpointError(f"{path}: a LoRA adapter whose adapter_config.json names no "
                                  "base_model_name_or_path; name its base as BASE+ADAPTER in the config")
        base_path = Path(base).expanduser()
        if not base_path.is_absolute() and not base_path.exists() and (path / base).exists():
            base_path = path / base
        try:
            base_reader = open_checkpoint(base_path) if base_path.exists() else open_model(base)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: the base model of this LoRA adapter, '{base}', cannot be opened: "
                                  f"{exc}. Name it explicitly as BASE+ADAPTER in the config") from None
        return _with_adapter(base_reader, path, spec)
    return open_checkpoint(path)


def _with_adapter(base: CheckpointReader, adapter: Path, spec: str) -> CheckpointReader:
    if not is_adapter_folder(adapter):
        base.close()
        raise CheckpointError(f"{spec}: '{adapter}' is not a PEFT adapter folder (no adapter_config.json)")
    return fold_lora(base, adapter)
