"""Multi-stage merges: a YAML of several documents, one merge each, as mergekit-multi runs them.

A document with a ``name`` is an intermediate merge; any model path (``base_model``, ``models[*].model``,
``slices[*].sources[*].model``, ``tokenizer_source``, ``tokenizer.source``, a token's source model) equal to a
stage's name is that stage's output. The stages run in dependency order; the final merge is the unnamed
document (or, without one, the only stage no other stage uses) and goes to OUT. Intermediates go to
``intermediate_dir`` (kept) or to a temporary folder beside OUT that is removed afterwards.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mergelab.errors import ConfigError
from mergelab.merge.inputs import model_refs, resolve_model_path
from mergelab.safe_yaml import load_yaml_documents, read_config_text


def read_stage_documents(path: Path) -> list[dict[str, Any]] | None:
    """The documents of a multi-document YAML file; None when it holds one document (a plain merge)."""
    if not path.is_file():
        return None  # load_config says what it is instead
    # with the limits every config is read with (safe_yaml.py): a few thousand '[' or a 10 GB file is refused
    docs = [d for d in load_yaml_documents(read_config_text(path), str(path)) if d is not None]
    if len(docs) < 2:
        return None
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: document {i + 1} is not a mapping (a merge config)")
    return docs


def order_stages(docs: list[dict[str, Any]], source: str) -> tuple[list[tuple[str | None, dict[str, Any]]], str | None]:
    """Stages in dependency order and the name of the final one (None: the unnamed document)."""
    names = [d.get("name") for d in docs]
    for n in names:
        if n is not None and not isinstance(n, str):
            raise ConfigError(f"{source}: stage name {n!r} must be a string")
    named = [n for n in names if n is not None]
    dupes = sorted({n for n in named if named.count(n) > 1})
    if dupes:
        raise ConfigError(f"{source}: stage name(s) {dupes} used twice; give every stage its own 'name'")
    if names.count(None) > 1:
        raise ConfigError(f"{source}: more than one document has no 'name'; only the final merge may be unnamed")
    by_name = {n: d for n, d in zip(names, docs, strict=True)}
    deps = {n: {v for _, v in model_refs(d) if v in by_name and v is not None} for n, d in by_name.items()}
    order: list[str | None] = []
    state: dict[str | None, str] = {}

    def visit(n: str | None, path: list[str | None]) -> None:
        if state.get(n) == "done":
            return
        if state.get(n) == "visiting":
            cycle = " → ".join(str(x) for x in [*path[path.index(n):], n])
            raise ConfigError(f"{source}: stages depend on each other in a cycle: {cycle}")
        state[n] = "visiting"
        for dep in sorted(deps[n], key=str):
            visit(dep, [*path, n])
        state[n] = "done"
        order.append(n)

    for n in by_name:
        visit(n, [])
    unused = [n for n in by_name if not any(n in deps[m] for m in by_name)]
    if None in by_name:
        final: str | None = None
    elif len(unused) == 1:
        final = unused[0]
    else:
        raise ConfigError(f"{source}: cannot tell the final merge: stages {unused} feed no other stage; leave the "
                          "final one without a 'name'")
    extra = [n for n in unused if n != final]
    if extra:
        raise ConfigError(f"{source}: stage(s) {extra} feed no later stage and are not the final merge; remove "
                          "them or use their name as a model")
    return [(n, by_name[n]) for n in order], final


def run_stages(path: Path, docs: list[dict[str, Any]], out: Path, *, intermediate_dir: str | Path | None,
               run_one: Callable[..., Any]) -> Any:
    """Run every stage with ``run_one(config, out_dir)``; returns the final stage's result. The final stage
    also gets ``run_one(config, out, record)``: the whole multi-document YAML and the stages' order, for its
    ``mergelab.json``."""
    stages, final = order_stages([dict(d) for d in docs], str(path))
    keep = intermediate_dir is not None
    where = Path(intermediate_dir) if keep else out.parent / f".{out.name}.stages-{os.getpid()}"
    outputs = {n: where / n for n, _ in stages if n is not None and n != final}
    result = None
    try:
        for name, doc in stages:
            config = {k: v for k, v in yaml.safe_load(yaml.safe_dump(doc)).items() if k != "name"}
            for set_value, value in model_refs(config):
                # an earlier stage's output, else the path as the single-document config would read it
                set_value(str(outputs[value]) if value in outputs else
                          str(resolve_model_path(value, path.parent)) if value not in ("base", "union") else value)
            if name == final:
                record = {"stages": {"yaml": path.read_text(encoding="utf-8"), "order": [n for n, _ in stages],
                                     "final": final, "intermediate_dir": str(where) if keep else None}}
                result = run_one(config, out, record)
            else:
                result = run_one(config, outputs[name])  # type: ignore[index]
    finally:
        if not keep:
            shutil.rmtree(where, ignore_errors=True)
    return result

