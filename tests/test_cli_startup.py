"""`mergelab --help`, `--version` and `methods` start without importing torch or any heavy library.

Importing torch alone takes 2-3 s on these machines; these commands need none of it. The start-up time
itself is measured in benchmarks/cli_startup.py (never timed here); this checks the cause: which modules
a fresh interpreter has imported when the command has run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergelab.method_catalog import CATALOG, describe_registry, find_method, load_catalog

HEAVY = ("torch", "numpy", "numba", "transformers", "safetensors", "matplotlib", "scipy", "yaml", "mergelab.methods",
         "mergelab.merge.engine")
_PROBE = """
import atexit, json, sys
heavy = {heavy!r}
atexit.register(lambda: print("\\nIMPORTED " + json.dumps(sorted(m for m in heavy if m in sys.modules))))
sys.argv = ["mergelab", *{args!r}]
from mergelab.cli import app
app(prog_name="mergelab")
"""


def _heavy_imported(*args: str) -> tuple[list[str], str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src"), "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY, args=list(args))], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("IMPORTED "))
    return json.loads(line.removeprefix("IMPORTED ")), done.stdout


@pytest.mark.parametrize("args", [("--help",), ("--version",), ("methods",), ("methods", "ties"),
                                  ("merge", "--help"), ("study", "--help")])
def test_light_commands_import_nothing_heavy(args: tuple[str, ...]) -> None:
    imported, out = _heavy_imported(*args)
    assert imported == [], f"mergelab {' '.join(args)} imported {imported}"
    assert out.strip()


def test_mergelab_merge_stays_the_function_once_the_engine_is_imported() -> None:
    import mergelab
    import mergelab.merge.engine

    assert callable(mergelab.merge) and mergelab.merge_state_dicts.__module__ == "mergelab.merge.state_dicts"


def test_methods_lists_every_registered_method_with_its_parameters() -> None:
    _, out = _heavy_imported("methods")
    from mergelab.methods import list_methods

    assert all(name in out for name in list_methods())


def test_method_catalog_matches_the_registry() -> None:
    assert load_catalog() == describe_registry(), (
        f"{CATALOG} is out of date with the method registry: run `python -m mergelab.method_catalog` "
        "and commit the file")


def test_catalog_finds_aliases_and_refuses_unknown_names_like_the_registry() -> None:
    from mergelab.methods import get_method

    catalog = load_catalog()
    assert find_method("soup", catalog).name == get_method("soup").name == "linear"
    with pytest.raises(KeyError) as ours:
        find_method("tie", catalog)
    with pytest.raises(KeyError) as theirs:
        get_method("tie")
    assert str(ours.value) == str(theirs.value)
