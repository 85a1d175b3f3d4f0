"""What ``mergelab methods`` shows, read from a JSON file instead of importing the method bodies.

Registering the methods imports every method module and torch with them (2-3 s on these machines);
listing them must start in well under half a second. ``data/methods.json`` is written from the live
registry by ``python -m mergelab.method_catalog`` and holds only what the listing shows;
tests/test_cli_startup.py fails, naming that command, when it no longer matches the registry.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CATALOG = Path(__file__).parent / "data" / "methods.json"


@dataclass(frozen=True)
class ParamInfo:
    name: str
    scope: str
    kind: str
    default: str
    """``repr`` of the default, or ``required``."""
    help: str


@dataclass(frozen=True)
class MethodInfo:
    name: str
    aliases: tuple[str, ...]
    base: str
    tools: str
    paper: str
    summary: str
    formula: str
    params: tuple[ParamInfo, ...]


def describe_registry() -> list[MethodInfo]:
    """The catalog as the registry says it is now (imports every method, and torch)."""
    from mergelab.methods import all_methods

    return [MethodInfo(m.name, tuple(m.aliases), m.base, m.tools, m.paper, m.summary, m.formula,
                       tuple(ParamInfo(p.name, p.scope, p.kind.__name__, "required" if p.required else repr(p.default),
                                       p.help) for p in m.params))
            for m in all_methods()]


def load_catalog(path: Path = CATALOG) -> list[MethodInfo]:
    return [MethodInfo(**{**m, "aliases": tuple(m["aliases"]), "params": tuple(ParamInfo(**p) for p in m["params"])})
            for m in json.loads(path.read_text(encoding="utf-8"))]


def find_method(name: str, catalog: list[MethodInfo]) -> MethodInfo:
    """The method called ``name`` (or one of its aliases); KeyError worded as the registry's."""
    for m in catalog:
        if name == m.name or name in m.aliases:
            return m
    raise KeyError(f"unknown merge method '{name}'; valid methods: {', '.join(m.name for m in catalog)}")


def write_catalog(path: Path = CATALOG) -> None:
    rows: list[dict[str, Any]] = [asdict(m) for m in describe_registry()]
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_catalog()
    print(f"wrote {CATALOG}")
