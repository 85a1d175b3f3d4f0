"""Embedding and LM-head rows aligned by token when the inputs' tokenizers differ (mergekit's
``tokenizer_source`` / ``tokenizer:`` behaviour), as pure functions of vocabularies and tensors.

Row ``i`` of an embedding stands for the token with id ``i`` in *that model's* tokenizer. Before rows of
several models can be merged, each model's rows are put in the order of the output vocabulary: output token
``t`` takes the model's row for ``t`` (:func:`token_permutation`). A model that lacks ``t`` gets a stand-in
row, chosen once per token as mergekit 0.1.5 chooses it (:func:`plan_rows`):

1. a token configured under ``tokenizer.tokens`` takes its configured source (a model's row for the token,
   a given row or token of a model's own tokenizer, or zeros); with ``force`` every model takes it;
2. a token only one model has takes that model's row (the donor);
3. a token no model has is zeros;
4. a token the base model has takes the base's row;
5. otherwise, the mean of the rows of the models that have it (summed in model order in the tensors' dtype,
   then divided, as mergekit does).

With ``pad_to_multiple_of``, rows past the vocabulary are the mean of the vocabulary's rows. The merge method
then sees tensors of one shape, row ``i`` the same token in each, and knows nothing of tokenizers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Tensors indexed by token id along dimension 0: every name mergekit 0.1.5's architecture tables mark with a
# vocabulary axis (always 0 there), with their aliases.
VOCABULARY_TENSORS = frozenset({
    "model.embed_tokens.weight", "embed_tokens.weight", "lm_head.weight", "lm_head.bias",
    "transformer.wte.weight", "wte.weight", "transformer.word_embeddings.weight",
    "transformer.embd.wte.weight", "transformer.embedding.word_embeddings.weight",
    "transformer.output_layer.weight", "model.tok_embeddings.weight", "output.weight", "shared.weight",
    "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "gpt_neox.embed_in.weight", "embed_out.weight",
    "model.language_model.embed_tokens.weight", "backbone.embeddings.weight",
    "bert.embeddings.word_embeddings.weight", "roberta.embeddings.word_embeddings.weight",
    "distilbert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight",
    "cls.predictions.decoder.weight", "cls.predictions.bias", "lm_head.decoder.weight",
    "lm_head.linear.weight", "lm_head.linear.bias", "vocab_projector.weight", "vocab_projector.bias",
})


def is_vocabulary_tensor(name: str) -> bool:
    return name in VOCABULARY_TENSORS


def token_permutation(out_vocab: Mapping[str, int], model_vocab: Mapping[str, int], rows: int) -> list[int]:
    """For each output token id, the row of the model that holds that token, or -1 when the model lacks it.

    A token whose id in the model is ``rows`` or more (a tokenizer entry without an embedding row) counts as
    missing. ``out_vocab`` ids must be ``0 … len(out_vocab) − 1``.
    """
    perm = [-1] * len(out_vocab)
    for token, new_id in out_vocab.items():
        old = model_vocab.get(token)
        if old is not None and 0 <= old < rows:
            perm[new_id] = old
    return perm


@dataclass(frozen=True)
class TokenSource:
    """A configured stand-in for one output token (``tokenizer.tokens`` in the config).

    ``model`` (an index into the models) with neither ``row`` nor ``token``: that model's row for this output
    token; with ``row``: that row of the model's own tensor; with ``token``: the row of that token in the
    model's own tokenizer. ``zero``: a row of zeros. ``model`` None and not ``zero``: no source (allowed only
    while every model has the token and ``force`` is off).
    """

    model: int | None = None
    row: int | None = None
    token: str | None = None
    zero: bool = False
    force: bool = False


@dataclass(frozen=True)
class RowPlan:
    """Where every output row of every model comes from (built by :func:`plan_rows`)."""

    tokens: int
    """Rows that stand for a token (the output vocabulary's size)."""
    rows: int
    """Output rows: ``tokens`` rounded up to ``pad_to_multiple_of``."""
    own: tuple[torch.Tensor, ...]
    """Per model: for each token, the model's own row, or -1 where a stand-in is used."""
    average: dict[int, tuple[int, ...]]
    """Token id → the models (in order) whose rows are averaged into its stand-in."""
    copy: dict[int, tuple[int, int]]
    """Token id → (model, row) whose row is its stand-in."""
    zero: frozenset[int]
    """Token ids whose stand-in is a row of zeros."""


def plan_rows(out_vocab: Mapping[str, int], permutations: Sequence[Sequence[int]], *, base: int | None,
              settings: Mapping[str, TokenSource] | None = None,
              model_vocabs: Sequence[Mapping[str, int] | None] = (), labels: Sequence[str] = (),
              pad_to_multiple_of: int | None = None) -> RowPlan:
    """Decide each output row's source (see the module docstring); ``permutations`` from
    :func:`token_permutation`, one per model, ``base`` the base model's index among them (or None).

    Raises ValueError, naming the token and the model, when a configured source cannot give a row.
    """
    n_tokens = len(out_vocab)
    n_models = len(permutations)
    names = list(labels) or [f"model {i}" for i in range(n_models)]
    configured = dict(settings or {})
    chosen: dict[str, TokenSource] = {}
    averaged: set[str] = set()
    for token, tid in out_vocab.items():
        if token in configured:
            continue
        present = [i for i in range(n_models) if permutations[i][tid] >= 0]
        if len(present) == 1:
            chosen[token] = TokenSource(model=present[0])
        elif not present:
            chosen[token] = TokenSource(zero=True)
            log.warning("token %r is in none of the vocabularies of this tensor's models: its rows are zeros", token)
        elif base is not None and permutations[base][tid] >= 0:
            chosen[token] = TokenSource(model=base)
        else:
            averaged.add(token)
    chosen.update(configured)
    average: dict[int, tuple[int, ...]] = {}
    copy: dict[int, tuple[int, int]] = {}
    zero: set[int] = set()
    forced: set[int] = set()
    for token, tid in out_vocab.items():
        src = chosen.get(token)
        everyone = all(permutations[i][tid] >= 0 for i in range(n_models))
        if src is not None and src.force:
            forced.add(tid)
        elif everyone:
            continue
        if token in averaged:
            average[tid] = tuple(i for i in range(n_models) if permutations[i][tid] >= 0)
        elif src is None:
            continue
        elif src.zero:
            zero.add(tid)
        elif src.model is None:
            lacking = names[next(i for i in range(n_models) if permutations[i][tid] < 0)] if not everyone else None
            why = f"{lacking} lacks it" if lacking else "force is set"
            raise ValueError(f"tokenizer.tokens.{token}: no source for this token's row ({why}); give a "
                             "'source': a model, {kind: model_token, model, token}, or {kind: zero}")
        elif not 0 <= src.model < n_models:
            raise ValueError(f"tokenizer.tokens.{token}: its source is not one of the merged models")
        elif src.row is None and src.token is None:
            row = permutations[src.model][tid]
            if row < 0:
                raise ValueError(f"tokenizer.tokens.{token}: {names[src.model]} does not have this token; name a "
                                 "model that has it, or a token of its own vocabulary (kind: model_token)")
            copy[tid] = (src.model, row)
        elif src.row is not None:
            copy[tid] = (src.model, src.row)
        else:
            vocab = model_vocabs[src.model] if src.model < len(model_vocabs) else None
            if vocab is None or src.token not in vocab:
                raise ValueError(f"tokenizer.tokens.{token}: token {src.token!r} is not in the vocabulary of "
                                 f"{names[src.model]}")
            copy[tid] = (src.model, vocab[src.token])  # type: ignore[index]
    own = []
    for i in range(n_models):
        perm = torch.tensor(list(permutations[i]), dtype=torch.long) if n_tokens else torch.empty(0, dtype=torch.long)
        if forced:
            perm[sorted(forced)] = -1
        own.append(perm)
    rows = n_tokens
    if pad_to_multiple_of and rows % pad_to_multiple_of:
        rows = (rows // pad_to_multiple_of + 1) * pad_to_multiple_of
    return RowPlan(n_tokens, rows, tuple(own), average, copy, frozenset(zero))


def align_rows(tensors: Sequence[torch.Tensor], plan: RowPlan, name: str = "tensor") -> list[torch.Tensor]:
    """Each model's tensor with its rows (dimension 0) in the output vocabulary's order (see :class:`RowPlan`).

    The result has ``plan.rows`` rows, in the promoted dtype of the inputs, like mergekit's. Raises
    ValueError (naming ``name``) when the non-vocabulary dimensions differ or a configured row is out of range.
    """
    if not tensors:
        return []
    shapes = [tuple(t.shape) for t in tensors]
    if any(t.ndim == 0 or t.shape[0] == 0 for t in tensors) or any(s[1:] != shapes[0][1:] for s in shapes):
        raise ValueError(f"'{name}': the token-indexed tensors of the models must agree beyond their first "
                         f"dimension, got shapes {[list(s) for s in shapes]}")
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    device = tensors[0].device
    inner = shapes[0][1:]
    stand_in: dict[int, torch.Tensor] = {}
    for tid, (model, row) in plan.copy.items():
        if not 0 <= row < tensors[model].shape[0]:
            raise ValueError(f"'{name}': a configured token source asks for row {row}, but that model has "
                             f"{tensors[model].shape[0]} rows")
        stand_in[tid] = tensors[model][row]
    for tid in plan.zero:
        stand_in[tid] = torch.zeros(inner, dtype=dtype, device=device)
    if plan.average:
        # mergekit sums the rows one model at a time from a zero row in the promoted dtype and divides by the
        # count (a Python int): the same element-wise operations in the same order give the same bits.
        ids = sorted(plan.average)
        acc = torch.zeros((len(ids), *inner), dtype=dtype, device=device)
        counts = torch.zeros(len(ids), dtype=torch.long, device=device)
        for m, t in enumerate(tensors):
            own = plan.own[m][ids].to(device)  # an averaged token is never forced: these are the models' rows
            idx = (own >= 0).nonzero().flatten()
            if idx.numel():
                acc[idx] = acc[idx] + t[own[idx]]
                counts[idx] += 1
        for c in sorted(set(counts.tolist())):
            sel = (counts == c).nonzero().flatten().to(device)
            part = acc[sel]
            part /= c
            acc[sel] = part
        for k, tid in enumerate(ids):
            stand_in[tid] = acc[k]
    stand_ids = torch.tensor(sorted(stand_in), dtype=torch.long, device=device)
    stand_rows = (torch.stack([stand_in[int(i)].to(dtype) for i in stand_ids]) if stand_in
                  else torch.zeros((0, *inner), dtype=dtype, device=device))
    out = []
    for m, t in enumerate(tensors):
        own = plan.own[m].to(device)
        new = torch.zeros((plan.rows, *inner), dtype=dtype, device=device)
        keep = (own >= 0).nonzero().flatten()
        new[keep] = t[own[keep]].to(dtype)
        lacking = (own[stand_ids] < 0).nonzero().flatten()
        new[stand_ids[lacking]] = stand_rows[lacking]
        if plan.rows > plan.tokens:
            # as mergekit (after https://nlp.stanford.edu/~johnhew/vocab-expansion.html): padding rows are the
            # mean of the vocabulary's rows
            new[plan.tokens:] = torch.mean(new[:plan.tokens], dim=0)
        out.append(new)
    return out
