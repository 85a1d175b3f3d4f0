"""Tokenizers of local model folders, read and written with ``transformers`` (local files only, no remote code).

Only the tokenizer features of a merge (``tokenizer_source``, ``tokenizer:``, ``chat_template``) need
``transformers`` (the ``text`` extra); it is imported here, when one is used.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mergelab.errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise CheckpointError("tokenizer_source, tokenizer and chat_template read and write tokenizers with "
                              "transformers, which is not installed: pip install 'mergelab[text]'") from None
    transformers.logging.set_verbosity_error()  # its notes on tokenizer classes are not the user's concern
    return transformers


def has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: Path | None, what: str) -> Any:
    """The (fast, where possible) tokenizer saved in ``folder``; a :class:`CheckpointError` naming ``what``
    and the folder when there is none or it cannot be read."""
    if folder is None or not has_tokenizer(folder):
        raise CheckpointError(f"{what}: {folder or 'this model'} has no tokenizer files "
                              f"({', '.join(TOKENIZER_FILES[:3])}, ...); add them, or choose a tokenizer source "
                              "that has them")
    tf = _transformers()
    try:
        return tf.AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True,
                                                trust_remote_code=False)
    except Exception as exc:  # transformers raises anything from OSError to KeyError here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{what}: cannot load the tokenizer in {folder} ({first[:300]}); fix its tokenizer "
                              "files (mergelab runs no remote code and downloads nothing)") from None


def config_vocab_size(folder: Path | None) -> int | None:
    """``vocab_size`` of the folder's ``config.json`` (the embedding rows that stand for tokens), if any."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        value = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if type(value) is int and value > 0 else None


def vocabulary_of(tokenizer: Any) -> dict[str, int]:
    return dict(tokenizer.get_vocab())


def stripped_tokenizer(tokenizer: Any, rows: int, what: str) -> Any:
    """``tokenizer`` without the tokens whose id is ``rows`` or more (they have no embedding row), as mergekit
    strips its base tokenizer; only BPE tokenizers can be stripped (mergekit's restriction too)."""
    vocab = tokenizer.get_vocab()
    unused = {tok for tok, idx in vocab.items() if idx >= rows}
    if not unused:
        return tokenizer
    data = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else None
    if data is None or data.get("model", {}).get("type") != "BPE":
        kind = data.get("model", {}).get("type") if data else "slow"
        raise CheckpointError(f"{what}: its tokenizer has {len(unused)} token(s) with ids past the {rows} embedding "
                              f"rows (e.g. {sorted(unused)[:3]}), and a {kind} tokenizer cannot be trimmed to its "
                              "rows; use a tokenizer whose ids fit the embeddings")
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < rows]
    for tok in unused:
        data["model"]["vocab"].pop(tok, None)

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"].get("merges", []) if keep(m)]
    import tokenizers

    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tokenizer


def copy_of(tokenizer: Any) -> Any:
    """An independent copy (saved and loaded again: fast tokenizers share their Rust state otherwise)."""
    tf = _transformers()
    with tempfile.TemporaryDirectory(prefix="mergelab-tok-") as tmp:
        tokenizer.save_pretrained(tmp, legacy_format=False)
        return tf.AutoTokenizer.from_pretrained(tmp, use_fast=True, local_files_only=True, trust_remote_code=False)


def save_tokenizer(tokenizer: Any, folder: Path) -> list[str]:
    """Write ``tokenizer`` into ``folder`` (as mergekit writes its merged tokenizer); the files written."""
    before = {p.name for p in folder.iterdir()}
    tokenizer.save_pretrained(str(folder))
    return sorted(p.name for p in folder.iterdir() if p.name not in before)
