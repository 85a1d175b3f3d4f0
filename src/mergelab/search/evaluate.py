"""Score one candidate: merge it with the file-based engine, hand the state dict to the user's evaluator.

Candidates are merged by :func:`mergelab.merge` itself (into a temporary folder) rather than in memory, so
the merge that is scored is, by construction, the one that the saved YAML reproduces — including dtype
handling and whole-model TIES thresholds.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from mergelab.io.readers import open_checkpoint

Evaluator = Callable[..., float | Mapping[str, float]]


@lru_cache(maxsize=8)
def resolve_callable(path: str, folder: str | None = None) -> Evaluator:
    """``package.module:function``, ``package.module.function`` or ``file.py:function`` (relative paths are
    taken from ``folder``, the search config's folder, then the working directory)."""
    module_path, _sep, attr = path.rpartition(":") if ":" in path else path.rpartition(".")
    if not module_path or not attr:
        raise ValueError(f"evaluator '{path}': write 'package.module:function' or 'file.py:function'")
    if module_path.endswith(".py"):
        file = Path(module_path)
        if not file.is_absolute() and folder is not None and (Path(folder) / file).is_file():
            file = Path(folder) / file
        if not file.is_file():
            raise ValueError(f"evaluator '{path}': file {file} not found")
        name = f"_mergelab_evaluator_{abs(hash(str(file.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_path)
        except ImportError as exc:
            raise ValueError(f"evaluator '{path}': cannot import '{module_path}' ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"evaluator '{path}': '{module_path}' has no callable '{attr}'")
    return fn  # type: ignore[no-any-return]


def score_of(result: float | Mapping[str, float]) -> tuple[float, dict[str, float]]:
    """(score, all metrics) from an evaluator's return value (a number, or a mapping with key 'score')."""
    if isinstance(result, Mapping):
        if "score" not in result:
            raise ValueError(f"the evaluator returned a mapping without a 'score' key: {sorted(result)}")
        metrics = {k: float(v) for k, v in result.items()}
    else:
        metrics = {"score": float(result)}
    if not math.isfinite(metrics["score"]):
        metrics["score"] = -math.inf  # a diverged merge loses every comparison instead of poisoning CMA-ES
    return metrics["score"], metrics


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(folder) as reader:
        return {name: reader.get(name) for name in reader.names}


def merge_to_state_dict(merge: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Merge with the engine into a temporary folder and read the result back."""
    from mergelab.merge.engine import run_merge

    tmp = Path(tempfile.mkdtemp(prefix="mergelab-search-"))
    try:
        run_merge(dict(merge), tmp / "merged", progress=False, hash_inputs=False)
        return load_state_dict(tmp / "merged")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class CandidateJob:
    merge: dict[str, Any]
    evaluator: str
    kwargs: dict[str, Any]
    folder: str | None = None


def evaluate_candidate(job: CandidateJob) -> dict[str, float]:
    """The evaluator's metrics for one candidate (runs in a worker: module-level and picklable)."""
    fn = resolve_callable(job.evaluator, job.folder)
    state = merge_to_state_dict(job.merge)
    return score_of(fn(state, **job.kwargs))[1]
