"""mergelab: merge neural networks in weight space, compare merging with ensembling, show why it works."""

from mergelab._version import __version__
from mergelab.merge.state_dicts import merge_state_dicts
from mergelab.methods import get_method, list_methods

__all__ = ["__version__", "get_method", "list_methods", "merge", "merge_state_dicts"]


def merge(config, out_dir, **kwargs):  # type: ignore[no-untyped-def]
    """Run a merge from a config (YAML path, dict or :class:`MergeConfig`) into ``out_dir``.

    See :func:`mergelab.merge.engine.run_merge` for the options.
    """
    from mergelab.merge.engine import run_merge

    return run_merge(config, out_dir, **kwargs)
