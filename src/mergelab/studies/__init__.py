"""Reproducible studies; each writes CSV + Markdown + PNG + a self-contained ``report.html`` into ``out``.

``run_study(name, out, quick=..., seed=..., **options)`` runs one by name; ``STUDIES`` maps names to their
``run`` functions and ``DESCRIPTIONS`` gives one line each (for CLI help). Options are the fields of the
study's ``Config`` dataclass (e.g. ``archs=("vgg6", "linear")``, ``eval_mode="train"``); unknown options are
errors that list the allowed ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

_MODULES = {
    "weights-vs-features": "mergelab.studies.weights_vs_features",
    "magnitude": "mergelab.studies.magnitude",
    "templates": "mergelab.studies.templates",
}

DESCRIPTIONS: dict[str, str] = {
    "weights-vs-features": "Uniform/greedy soups vs logit/feature ensembles over architectures, datasets and "
                           "N (Table 1, Fig. 3, Fig. 7a).",
    "magnitude": "Scale every model's parameters by c = 1..110 and compare soups with ensembles; checks the "
                 "max-norm and variance bounds of averaging (Fig. 4, 7b, 7c).",
    "templates": "Linear-classifier weights as class templates, averaged templates of classes i and i+5, and "
                 "first-layer conv kernels (Fig. 1, Fig. 2).",
}


def _runner(name: str) -> Callable[..., Path]:
    def run(out: Path, *, quick: bool = False, seed: int = 0, **options: Any) -> Path:
        module = importlib.import_module(_MODULES[name])  # lazy: importing studies stays cheap
        return module.run(Path(out), quick=quick, seed=seed, **options)

    run.__name__ = name.replace("-", "_")
    run.__doc__ = DESCRIPTIONS[name]
    return run


#: study name → ``run(out, *, quick=False, seed=0, **options) -> Path`` (the report path)
STUDIES: dict[str, Callable[..., Path]] = {name: _runner(name) for name in _MODULES}


def run_study(name: str, out: Path, *, quick: bool = False, seed: int = 0, **options: Any) -> Path:
    """Run study ``name`` into ``out`` and return the path of its ``report.html``."""
    if name not in STUDIES:
        raise ValueError(f"unknown study '{name}'; choose one of {sorted(STUDIES)}")
    return STUDIES[name](Path(out), quick=quick, seed=seed, **options)


__all__ = ["DESCRIPTIONS", "STUDIES", "run_study"]
