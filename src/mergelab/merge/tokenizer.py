"""The merged model's tokenizer and the row order of its embeddings, planned before any tensor is read.

With ``tokenizer_source`` (or a ``tokenizer:`` block) the output gets the tokenizer mergekit 0.1.5 would build:

- ``base``: the base model's tokenizer (without tokens whose ids lie past its embedding rows);
- a model path: that model's tokenizer;
- ``union``: the base model's tokenizer plus every token of the other models it lacks, added as tokens in
  model order (base first, then the models as listed), each model's tokens by id. mergekit adds them in the
  order of a Python set and a Rust hash map, which changes from run to run; ours is always the same;
- tokens named under ``tokenizer.tokens`` are added when missing.

Every embedding and LM-head tensor (merge/vocab_align.py names them) is then re-ordered per model to the
output vocabulary, rows the model lacks filled as mergekit fills them, before the method sees it; the output
``config.json`` gets the new ``vocab_size`` (rounded up to ``pad_to_multiple_of``). ``chat_template`` sets
the output tokenizer's template (a name, ``auto`` or a Jinja string, merge/chat_templates.py); without a
``tokenizer_source`` it is set on the tokenizer copied from the base, as mergekit does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import CheckpointError
from mergelab.io.tokenizers import (
    config_vocab_size,
    copy_of,
    has_tokenizer,
    load_tokenizer,
    save_tokenizer,
    stripped_tokenizer,
    vocabulary_of,
)
from mergelab.merge.chat_templates import resolve_chat_template
from mergelab.merge.config import MergeConfig, ModelTokenSource, TokenSetting, ZeroSource
from mergelab.merge.vocab_align import RowPlan, TokenSource, align_rows, plan_rows, token_permutation

log = logging.getLogger(__name__)


@dataclass
class VocabularyPlan:
    """The output vocabulary and, per referenced model, where each output token's row is in that model."""

    vocab: dict[str, int]
    rows: int
    permutations: dict[str, list[int]]
    model_vocabs: dict[str, dict[str, int]]
    settings: dict[str, TokenSetting]
    base: str | None
    order: list[str]
    """Models in the order mergekit lists a tensor's inputs (as listed, the base last unless listed)."""
    pad_to_multiple_of: int | None = None
    _plans: dict[tuple[str, ...], RowPlan] = field(default_factory=dict)

    def row_plan(self, models: Sequence[str]) -> RowPlan:
        """Where each row comes from for inputs from ``models`` (mergekit's order); ValueError if impossible."""
        key = tuple(models)
        if key not in self._plans:
            index = {m: i for i, m in enumerate(models)}

            def source(token: str, s: Any) -> TokenSource:
                src = s.source
                if isinstance(src, ZeroSource):
                    return TokenSource(zero=True, force=s.force)
                if src is None:
                    return TokenSource(force=s.force)
                model = src.model if isinstance(src, ModelTokenSource) else src
                if model not in index:
                    raise ValueError(f"tokenizer.tokens.{token}: source model '{model}' is not one of the merged "
                                     f"models ({', '.join(models)})")
                if isinstance(src, ModelTokenSource):
                    return TokenSource(model=index[model], row=src.token_id, token=src.token, force=s.force)
                return TokenSource(model=index[model], force=s.force)

            settings = {tok: source(tok, s) for tok, s in self.settings.items()}
            self._plans[key] = plan_rows(
                self.vocab, [self.permutations[m] for m in models], base=index.get(self.base) if self.base else None,
                settings=settings, model_vocabs=[self.model_vocabs.get(m) for m in models],  # type: ignore[misc]
                labels=list(models), pad_to_multiple_of=self.pad_to_multiple_of)
        return self._plans[key]

    def align(self, name: str, models: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` (from ``models``, in the engine's order) with rows in the output vocabulary's order."""
        order = sorted(range(len(models)), key=lambda i: self.order.index(models[i]) if models[i] in self.order
                       else len(self.order))
        aligned = align_rows([tensors[i] for i in order], self.row_plan([models[i] for i in order]), name)
        out: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
        for k, i in enumerate(order):
            out[i] = aligned[k]
        return out


@dataclass
class TokenizerPlan:
    tokenizer: Any | None
    """The tokenizer written to the output (None: tokenizer files are copied as they are)."""
    vocabulary: VocabularyPlan | None
    """Row re-ordering (None without a tokenizer source: rows are merged by index)."""
    warnings: list[str] = field(default_factory=list)


def plan_tokenizer(config: MergeConfig, folders: Mapping[str, Path | None], base: str | None,
                   source_folder: Path | None) -> TokenizerPlan:
    """The output tokenizer and vocabulary of ``config``; ``folders`` maps each referenced model (base first,
    then as listed) to its folder, ``source_folder`` is a model path ``tokenizer_source``'s folder.

    Raises CheckpointError (a tokenizer that cannot be loaded) or ValueError (a token setting).
    """
    source = config.token_source
    warnings: list[str] = []
    models = list(folders)
    donor = base if base is not None else models[0]
    if source is None:
        if not config.chat_template:
            return TokenizerPlan(None, None)
        # mergekit reserializes the donor's tokenizer with the template set
        tokenizer = load_tokenizer(folders[donor], "chat_template is set on the tokenizer of "
                                                   f"{'the base model' if donor == base else 'the first model'}")
        _set_template(tokenizer, config.chat_template, folders, models)
        return TokenizerPlan(tokenizer, None)
    rows_of = {m: config_vocab_size(folders[m]) for m in models}
    base_tok = load_tokenizer(folders[donor], f"tokenizer_source: {source} needs the tokenizer of "
                                              f"{'the base model' if donor == base else 'the first model'}")
    if rows_of[donor] is not None:
        base_tok = stripped_tokenizer(base_tok, rows_of[donor], donor)
    tokenizers: dict[str, Any] = {donor: base_tok}
    for m in models:
        if m in tokenizers:
            continue
        if not has_tokenizer(folders[m]):
            warnings.append(f"{m} has no tokenizer files: its rows are taken to follow the tokenizer of {donor}")
            continue
        try:
            tokenizers[m] = load_tokenizer(folders[m], m)
        except CheckpointError as exc:
            warnings.append(f"{exc}: its rows are taken to follow the tokenizer of {donor}")
    if source == "base":
        out = base_tok
    elif source == "union":
        out = union_tokenizer(base_tok, donor, tokenizers, rows_of)
    else:
        out = load_tokenizer(source_folder, f"tokenizer_source: {source}")
    settings = dict(config.tokenizer.tokens or {}) if config.tokenizer is not None else {}
    missing = [t for t in settings if t not in out.get_vocab()]
    if missing:
        out.add_tokens(missing)
    vocab = vocabulary_of(out)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise CheckpointError(f"tokenizer_source {source}: its token ids are not 0 … {len(vocab) - 1} without gaps, "
                              "so they cannot number embedding rows; use another tokenizer")
    permutations, model_vocabs = {}, {}
    for m in models:
        model_vocab = vocabulary_of(tokenizers.get(m, base_tok))
        model_vocabs[m] = model_vocab
        permutations[m] = token_permutation(vocab, model_vocab, rows_of[m] or len(model_vocab))
    pad = config.tokenizer.pad_to_multiple_of if config.tokenizer is not None else None
    listed = [e.model for e in config.models or []]
    if config.slices:
        listed = list(dict.fromkeys(s.model for sl in config.slices for s in sl.sources))
    order = listed + ([base] if base is not None and base not in listed else [])
    if config.chat_template:
        _set_template(out, config.chat_template, folders, models)
    plan = VocabularyPlan(vocab, len(vocab), permutations, model_vocabs, settings, base, order, pad)
    plan.rows = plan.row_plan([m for m in order if m in folders] or models).rows
    return TokenizerPlan(out, plan, warnings)


def union_tokenizer(base_tok: Any, base: str, tokenizers: Mapping[str, Any], rows_of: Mapping[str, int | None]) -> Any:
    """The base tokenizer plus every token of the others it lacks (mergekit's ``union``, in a fixed order):
    plain tokens first, then each model's added tokens (chat markers) with their settings, first seen wins."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for model, tok in tokenizers.items():
        rows = rows_of.get(model) or tok.vocab_size
        decoder = tok.added_tokens_decoder
        for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if idx < rows:
                plain.setdefault(token)
        for idx, info in sorted(decoder.items()):
            if idx < rows and info.content not in added:
                added[info.content] = info
            elif idx < rows and added[info.content] != info:
                log.warning("token %r is added with different settings by %s; the first model's are kept",
                            info.content, model)
    out = copy_of(base_tok)
    known = base_tok.get_vocab()
    new = [t for t in plain if t not in added and t not in known]
    if new:
        out.add_tokens(new)
    if added:
        out.add_tokens(list(added.values()))
    return out


def _set_template(tokenizer: Any, value: str, folders: Mapping[str, Path | None], models: Sequence[str]) -> None:
    def templates() -> list[str]:
        found = []
        for m in models:
            if not has_tokenizer(folders[m]):
                continue
            try:
                template = load_tokenizer(folders[m], m).chat_template
            except CheckpointError:
                continue
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                found.append(template.strip())
        return found

    template = resolve_chat_template(value, templates)
    if template is not None:
        tokenizer.chat_template = template


def write_tokenizer(plan: TokenizerPlan, folder: Path) -> list[str]:
    return save_tokenizer(plan.tokenizer, folder) if plan.tokenizer is not None else []
