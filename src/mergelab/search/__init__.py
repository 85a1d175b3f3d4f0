"""Evolutionary search of per-layer (per-block) merge coefficients with CMA-ES; see :mod:`mergelab.search.run`."""

from mergelab.search.config import SearchConfig, load_search_config
from mergelab.search.run import dump_config, run_search

__all__ = ["SearchConfig", "dump_config", "load_search_config", "run_search"]
