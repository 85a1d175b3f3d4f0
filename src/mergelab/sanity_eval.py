"""``mergelab eval OUT``: a quick sanity check of a merged model against the models it was merged from.

Causal LMs: perplexity on a small bundled text (``mergelab/data/eval_text.txt``, 188 words). Encoders:
mean-pooled, normalised embeddings of the text's sentences, and the mean cosine between the merged model's
and each input's. This catches broken merges (non-finite weights, wrong scaling, mismatched layers), not
differences in quality: the text is tiny and the rules are loose on purpose.

Rules (a merge between its inputs passes both): perplexity finite and at most ``1.5 ×`` the worst input's;
embedding agreement with every input at least the lowest agreement between two inputs minus 0.1.
Inputs are read with mergelab's own readers (so LoRA adapters, Hub-cache ids and ``.pt`` files work) and
loaded, one at a time, into the merged model's architecture.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import MergeLabError
from mergelab.example_models import bundled_text
from mergelab.io.models import open_model

PERPLEXITY_FACTOR = 1.5
AGREEMENT_MARGIN = 0.1


@dataclass
class EvalReport:
    kind: str  # "perplexity" or "agreement"
    merged: float
    inputs: dict[str, float] = field(default_factory=dict)
    """Perplexity of each input, or the merged model's mean cosine with each input."""
    between_inputs: float | None = None  # lowest mean cosine between two inputs (agreement only)
    ok: bool = True
    verdict: str = ""
    notes: list[str] = field(default_factory=list)


def _inputs(out: Path) -> dict[str, str]:
    record_path = out / "mergelab.json"
    if not record_path.is_file():
        raise MergeLabError(f"{out}: no mergelab.json; `mergelab eval` checks a folder written by mergelab merge")
    record = json.loads(record_path.read_text())
    paths: dict[str, str] = record.get("input_paths") or {}
    if not paths:  # written before input_paths was recorded: the labels are the paths
        labels = ([record["base_model"]] if record.get("base_model") else []) + [m["model"] for m in record["models"]]
        paths = {label: label for label in labels}
    return paths


def _load(out: Path) -> tuple[Any, Any, bool]:
    try:
        import transformers
    except ImportError:
        raise MergeLabError("mergelab eval needs transformers: pip install 'mergelab[text]'") from None
    cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    archs = cfg.get("architectures") or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        model = cls.from_pretrained(out).eval()
    except (OSError, ValueError) as exc:
        raise MergeLabError(f"{out}: transformers cannot load this model or its tokenizer ({exc}); eval needs "
                            "config.json and tokenizer files in the folder") from None
    return tokenizer, model, causal


@torch.no_grad()
def _perplexity(model: Any, tokenizer: Any) -> float:
    limit = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    ids = tokenizer(bundled_text(), return_tensors="pt")["input_ids"][:, :min(limit, 512)]
    return float(torch.exp(model(input_ids=ids, labels=ids).loss))


@torch.no_grad()
def _embeddings(model: Any, tokenizer: Any) -> torch.Tensor:
    sentences = [s for s in bundled_text().splitlines() if s.strip()]
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def _load_input(model: Any, spec: str, notes: list[str]) -> None:
    with open_model(spec) as reader:
        state = {name: reader.get(name) for name in reader.names}
    own = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    if not (set(state) & set(own)) and prefix:  # e.g. a bare BertModel checkpoint against a model with a head
        state = {f"{prefix}.{k}": v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    loaded = len(set(state) & set(own))
    if loaded == 0:
        raise MergeLabError(f"{spec}: none of its tensors fit the merged model's architecture")
    if result.missing_keys:
        notes.append(f"{spec}: {len(result.missing_keys)} tensor(s) missing, the merged model's kept "
                     f"(e.g. {result.missing_keys[:2]})")


def evaluate_merge(out_dir: str | Path) -> EvalReport:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MergeLabError(f"{out}: is a file, not a folder; `mergelab eval` checks the folder mergelab merge "
                            "wrote (the -o of the merge)")
    if not out.is_dir():
        raise MergeLabError(f"{out}: no such folder")
    inputs = _inputs(out)
    tokenizer, model, causal = _load(out)
    notes: list[str] = []
    if causal:
        merged = _perplexity(model, tokenizer)
        scores = {}
        for label, spec in inputs.items():
            _load_input(model, spec, notes)
            scores[label] = _perplexity(model, tokenizer)
        worst = max(scores.values())
        ok = math.isfinite(merged) and merged <= PERPLEXITY_FACTOR * worst
        verdict = (f"perplexity {merged:.4g}, inputs {min(scores.values()):.4g}–{worst:.4g}"
                   + ("" if ok else f": worse than {PERPLEXITY_FACTOR}× the worst input, the merge looks broken"))
        return EvalReport("perplexity", merged, scores, None, ok, verdict, notes)
    merged_emb = _embeddings(model, tokenizer)
    embs = {}
    for label, spec in inputs.items():
        _load_input(model, spec, notes)
        embs[label] = _embeddings(model, tokenizer)
    agreement = {label: float((merged_emb * e).sum(-1).mean()) for label, e in embs.items()}
    pairs = [float((a * b).sum(-1).mean()) for a, b in combinations(embs.values(), 2)]
    between = min(pairs) if pairs else 1.0
    finite = bool(torch.isfinite(merged_emb).all())
    ok = finite and min(agreement.values()) >= between - AGREEMENT_MARGIN
    verdict = (f"mean cosine with the inputs {min(agreement.values()):.4f}–{max(agreement.values()):.4f}, "
               f"between inputs ≥ {between:.4f}"
               + ("" if ok else ": the merged model disagrees with its inputs more than they disagree with each "
                  "other, the merge looks broken"))
    return EvalReport("agreement", float(merged_emb.norm(dim=-1).mean()), agreement, between, ok, verdict, notes)


@lru_cache(maxsize=4)
def _causal_lm(model_folder: str) -> tuple[Any, Any]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_folder).eval()
    return tokenizer, model


def negative_perplexity(state_dict: Mapping[str, torch.Tensor], *, model_folder: str) -> float:
    """A search evaluator (``examples/search.yml``): −perplexity of ``state_dict`` on the bundled text, in the
    architecture and with the tokenizer of ``model_folder``. Higher is better, as the search expects."""
    tokenizer, model = _causal_lm(model_folder)
    model.load_state_dict(dict(state_dict), strict=False)
    return -_perplexity(model, tokenizer)
