"""The layers of DESIGN.md hold in the code: imports point down, and no modules import each other in a circle.

The import graph is read from the AST of every module under src/mergelab (imports inside functions and under
``TYPE_CHECKING`` count: a lazy import is still a dependency), so the test needs no import side effects.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Higher layers may import lower ones and their own; never a higher one. A module takes the layer of its
# longest listed prefix; a new top-level module must be placed here (the test says so).
LAYERS: dict[str, int] = {
    # foundations: torch/stdlib only, usable everywhere
    "mergelab._version": 0, "mergelab.errors": 0, "mergelab.types": 0, "mergelab.signals": 0,
    "mergelab.safe_yaml": 0, "mergelab.evaluation": 0, "mergelab.runtime": 0, "mergelab.terminal": 0,
    "mergelab.imports": 0,
    "mergelab.kernels": 0,  # compiled loops the methods call: torch, numpy and numba only
    # the merge engine's parts: readers/writer and the pure methods, then the engine
    "mergelab.io": 1, "mergelab.methods": 1,
    "mergelab.method_catalog": 2,  # the registry's metadata as JSON, read by the CLI without torch
    "mergelab.merge": 2,
    # users of the engine: output-space ensembles, soups, alignment, analysis, reports, data statistics
    "mergelab.ensemble": 3, "mergelab.soups": 3, "mergelab.align": 3, "mergelab.analysis": 3,
    "mergelab.report": 3, "mergelab.statistics": 3, "mergelab.lora_extract": 3, "mergelab.example_models": 3,
    "mergelab.sanity_eval": 3,
    # orchestration: merge search, parallel jobs, the model zoo
    "mergelab.search": 4, "mergelab.executor": 4, "mergelab.zoo": 4,
    "mergelab.studies": 5,
    # entry points: the CLI and the package's public API
    "mergelab.cli": 6, "mergelab.__main__": 6, "mergelab": 6,
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "mergelab").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The mergelab modules ``module`` imports (``from pkg import sub`` names the submodule, not the package)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        for name in targets:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("mergelab") and name != module:
                found.add(name)
    return found


def _layer(module: str) -> int | None:
    """The layer of the longest listed prefix (the package root ``mergelab`` is only itself)."""
    best = max((p for p in LAYERS if module == p or (p != "mergelab" and module.startswith(p + "."))), key=len,
               default=None)
    return LAYERS[best] if best is not None else None


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
                  for m, deps in graph.items() for d in deps if (_layer(d) or 0) > (_layer(m) or 0))


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of two or more modules (Tarjan): each is a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


MODULES = _modules()
GRAPH = {m: _imports(m, p, set(MODULES)) for m, p in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in MODULES if _layer(m) is None)
    assert not unplaced, f"place these modules in LAYERS (tests/test_layering.py): {unplaced}"


def test_no_module_imports_one_of_a_higher_layer() -> None:
    assert not _upward(GRAPH), "\n".join(_upward(GRAPH))


def test_no_modules_import_each_other_even_through_others() -> None:
    assert not _circles(GRAPH), f"modules that import each other (directly or through others): {_circles(GRAPH)}"


def test_the_checks_see_an_upward_import_and_a_circle() -> None:
    # made-up graphs: align (layer 3) importing the zoo (layer 4); a → b → c → a
    assert _upward({"mergelab.align.barrier": {"mergelab.zoo.primitives", "mergelab.types"}}) == [
        "mergelab.align.barrier (layer 3) imports mergelab.zoo.primitives (layer 4)"]
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _layer("mergelab.newthing") is None and _layer("mergelab") == 6


@pytest.mark.parametrize(("source", "expected"), [
    ("from mergelab.studies.task_vectors import plots", {"mergelab.studies.task_vectors.plots"}),
    ("from mergelab.merge.state_dicts import merge_state_dicts", {"mergelab.merge.state_dicts"}),
    ("from mergelab import merge_state_dicts", {"mergelab"}),
    ("from ..merge import engine", {"mergelab.merge.engine"}),
    ("import mergelab.zoo.data as data", {"mergelab.zoo.data"}),
])
def test_the_import_reader_names_the_module_imported(tmp_path: Path, source: str, expected: set[str]) -> None:
    path = tmp_path / "probe.py"
    path.write_text(f"def f():\n    {source}\n")
    assert _imports("mergelab.analysis.probe", path, set(MODULES)) == expected
