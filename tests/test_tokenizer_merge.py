"""tokenizer_source / tokenizer / chat_template through the CLI: models with different vocabularies merge,
and every mistake is a clear message with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from cli_helpers import assert_ok, assert_refused, load_folder, load_output, run_cli, save_model_folder, write_config
from tiny_models import tiny_tokenizer

Families = dict[str, tuple[Path, list[Path]]]
WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture()
def with_tokenizers(families: Families, tmp_path: Path) -> tuple[Path, list[Path]]:
    base_src, fts_src = families["llama"]
    base = tiny_tokenizer(Path(shutil.copytree(base_src, tmp_path / "base")), WORDS)
    fts = []
    for i, src in enumerate(fts_src[:2]):
        fts.append(tiny_tokenizer(Path(shutil.copytree(src, tmp_path / f"ft{i}")), WORDS[::-1] if i else WORDS))
    return base, fts


def test_models_with_more_embedding_rows_merge_with_a_union_tokenizer(with_tokenizers: tuple[Path, list[Path]],
                                                                      tmp_path: Path) -> None:
    """ft0 grew 8 rows for 8 new tokens (64 -> 72 rows; its tokenizer 41 -> 49 tokens): refused without a
    tokenizer source, merged with union into 49 rows that transformers loads; a new token's row is ft0's."""
    base, fts = with_tokenizers
    state = load_folder(fts[0])
    extra = torch.randn(8, 32)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = torch.cat([state[name], extra])
    grown = save_model_folder(tmp_path / "grown", state, fts[0])
    cfg = json.loads((grown / "config.json").read_text())
    (grown / "config.json").write_text(json.dumps({**cfg, "vocab_size": 72}))
    new = [f"n{i}" for i in range(8)]
    tok = tiny_tokenizer(tmp_path / "tok", WORDS)
    tok_obj = transformers.AutoTokenizer.from_pretrained(tok)
    tok_obj.add_tokens(new)  # ids 41..48: rows 64..71 need ids 64..71, so write the vocabulary by hand
    data = json.loads((tok / "tokenizer.json").read_text())
    data["model"]["vocab"].update({t: 64 + i for i, t in enumerate(new)})
    (grown / "tokenizer.json").write_text(json.dumps(data))
    shutil.copy2(tok / "tokenizer_config.json", grown / "tokenizer_config.json")
    config = {"merge_method": "linear", "base_model": str(base),
              "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                         {"model": str(grown), "parameters": {"weight": 0.5}}]}
    out = tmp_path / "out"
    assert_refused(run_cli(write_config(tmp_path, config), out), out, "vocabulary size 72", "tokenizer_source: union")
    assert_ok(run_cli(write_config(tmp_path, {**config, "tokenizer_source": "union"}), out))
    merged = load_output(out)
    assert merged["model.embed_tokens.weight"].shape == (49, 32)
    vocab = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    assert [vocab[t] for t in new] == list(range(41, 49))
    # only ft0 has the new tokens: both models take its row, so the weighted mean is that row
    assert torch.allclose(merged["model.embed_tokens.weight"][41:], extra)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape == (49, 32)


def _linear(base: Path, fts: list[Path], **extra: object) -> dict[str, object]:
    return {"merge_method": "linear", "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in fts], **extra}


@pytest.mark.parametrize(("extra", "fragments"), [
    ({"tokenizer": {"source": "union", "tokens": {"zz": {"source": "/no/such/model"}}}},
     ("tokenizer.tokens.zz", "/no/such/model", "is not one of the merged models")),
    ({"tokenizer": {"source": "union", "tokens": {"zz": {}}}},
     ("tokenizer.tokens.zz", "no source for this token's row", "{kind: zero}")),
    ({"tokenizer": {"source": "union", "tokens": {"zz": {"source": {"kind": "model_token", "model": "FT0",
                                                                     "token": "nope"}}}}},
     ("tokenizer.tokens.zz", "token 'nope' is not in the vocabulary of",)),
    ({"chat_template": "chatlm"}, ("chat_template: 'chatlm' is not a template", "chatml")),
    ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, ("either 'tokenizer_source' or a 'tokenizer'",)),
    ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, ("tokenizer.pad_to_multiple_of",)),
    ({"tokenizer": {"source": "/no/such/tokenizer"}},
     ("tokenizer.source: '/no/such/tokenizer' is not a model folder",)),
])
def test_tokenizer_mistakes_are_clear_errors(with_tokenizers: tuple[Path, list[Path]], tmp_path: Path,
                                             extra: dict[str, object], fragments: tuple[str, ...]) -> None:
    base, fts = with_tokenizers
    text = json.dumps(extra).replace("FT0", str(fts[0]))
    out = tmp_path / "out"
    assert_refused(run_cli(write_config(tmp_path, _linear(base, fts, **json.loads(text))), out), out, *fragments)


def test_a_base_tokenizer_that_cannot_be_read_is_a_clear_error(with_tokenizers: tuple[Path, list[Path]],
                                                                tmp_path: Path) -> None:
    base, fts = with_tokenizers
    (base / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    assert_refused(run_cli(write_config(tmp_path, _linear(base, fts, tokenizer_source="union")), out), out,
                   "tokenizer_source: union needs the tokenizer of the base model", "cannot load the tokenizer in",
                   str(base))


def test_a_model_without_tokenizer_follows_the_base_with_a_warning(with_tokenizers: tuple[Path, list[Path]],
                                                                   families: Families, tmp_path: Path) -> None:
    """mergekit's rule: a model whose tokenizer cannot be loaded is taken to number tokens like the base."""
    base, fts = with_tokenizers
    plain = families["llama"][1][2]
    out = tmp_path / "out"
    assert_ok(run_cli(write_config(tmp_path, _linear(base, [fts[0], plain], tokenizer_source="union")), out))
    record = json.loads((out / "mergelab.json").read_text())
    assert any(str(plain) in w and "follow the tokenizer of" in w for w in record["warnings"])


def test_global_scope_with_a_reordering_tokenizer_is_refused(with_tokenizers: tuple[Path, list[Path]],
                                                              tmp_path: Path) -> None:
    base, fts = with_tokenizers
    config = {"merge_method": "ties", "base_model": str(base), "tokenizer_source": "union",
              "parameters": {"scope": "global"}, "models": [{"model": str(p), "parameters": {"density": 0.5}}
                                                            for p in fts]}
    out = tmp_path / "out"
    assert_refused(run_cli(write_config(tmp_path, config), out), out, "scope", "global", "use scope: tensor")


def test_search_configs_keep_union_and_make_a_tokenizer_path_absolute(tmp_path: Path) -> None:
    from mergelab.search.config import absolute_merge_config

    (tmp_path / "m").mkdir()
    (tmp_path / "t").mkdir()
    merge = {"merge_method": "linear", "models": [{"model": "m"}], "tokenizer_source": "union"}
    assert absolute_merge_config(merge, tmp_path)["tokenizer_source"] == "union"
    merge = {"merge_method": "linear", "models": [{"model": "m"}],
             "tokenizer": {"source": "t", "pad_to_multiple_of": 8}}
    assert absolute_merge_config(merge, tmp_path)["tokenizer"] == {"source": str((tmp_path / "t").resolve()),
                                                                  "pad_to_multiple_of": 8}
    merge = {**merge, "tokenizer": {"source": "base"}}
    assert absolute_merge_config(merge, tmp_path)["tokenizer"] == {"source": "base"}
