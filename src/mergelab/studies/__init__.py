"""Reproducible studies; each writes CSV + Markdown + PNG + a self-contained ``report.html`` into ``out``.

``run_study(name, out, quick=..., seed=..., overwrite=..., **options)`` runs one by name; ``STUDIES`` maps
names to their ``run`` functions and ``DESCRIPTIONS`` gives one line each (for CLI help). Options are the fields of the
study's ``Config`` dataclass (e.g. ``archs=("vgg6", "linear")``, ``eval_mode="train"``); unknown options are
errors that list the allowed ones.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

_MODULES = {
    "weights-vs-features": "mergelab.studies.weights_vs_features",
    "magnitude": "mergelab.studies.magnitude",
    "magnitude-deep": "mergelab.studies.magnitude_deep",
    "templates": "mergelab.studies.templates",
    "task-vectors": "mergelab.studies.task_vectors",
    "rebasin": "mergelab.studies.rebasin",
    "merge-search": "mergelab.studies.multitask_search",
    "task-vector-search": "mergelab.studies.task_vectors.search",
    "cross-dataset": "mergelab.studies.cross_dataset",
    "mode-connectivity": "mergelab.studies.mode_connectivity",
    "swa": "mergelab.studies.swa",
    "vit-soups": "mergelab.studies.vit_soups",
}

DESCRIPTIONS: dict[str, str] = {
    "weights-vs-features": "Uniform/greedy soups vs logit/feature ensembles over architectures, datasets and "
                           "N (Table 1, Fig. 3, Fig. 7a).",
    "magnitude": "Scale every model's parameters by c = 1..110 and compare soups with ensembles; checks the "
                 "max-norm and variance bounds of averaging (Fig. 4, 7b, 7c).",
    "magnitude-deep": "The magnitude study at depth ≥ 19 (VGG-19 plain and BN, ResNet-20, 3 seeds): dense c grid, "
                      "non-finite logits per method, float32 vs float64 (the overflow hypothesis), BN statistics "
                      "scaled or not, running vs batch statistics (Fig. 4, 7b-c, Tab. 10).",
    "templates": "Linear-classifier weights as class templates, averaged templates of classes i and i+5, and "
                 "first-layer conv kernels (Fig. 1, Fig. 2).",
    "task-vectors": "Task-vector benchmark: CART, TSV-M, Iso-C/Iso-CTS vs weight averaging, task arithmetic, TIES, "
                    "DARE-TIES, Model Stock, Fisher, RegMean on an 8-task ViT suite over 3 seeds (--suite vision) "
                    "or all-MiniLM-L6-v2 (--suite text), gated by regime checks: rank × λ sweep, interference "
                    "I(k) and reconstruction error R(k), accuracy vs number of tasks.",
    "rebasin": "Git Re-Basin weight matching: loss/accuracy barriers along A→B (naive, aligned, + BatchNorm reset) "
               "and uniform soups of independently trained models with and without alignment.",
    "merge-search": "CMA-ES search of per-layer task-arithmetic weights on a multi-task suite, against the best "
                    "hand-tuned λ (validation drives the search, test is reported).",
    "task-vector-search": "CMA-ES per-block task-arithmetic weights on the task-vectors suite (--suite vision|text), "
                          "against the best hand-tuned λ.",
    "cross-dataset": "Models fine-tuned on two different datasets from one start: uniform soup vs logit/feature "
                     "ensembles, each scored on both datasets (Tab. 3).",
    "mode-connectivity": "Loss barriers on the linear path between shared-start fine-tunes, independent runs and "
                         "independent runs aligned by weight matching, with and without a BN reset.",
    "swa": "Stochastic weight averaging (constant or cyclic lr, BN update) vs the last checkpoint, conventional "
           "training and soups of independent runs.",
    "vit-soups": "ViT soups for N = 2…10, plain and behind an input layer that members share or each re-draw (the "
                 "paper's random wrapper, Tab. 9).",
}


def _runner(name: str) -> Callable[..., Path]:
    def run(out: Path, *, quick: bool = False, seed: int = 0, overwrite: bool = False, **options: Any) -> Path:
        module = importlib.import_module(_MODULES[name])  # lazy: importing studies stays cheap
        params = inspect.signature(module.run).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        unknown = sorted(k for k in options if k not in params and not takes_any)
        if unknown:
            allowed = sorted(k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)
            raise ValueError(f"study '{name}' takes no option {', '.join(unknown)}; its options: {', '.join(allowed)}")
        return module.run(Path(out), quick=quick, seed=seed, overwrite=overwrite, **options)

    run.__name__ = name.replace("-", "_")
    run.__doc__ = DESCRIPTIONS[name]
    return run


#: study name → ``run(out, *, quick=False, seed=0, overwrite=False, **options) -> Path`` (the report path)
STUDIES: dict[str, Callable[..., Path]] = {name: _runner(name) for name in _MODULES}


def run_study(name: str, out: Path, *, quick: bool = False, seed: int = 0, overwrite: bool = False,
              **options: Any) -> Path:
    """Run study ``name`` into ``out`` and return the path of its ``report.html``. A non-empty ``out`` is
    refused (:class:`~mergelab.errors.OutputExistsError`) unless ``overwrite``."""
    if name not in STUDIES:
        raise ValueError(f"unknown study '{name}'; choose one of {sorted(STUDIES)}")
    return STUDIES[name](Path(out), quick=quick, seed=seed, overwrite=overwrite, **options)


__all__ = ["DESCRIPTIONS", "STUDIES", "run_study"]
