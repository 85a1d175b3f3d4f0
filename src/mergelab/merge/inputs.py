"""A merge config's input files, found without torch, and their digests started early.

The CLI reads the config's model paths (``base_model``, ``models[*].model``, ``slices[*].sources[*].model``,
tokenizer sources, in every document of a multi-stage file) and starts the digests of their weight files on
the digest pool's threads before it imports torch and the engine: the digests then run on the second core
while the first imports (1.3-1.6 s here), and the engine, asking for the same files, gets the same jobs.
Best effort: a path that cannot be found here is left to the engine, which reports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mergelab.errors import ConfigError, MergeLabError
from mergelab.io.checkpoint_files import files_in_folder
from mergelab.io.file_hashes import DEFAULT_DIGEST, DIGESTS, DigestAlgorithm
from mergelab.io.hub import locate
from mergelab.safe_yaml import load_yaml_documents, read_config_text


def resolve_model_path(model: str, config_folder: Path | None) -> Path:
    """A model path as mergekit reads it (relative to the working directory), else relative to the YAML."""
    p = Path(model).expanduser()
    if p.exists() or p.is_absolute() or config_folder is None:
        return p
    alt = config_folder / p
    return alt if alt.exists() else p


def _entries(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []  # anything else: the config's validation says what is wrong


def model_refs(doc: dict[str, Any]) -> list[tuple[Callable[[str], None], str]]:
    """(setter, value) of every model path in one stage's config (parts of the wrong type are skipped)."""
    refs: list[tuple[Callable[[str], None], str]] = []

    def take(holder: dict[str, Any], key: str) -> None:
        if isinstance(holder.get(key), str):
            refs.append((lambda v, h=holder, k=key: h.__setitem__(k, v), holder[key]))

    take(doc, "base_model")
    take(doc, "tokenizer_source")
    tokenizer = doc.get("tokenizer")
    if isinstance(tokenizer, dict):
        take(tokenizer, "source")
        tokens = tokenizer.get("tokens")
        for setting in tokens.values() if isinstance(tokens, dict) else ():
            if isinstance(setting, dict):
                take(setting, "source")
                if isinstance(setting.get("source"), dict):
                    take(setting["source"], "model")
    for entry in _entries(doc.get("models")):
        if isinstance(entry, dict):
            take(entry, "model")
    for sl in _entries(doc.get("slices")):
        if isinstance(sl, dict):
            take(sl, "base_model")
            for src in _entries(sl.get("sources")):
                if isinstance(src, dict):
                    take(src, "model")
    return refs


def _weight_files(spec: str, folder: Path) -> list[Path]:
    """The weight files of the model ``spec`` names, found as ``io.models.open_model`` finds them."""
    def resolve(s: str) -> Path:
        return resolve_model_path(s, folder)

    if not resolve(spec).exists() and "+" in spec:  # mergekit's MODEL+ADAPTER: the model's files are the large ones
        spec = spec.rsplit("+", 1)[0]
    path = locate(spec, resolve)
    if path.is_file():
        return [path]
    return files_in_folder(path)[0] if path.is_dir() else []


def config_input_files(config: Path) -> list[Path]:
    """The weight files the models of the YAML ``config`` name, as far as they can be found (never raises)."""
    try:  # a pipe, a device or a huge file is never read here (safe_yaml.read_config_text): the engine refuses it
        docs = [d for d in load_yaml_documents(read_config_text(config), str(config)) if isinstance(d, dict)]
    except ConfigError:
        return []
    found: dict[Path, None] = {}
    for doc in docs:
        for _, spec in model_refs(doc):
            try:
                found.update(dict.fromkeys(_weight_files(spec, config.parent)))
            except (OSError, ValueError, MergeLabError):
                continue  # not found here: the engine says why
    return list(found)


@contextmanager
def digests_started(files: list[Path], algorithm: DigestAlgorithm = DEFAULT_DIGEST) -> Iterator[None]:
    """Start the digests of ``files`` now; those the merge has not claimed by the end are stopped."""
    held = []
    try:
        for f in files:
            try:
                held.append(DIGESTS.acquire(f, algorithm=algorithm))
            except OSError:
                continue
        yield
    finally:
        for future in held:
            DIGESTS.release(future)
