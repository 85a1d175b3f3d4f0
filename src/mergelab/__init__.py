"""mergelab: merge neural networks in weight space, compare merging with ensembling, show why it works."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mergelab._version import __version__
    from mergelab.merge.engine import MergeResult
    from mergelab.merge.state_dicts import merge_state_dicts
    from mergelab.methods import get_method, list_methods

__all__ = ["__version__", "get_method", "list_methods", "merge", "merge_state_dicts"]

# Imported on first use (PEP 562): `import mergelab` (and so `mergelab --help`) must import neither torch,
# which alone takes 2-3 s here, nor importlib.metadata (80 ms); tests/test_cli_startup.py checks it.
_LAZY = {"__version__": "mergelab._version", "merge_state_dicts": "mergelab.merge.state_dicts",
         "get_method": "mergelab.methods", "list_methods": "mergelab.methods"}
# The subpackage (its __init__ imports nothing) is bound first: importing it later, as the lazy names do,
# would rebind `mergelab.merge` from the function below to the subpackage.
importlib.import_module("mergelab.merge")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mergelab' has no attribute {name!r}")


def merge(config: Any, out_dir: Any, **kwargs: Any) -> MergeResult:
    """Run a merge from a config (YAML path, dict or :class:`MergeConfig`) into ``out_dir``.

    See :func:`mergelab.merge.engine.run_merge` for the options.
    """
    from mergelab.merge.engine import run_merge

    return run_merge(config, out_dir, **kwargs)
