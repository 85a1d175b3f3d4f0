"""Models whose tokenizers differ, merged with ``tokenizer_source`` / ``tokenizer:`` / ``chat_template`` by
mergelab and by mergekit 0.1.5: the same vocabulary, ``vocab_size``, and the same rows token by token.

mergekit numbers the tokens ``union`` adds in the order of a Python set and a Rust hash map (it changes from
run to run); mergelab adds them in model order, each model's by id. So rows are compared by token: output
row ``ours[id_ours(t)]`` against ``theirs[id_theirs(t)]``. Where the two vocabularies number every token
alike (every case but ``union_many`` and ``union_no_base``), padding rows are compared too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import mergelab
from cli_helpers import load_output
from tiny_models import make_family, tiny_tokenizer

WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    """Llama- and GPT-2-style families (64 embedding rows) whose tokenizers differ:

    - base: '[UNK]', w0 … w39 (41 tokens);
    - ft0: w0 … w19, then 'x1', then w20 … w39 (ids past 20 shift by one), and the added token '<|im_start|>';
    - ft1: the base's words in reverse order (same tokens, other ids);
    - ft2: the base's words and 'y1', 'y2' (only for the case whose union order mergekit leaves to chance).
    """
    root = tmp_path_factory.mktemp("tokenized")
    out = {}
    for arch, seed in (("llama", 5), ("gpt2", 6)):
        base, fts = make_family(root, arch, seed=seed)
        tiny_tokenizer(base, WORDS)
        tiny_tokenizer(fts[0], [*WORDS[:20], "x1", *WORDS[20:]], added=("<|im_start|>",))
        tiny_tokenizer(fts[1], WORDS[::-1])
        tiny_tokenizer(fts[2], [*WORDS, "y1", "y2"])
        out[arch] = (base, fts)
    return out


def _cases(base: Path, fts: list[Path], dtype: str) -> dict[str, dict[str, Any]]:
    b, f0, f1, f2 = str(base), str(fts[0]), str(fts[1]), str(fts[2])
    ties = {"merge_method": "ties", "base_model": b, "dtype": dtype,
            "models": [{"model": f0, "parameters": {"weight": 1.0, "density": 0.5}},
                       {"model": f1, "parameters": {"weight": 0.5, "density": 0.7}}]}
    return {
        "union_linear": {"merge_method": "linear", "base_model": b, "dtype": dtype, "tokenizer_source": "union",
                         "models": [{"model": m, "parameters": {"weight": w}} for m, w in ((b, 1.0), (f0, 0.6),
                                                                                          (f1, 0.4))]},
        "union_ties": {**ties, "tokenizer_source": "union"},
        "base_ties": {**ties, "tokenizer_source": "base"},
        "model_task_arithmetic": {**ties, "merge_method": "task_arithmetic", "tokenizer_source": f0},
        # no base: tokens two models share but the third lacks are their mean
        "union_no_base": {"merge_method": "linear", "dtype": dtype, "tokenizer_source": "union",
                          "models": [{"model": m, "parameters": {"weight": w}} for m, w in ((f1, 0.3), (f0, 0.3),
                                                                                           (f2, 0.4))]},
        "tokenizer_block": {"merge_method": "slerp", "base_model": b, "dtype": dtype, "parameters": {"t": 0.3},
                            "models": [{"model": b}, {"model": f0}], "chat_template": "chatml",
                            "tokenizer": {"source": "union", "pad_to_multiple_of": 16, "tokens": {
                                "<pad>": {"source": {"kind": "zero"}},
                                "w3": {"source": f0, "force": True},
                                "x1": {"source": {"kind": "model_token", "model": b, "token": "w7"}},
                                "<|im_start|>": {"source": {"kind": "model_token", "model": f0, "token_id": 2}}}}},
        "union_many": {**ties, "tokenizer_source": "union",
                       "models": [*ties["models"], {"model": f2, "parameters": {"weight": 0.3, "density": 0.6}}]},
    }


def _run_both(config: dict[str, Any], tmp: Path) -> tuple[Path, Path]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    ours, theirs = tmp / "mergelab", tmp / "mergekit"
    mergelab.merge(config, ours, progress=False, hash_inputs=False)
    run_merge(MergeConfiguration.model_validate(config), str(theirs),
              options=MergeOptions(write_model_card=False, quiet=True, random_seed=0))
    return ours, theirs


def compare_by_token(ours: Path, theirs: Path) -> tuple[float, bool]:
    """(max |ours − theirs| over every tensor, rows matched by token; whether the token ids are the same)."""
    va = transformers.AutoTokenizer.from_pretrained(ours).get_vocab()
    vb = transformers.AutoTokenizer.from_pretrained(theirs).get_vocab()
    assert set(va) == set(vb)
    cfg_a, cfg_b = (json.loads((f / "config.json").read_text()) for f in (ours, theirs))
    assert cfg_a["vocab_size"] == cfg_b["vocab_size"]
    a, b = load_output(ours), load_output(theirs)
    assert set(a) == set(b)
    tokens = sorted(va)
    ia, ib = torch.tensor([va[t] for t in tokens]), torch.tensor([vb[t] for t in tokens])
    worst = 0.0
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        x, y = a[name].double(), b[name].double()
        if x.shape[0] == cfg_a["vocab_size"] and name.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight")):
            pad = x.shape[0] - len(tokens)
            if va == vb:  # padding rows: a mean over the rows, in the rows' order
                worst = max(worst, (x[len(tokens):] - y[len(tokens):]).abs().max().item() if pad else 0.0)
            x, y = x[ia], y[ib]
        worst = max(worst, (x - y).abs().max().item())
    return worst, va == vb


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", ["union_linear", "union_ties", "base_ties", "model_task_arithmetic",
                                  "union_no_base", "tokenizer_block", "union_many"])
def test_tokenizer_merges_same_rows_by_token_as_mergekit(tokenized: dict[str, tuple[Path, list[Path]]],
                                                         tmp_path: Path, case: str, dtype: str) -> None:
    base, fts = tokenized["llama"]
    ours, theirs = _run_both(_cases(base, fts, dtype)[case], tmp_path)
    diff, same_ids = compare_by_token(ours, theirs)
    print(f"CONFORMANCE tokenizer {case} llama {dtype} {diff:.3g} same_ids={same_ids}")
    assert diff == 0.0
    # mergekit's order is fixed too where one model adds plain tokens to the base's; without a base it starts
    # from a model drawn from a set, with several adding models it orders them by a set
    if case not in ("union_many", "union_no_base"):
        assert same_ids


@pytest.mark.slow
@pytest.mark.parametrize("case", ["union_ties", "tokenizer_block"])
def test_tied_embeddings_gpt2_same_rows_by_token_as_mergekit(tokenized: dict[str, tuple[Path, list[Path]]],
                                                            tmp_path: Path, case: str) -> None:
    base, fts = tokenized["gpt2"]
    ours, theirs = _run_both(_cases(base, fts, "bfloat16")[case], tmp_path)
    diff, same_ids = compare_by_token(ours, theirs)
    print(f"CONFORMANCE tokenizer {case} gpt2 bfloat16 {diff:.3g} same_ids={same_ids}")
    assert diff == 0.0 and same_ids


def test_union_vocabulary_and_files_are_mergekits(tokenized: dict[str, tuple[Path, list[Path]]],
                                                  tmp_path: Path) -> None:
    """The union of the base, ft0 and ft1: the base's 41 tokens, then 'x1', then ft0's added '<|im_start|>';
    the same tokenizer files as mergekit's (byte for byte), the chat template rendering the same text."""
    base, fts = tokenized["llama"]
    config = _cases(base, fts, "float32")["tokenizer_block"]
    ours, theirs = _run_both(config, tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(ours)
    vocab = tok.get_vocab()
    assert len(vocab) == 44 and vocab["x1"] == 41 and vocab["<|im_start|>"] == 42 and vocab["<pad>"] == 43
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == 48  # 44 rounded up to 16s
    assert (ours / "tokenizer.json").read_bytes() == (theirs / "tokenizer.json").read_bytes()
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    theirs_tok = transformers.AutoTokenizer.from_pretrained(theirs)
    assert tok.apply_chat_template(chat, tokenize=False) == theirs_tok.apply_chat_template(chat, tokenize=False) \
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    record = json.loads((ours / "mergelab.json").read_text())
    assert record["tokenizer"]["vocab_size"] == 48
    assert record["tokenizer"]["aligned_tensors"] == ["lm_head.weight", "model.embed_tokens.weight"]


def test_chat_template_alone_is_set_on_the_base_tokenizer(tokenized: dict[str, tuple[Path, list[Path]]],
                                                          tmp_path: Path) -> None:
    """Without a tokenizer source, rows are merged by index (same tokenizer) and the base's tokenizer is
    written with the template: 'alpaca' by name, and a literal Jinja string."""
    base, fts = tokenized["llama"]
    same = tmp_path / "same"
    shutil.copytree(fts[2], same)
    tiny_tokenizer(same, WORDS)
    literal = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    for template, expected in (("alpaca", "\n\n### Instruction:\nhi"),
                               (literal, "user: hi\n")):
        config = {"merge_method": "linear", "base_model": str(base), "chat_template": template,
                  "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                             {"model": str(same), "parameters": {"weight": 0.5}}]}
        ours, theirs = _run_both(config, tmp_path / str(len(template)))
        chat = [{"role": "user", "content": "hi"}]
        rendered = [transformers.AutoTokenizer.from_pretrained(f).apply_chat_template(chat, tokenize=False)
                    for f in (ours, theirs)]
        assert rendered[0] == rendered[1] == expected
        assert json.loads((ours / "config.json").read_text())["vocab_size"] == 64  # no re-ordering
        a, b = load_output(ours), load_output(theirs)
        assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["passthrough_stack", "slerp_slices"])
def test_union_with_layer_stacking_slices_same_rows_by_token(tokenized: dict[str, tuple[Path, list[Path]]],
                                                             tmp_path: Path, case: str) -> None:
    """Embeddings come from the first slice's sources and the LM head from the last slice's: each is
    aligned over its own models (a token only another slice's model has gets zeros there, as in mergekit)."""
    base, fts = tokenized["llama"]
    b, f0, f1 = str(base), str(fts[0]), str(fts[1])
    config: dict[str, Any] = {
        "passthrough_stack": {"merge_method": "passthrough", "dtype": "bfloat16", "tokenizer_source": "union",
                              "slices": [{"sources": [{"model": b, "layer_range": [0, 2]}]},
                                         {"sources": [{"model": f0, "layer_range": [1, 3]}]}]},
        "slerp_slices": {"merge_method": "slerp", "base_model": b, "dtype": "bfloat16", "tokenizer_source": "union",
                         "parameters": {"t": 0.5}, "slices": [
                             {"sources": [{"model": b, "layer_range": [0, 2]}, {"model": f0, "layer_range": [0, 2]}]},
                             {"sources": [{"model": b, "layer_range": [1, 3]}, {"model": f1, "layer_range": [1, 3]}]}]},
    }[case]
    ours, theirs = _run_both(config, tmp_path)
    diff, _ = compare_by_token(ours, theirs)
    print(f"CONFORMANCE tokenizer {case} llama bfloat16 {diff:.3g}")
    assert diff == 0.0
