"""Which token each embedding row stands for, so that rows of different vocabularies are never mixed.

Merging embedding and LM-head rows by index is right only when row ``i`` is the same token in every input.
Models of one family can share an embedding size and still number tokens differently (a retrained or
extended tokenizer). With ``tokenizer_source`` (or a ``tokenizer:`` block) rows are aligned by token
(merge/tokenizer.py); without one, mergekit merges such rows by index, silently mixing tokens: mergelab refuses
and names the fix instead.
"""

from __future__ import annotations

import json
from pathlib import Path


def vocabulary(folder: Path | None) -> dict[str, int] | None:
    """Token → id of the tokenizer files in ``folder`` (tokenizer.json, else vocab.json, else vocab.txt);
    None when there are none or they cannot be read (nothing to compare)."""
    if folder is None:
        return None
    try:
        if (folder / "tokenizer.json").is_file():
            data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            vocab = (data.get("model") or {}).get("vocab")
            if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
                vocab = {entry[0]: i for i, entry in enumerate(vocab)}
            if not isinstance(vocab, dict):
                return None
            out = {str(k): int(v) for k, v in vocab.items()}
            for added in data.get("added_tokens") or []:
                out[str(added["content"])] = int(added["id"])
            return out
        if (folder / "vocab.json").is_file():
            return {str(k): int(v) for k, v in json.loads((folder / "vocab.json").read_text("utf-8")).items()}
        if (folder / "vocab.txt").is_file():
            lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
            return {token: i for i, token in enumerate(lines)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return None


def vocabulary_mismatch(labelled: list[tuple[str, Path | None]]) -> str | None:
    """A problem when two inputs' tokenizers give a shared token different ids, naming one."""
    known = [(label, v) for label, folder in labelled if (v := vocabulary(folder)) is not None]
    if len(known) < 2:
        return None
    ref_label, ref = known[0]
    for label, vocab in known[1:]:
        # tokens only one side has (a chat model's added tokens, say) do not move any row; a shared token
        # with two ids does
        moved = next(((t, i, vocab[t]) for t, i in sorted(ref.items(), key=lambda x: x[1])
                      if t in vocab and vocab[t] != i), None)
        if moved is None:
            continue
        example = f"token {moved[0]!r} is id {moved[1]} in {ref_label} but {moved[2]} in {label}"
        return (f"{label}: its tokenizer numbers tokens differently from {ref_label} ({example}), so merging "
                "embedding/LM-head rows by index would mix different tokens. Add 'tokenizer_source: union' (or base, "
                "or one model's path) to align the rows by token, or merge models that share a tokenizer")
    return None
