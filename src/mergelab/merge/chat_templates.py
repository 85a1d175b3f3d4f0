"""``chat_template`` of a merge config: a template name, ``auto``, or a Jinja template string (as mergekit reads it).

The named templates are the conversation formats mergekit 0.1.5 ships under the same names, written here
for mergelab; ``tests/test_chat_templates.py`` renders conversations with both and checks the text is the same.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

NAMED_TEMPLATES: dict[str, str] = {
    # ChatML (OpenAI): every message framed by <|im_start|>ROLE\n ... <|im_end|>\n
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] ~ '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Llama 3 (Meta): BOS, then header / trimmed content / <|eot_id|> per message (mergekit's ends each with \n)
    "llama3": (
        "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\\n\\n' ~ (m['content'] | trim) ~ '<|eot_id|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    # Alpaca (Stanford): the last system message, a blank line, then ### Instruction / ### Input / ### Response
    # sections separated by blank lines
    "alpaca": (
        "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{{ (systems | last).content | trim if systems else '' }}{{ '\\n\\n' }}"
        "{% set heads = {'user': 'Instruction', 'assistant': 'Response', 'user_context': 'Input'} %}"
        "{% for m in messages %}{% if m['role'] in heads %}"
        "{{ '### ' ~ heads[m['role']] ~ ':\\n' ~ (m['content'] | trim) }}"
        "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}"
    ),
    # Mistral instruct: BOS, [INST] user [/INST] assistant EOS, an optional system message folded into the
    # first user turn; roles must alternate
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}"
        "{% for m in turns %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('After the optional system "
        "message, conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if m['role'] == 'user' %}{% if loop.first and system is defined %}"
        "{{ ' [INST] ' ~ system ~ '\\n\\n' ~ m['content'] ~ ' [/INST]' }}"
        "{% else %}{{ ' [INST] ' ~ m['content'] ~ ' [/INST]' }}{% endif %}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' ~ m['content'] ~ eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an "
        "initial optional system message!') }}{% endif %}{% endfor %}"
    ),
    # EXAONE (LG AI): [|ROLE|]content, user turns end with a newline, others with [|endofturn|]. mergekit's
    # template keeps its source indentation in the text (4 or 8 spaces, blank lines): reproduced, so that the
    # name gives the same text in both tools.
    "exaone": (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
        "{{ '        [|system|][|endofturn|]\\n\\n' }}{% endif %}"
        "{{ '    [|' ~ m['role'] ~ '|]' ~ m['content'] ~ '\\n        ' }}"
        "{% if m['role'] == 'user' %}{{ '\\n\\n' }}{% else %}{{ '[|endofturn|]\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '    [|assistant|]\\n' }}{% endif %}"
    ),
}


def resolve_chat_template(value: str, model_templates: Callable[[], list[str]]) -> str | None:
    """The Jinja text ``value`` stands for: a name of :data:`NAMED_TEMPLATES`, ``auto`` (the template most
    of the input models use, None when none has one) or the template itself. ValueError names the choices."""
    if value == "auto":
        found = model_templates()
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value and value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        names = ", ".join(sorted(NAMED_TEMPLATES))
        raise ValueError(f"chat_template: {value!r} is not a template: give one of {names}, 'auto' (the template "
                         "most input models use) or a Jinja template string")
    return value
