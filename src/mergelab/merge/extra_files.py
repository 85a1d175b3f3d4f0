"""Copy the files a merged model needs besides its weights: everything in the base model's folder that is not
a weight file (sentence-transformers' ``modules.json``, ``1_Pooling/``, ``2_Normalize/``,
``sentence_bert_config.json``, chat templates, preprocessor configs, ...).

The engine copies ``config.json`` and the tokenizer files it knows by name itself (from ``tokenizer_source``
where one is given); this module copies the rest of the base's folder. Left out: the base's weights in any
format (they would contradict the merged ones: ``onnx/``, ``openvino/``, ``*.gguf``...), its model card
(``README.md`` describes the base, not the merge), version-control files, and files that look like a
tokenizer when the tokenizer comes from another model (they would mix two vocabularies).
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx",
                   ".onnx_data", ".tflite", ".ot", ".npz", ".mlmodel", ".pb")
_SKIPPED_FOLDERS = {"onnx", "openvino", "coreml", "tf_model", "flax_model", ".git", ".cache", "__pycache__"}
_SKIPPED_FILES = {"README.md", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                  "tf_model.h5.index.json", "mergelab.json", "mergelab_config.yml", ".gitattributes", ".gitignore",
                  "adapter_config.json", "mergelab_example.json"}
_TOKENIZER_LIKE = re.compile(r"(tokenizer|vocab|merges\.txt|special_tokens|added_tokens|chat_template|"
                             r"spiece|sentencepiece|\.model$|\.tiktoken$)", re.IGNORECASE)


# Training leftovers beside a model (Trainer checkpoints, TensorBoard runs) are not part of it.
_TRAINING_FOLDERS = re.compile(r"^(checkpoint-\d+|runs|logs|wandb)$")


def _wanted(rel: Path) -> bool:
    if any(part in _SKIPPED_FOLDERS or part.startswith(".") or _TRAINING_FOLDERS.match(part)
           for part in rel.parts[:-1]):
        return False
    name = rel.name
    return not (name in _SKIPPED_FILES or name.startswith(".") or name.lower().endswith(WEIGHT_SUFFIXES))


def stays_inside(path: Path, folder: Path) -> bool:
    """Whether the file ``path`` of the model folder ``folder`` is really inside it once links are followed.

    A model folder is someone else's: its ``tokenizer.json`` may be a symbolic link to ``~/.ssh/id_rsa``, and
    copying it would put that file into the merged model the user then shares. Allowed targets are the folder
    itself and, for a Hugging Face cache snapshot (``models--org--name/snapshots/REV/``), that entry's
    ``blobs/``, where the hub's own links point.
    """
    real = path.resolve()
    if real.is_relative_to(folder.resolve()):
        return True
    return folder.parent.name == "snapshots" and real.is_relative_to(folder.parent.parent.resolve() / "blobs")


def refuse_outside(path: Path, folder: Path) -> bool:
    """:func:`stays_inside`, warning (once per file) when it does not: such a file is not copied."""
    if stays_inside(path, folder):
        return False
    warnings.warn(f"{path} is a link to {path.resolve()}, outside the model folder {folder}: not copied to the "
                  "merged model (copy it yourself if you trust it)", stacklevel=2)
    return True


def copy_extra_files(model_folder: Path | None, tokenizer_folder: Path | None, dest: Path,
                     already: Iterable[str], *, tokenizer_written: bool = False) -> list[str]:
    """Copy the non-weight files of ``model_folder`` (and tokenizer-like ones of ``tokenizer_folder``) to
    ``dest``, skipping the names in ``already``; returns the copied paths relative to ``dest``.
    ``tokenizer_written``: the merge wrote its own tokenizer, so no tokenizer-like file is copied."""
    done = set(already)
    copied: list[str] = []
    own_tokenizer = not tokenizer_written and (tokenizer_folder is None or (
        model_folder is not None and tokenizer_folder.resolve() == model_folder.resolve()))
    if tokenizer_written:
        tokenizer_folder = None
    sources = [(model_folder, lambda rel: own_tokenizer or not _TOKENIZER_LIKE.search(rel.as_posix()))]
    if not own_tokenizer and tokenizer_folder is not None:
        sources.append((tokenizer_folder, lambda rel: bool(_TOKENIZER_LIKE.search(rel.as_posix()))))
    for folder, keep in sources:
        if folder is None or not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            key = rel.as_posix()
            if not path.is_file() or key in done or not _wanted(rel) or not keep(rel) or refuse_outside(path, folder):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            done.add(key)
            copied.append(key)
    return copied

