"""Named chat templates render the text mergekit 0.1.5's templates of the same name render; how a
``chat_template`` value is read."""

from __future__ import annotations

import importlib.resources

import pytest
import transformers

from mergelab.merge.chat_templates import NAMED_TEMPLATES, resolve_chat_template

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there "}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! "}, {"role": "user", "content": "More\nlines"}],
    [{"role": "user", "content": "Q"}, {"role": "user_context", "content": "ctx"},
     {"role": "assistant", "content": "A"}],
    [{"role": "system", "content": "s1"}, {"role": "system", "content": "s2"}, {"role": "user", "content": "u"}],
    [{"role": "assistant", "content": "first"}, {"role": "user", "content": "u"}],
]


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                                bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


def _render(tok: transformers.PreTrainedTokenizerFast, template: str, chat: list[dict[str, str]], gen: bool) -> str:
    try:
        return str(tok.apply_chat_template(chat, chat_template=template, tokenize=False, add_generation_prompt=gen))
    except Exception as exc:  # mistral refuses non-alternating roles: the refusal must be the same too
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_named_template_renders_what_mergekits_renders(name: str) -> None:
    from mergekit._data import chat_templates

    theirs = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()
    tok = _tokenizer()
    for chat in CONVERSATIONS:
        for gen in (False, True):
            assert _render(tok, NAMED_TEMPLATES[name], chat, gen) == _render(tok, theirs, chat, gen), (chat, gen)


def test_names_match_mergekits_list() -> None:
    from mergekit._data import chat_templates

    names = {p.name.removesuffix(".jinja") for p in importlib.resources.files(chat_templates).iterdir()
             if p.name.endswith(".jinja")}
    assert names == set(NAMED_TEMPLATES)


def test_chatml_by_hand() -> None:
    chat = [{"role": "user", "content": "hi"}]
    assert _render(_tokenizer(), NAMED_TEMPLATES["chatml"], chat, True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_chat_template_value_is_a_name_auto_or_jinja() -> None:
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template("chatml", list) == NAMED_TEMPLATES["chatml"]
    assert resolve_chat_template(literal, list) == literal
    # auto: the template most models use; None when no model has one
    assert resolve_chat_template("auto", lambda: ["{{ a }}", "{{ b }}", "{{ b }}"]) == "{{ b }}"
    assert resolve_chat_template("auto", list) is None
    with pytest.raises(ValueError, match=r"chat_template: 'chatlm' is not a template: give one of alpaca, chatml"):
        resolve_chat_template("chatlm", list)
    with pytest.raises(ValueError, match="is not a template"):
        resolve_chat_template("no braces but a long text that is not a name", list)
