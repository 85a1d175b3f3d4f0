"""The merged model's card (``README.md``): Hub metadata up front, then what was merged, how, and the config.

The YAML front matter holds what the Hugging Face Hub reads (``base_model``, ``tags``, ``library_name``);
the body repeats the record in words and the exact config, so the card alone reproduces the merge.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

TAGS = ["merge", "mergelab"]


def library_name(folder: Path) -> str | None:
    """``sentence-transformers`` for a folder with ``modules.json``, ``transformers`` with ``config.json``."""
    if (folder / "modules.json").is_file():
        return "sentence-transformers"
    if (folder / "config.json").is_file():
        return "transformers"
    return None


def _inline(value: Any) -> str:
    return "`" + yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip() + "`"


def render_model_card(record: Mapping[str, Any], config_yaml: str, *, library: str | None,
                      name: str | None = None) -> str:
    """The card's text from ``mergelab.json``'s ``record`` and the config used (``mergelab_config.yml``)."""
    meta: dict[str, Any] = {}
    sources = [m["model"] for m in record.get("models", [])]
    if record.get("base_model"):
        meta["base_model"] = [record["base_model"], *sources]
    elif sources:
        meta["base_model"] = sources
    meta["tags"] = list(TAGS)
    if library:
        meta["library_name"] = library
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    title = name or "Merged model"
    lines = [
        "---", front, "---", "",
        f"# {title}", "",
        f"This model was merged with [mergelab](https://github.com/mergelab/mergelab) "
        f"{record.get('mergelab_version', '')} using the **{record['method']}** method "
        f"({record.get('paper') or 'see `mergelab methods`'}).", "",
        "## Models", "",
    ]
    if record.get("base_model"):
        lines.append(f"- base: `{record['base_model']}`")
    for m in record.get("models", []):
        params = m.get("parameters") or {}
        lines.append(f"- `{m['model']}`" + (f" with {_inline(params)}" if params else ""))
    lines += ["", "## Parameters", ""]
    if record.get("parameters"):
        lines += [f"- `{k}`: {_inline(v)}" for k, v in record["parameters"].items()]
    else:
        lines.append("the method's defaults (see `mergelab methods " + str(record["method"]) + "`)")
    lines.append(f"- seed: {record.get('seed', 0)}; compute dtype: {record.get('dtype') or 'float32 (default)'}; "
                 f"output dtype: {record.get('out_dtype') or 'as the inputs'}")
    taken = record.get("taken_from_base") or {}
    if taken:
        lines.append("- tensors missing from a model, taken from the base (`--take-missing-from base`): "
                     + "; ".join(f"`{k}`: {', '.join(v[:5])}" for k, v in taken.items()))
    lines += ["", "## Configuration", "", "Reproduce with `mergelab merge mergelab_config.yml -o OUT`:", "",
              "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)
