"""Study ``task-vector-search``: CMA-ES per-block task-arithmetic weights on a task-vector suite.

The encoders of the ``task-vectors`` study's suite (vision: a ViT fine-tuned on eight 28×28 tasks; text:
all-MiniLM-L6-v2 fine-tuned on six text tasks) are merged by task arithmetic. The baseline is the best
hand-tuned task arithmetic (one λ for every task vector and layer, chosen on validation); ``mergelab
search`` then looks for one weight per task vector and per block with CMA-ES, starting from that λ and
scored by mean normalised validation accuracy (merged / fine-tuned, every task read with its own head).
Test accuracy is reported for both, never used to choose.

Writes the exported encoders (``models/``), ``search.yaml``, the search outputs (``search/``: the best
config that ``mergelab merge`` reproduces, history, score plot), ``results.csv|md``, ``report.html|md``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from mergelab.report import FigureRef, Report, Section, Table
from mergelab.search.evaluate import load_state_dict
from mergelab.search.run import SCORES_HOW_TO_READ, run_search
from mergelab.studies.common import StudyResult, study_runner
from mergelab.studies.task_vectors.bench import MergeBench
from mergelab.studies.task_vectors.study import SUITES, make_suite
from mergelab.studies.verdict import difference_verdict, tasks_difference

DEFAULT_LAMBDAS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


@dataclass(frozen=True)
class Config:
    suite: str = "vision"  # vision or text
    generations: int = 15
    population: int = 8
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS  # the hand-tuned baseline's λ grid
    quick_suite: bool = False  # the task-vectors study's quick suite (the fine-tunes of its --quick run)
    seed: int = 0
    executor: str = "local"  # local, local:N, ray, ray:ADDRESS: where the search evaluates its merges

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite '{self.suite}'; choose one of {list(SUITES)}")


QUICK = Config(generations=4, population=6, quick_suite=True)


@functools.lru_cache(maxsize=2)
def _bench(suite: str, quick: bool, seed: int) -> MergeBench:
    """The suite with its fine-tuned encoders (from the cache), once per process: search workers reuse it."""
    suite_obj, _ = make_suite(suite, quick=quick, seed=seed)
    suite_obj.show_progress = False
    return MergeBench(suite_obj, seed=seed)


def evaluate(state_dict: Mapping[str, torch.Tensor], *, suite: str, split: str, quick: bool = False,
             seed: int = 0) -> dict[str, float]:
    """Search evaluator: mean normalised accuracy (%) of a merged encoder over the suite's tasks."""
    bench = _bench(suite, quick, seed)
    accs = bench.accuracies(state_dict, bench.tasks, split)
    return {"score": bench.mean_normalised(accs, split), **{f"acc[{t}]": a for t, a in accs.items()}}


def _export(bench: MergeBench, folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, state in [("pretrained", bench.pretrained), *bench.states.items()]:
        path = folder / f"{name}.safetensors"
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
        paths[name] = str(path.resolve())
    return paths


def build(out: Path, cfg: Config, *, show_progress: bool = True) -> StudyResult:
    """Hand-tuned task arithmetic vs CMA-ES per-block weights on ``cfg.suite``."""
    suite, quick, seed, executor = cfg.suite, cfg.quick_suite, cfg.seed, cfg.executor
    bench = _bench(suite, quick, seed)
    paths = _export(bench, out / "models")
    tasks = bench.tasks

    sel = bench.select("task_arithmetic", tasks, [{"lambda": float(lam)} for lam in cfg.lambdas])
    best_lam = float(sel.params["lambda"])
    hand = {"val": bench.mean_normalised(sel.val, "val"), "test": bench.mean_normalised(sel.test, "test")}
    kwargs: dict[str, Any] = {"suite": suite, "quick": quick, "seed": seed}
    config = {
        # weight = λ on every task vector with a global lambda of 1 is the hand-tuned merge: the search
        # starts from it and moves each (task vector, block) weight on its own
        "merge": {"merge_method": "task_arithmetic", "base_model": paths["pretrained"],
                  "models": [{"model": paths[t], "parameters": {"weight": best_lam}} for t in tasks],
                  "parameters": {"lambda": 1.0}},
        "search": {"groups": "blocks",
                   # the range scales with λ: CMA-ES steps are a fraction of it, and a λ near 0 needs fine steps
                   "parameters": [{"name": "weight", "low": 0.0, "high": min(2.0, 4 * best_lam)}],
                   "population": cfg.population, "generations": cfg.generations, "sigma0": 0.2, "seed": seed},
        "evaluator": {"callable": "mergelab.studies.task_vectors.search:evaluate",
                      "kwargs": {**kwargs, "split": "val"}, "test_kwargs": {**kwargs, "split": "test"},
                      "label": "mean normalised validation accuracy (%)"},
    }
    search_yaml = out / "search.yaml"
    search_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
    best_yaml = run_search(search_yaml, out / "search", executor=executor, show_progress=show_progress)
    record = json.loads((out / "search" / "search.json").read_text())
    found = {"val": float(record["best"]["score"]), "test": float(record["test"]["best"]["score"])}
    initial = {"val": float(record["initial"]["score"]), "test": float(record["test"]["initial"]["score"])}

    rows = [
        {"method": "pretrained encoder (λ = 0)",
         "val": bench.mean_normalised(bench.accuracies(bench.pretrained, tasks, "val"), "val"),
         "test": bench.mean_normalised(bench.accuracies(bench.pretrained, tasks, "test"), "test")},
        {"method": f"task arithmetic, best hand-tuned λ = {best_lam:g}", **hand},
        {"method": "search start (same merge, through mergelab search)", **initial},
        {"method": f"task arithmetic, CMA-ES per-block weights ({record['evaluations']} merges)", **found},
    ]
    table = Table(f"Mean normalised accuracy over the {len(tasks)} tasks of the {suite} suite (%)", rows,
                  columns=["method", "val", "test"], floatfmt="{:.2f}",
                  note="λ and the searched weights are chosen on validation; test is reported only.")
    gain_val, gain_test = found["val"] - hand["val"], found["test"] - hand["test"]
    # the search chose on validation: test decides, paired over the same test examples of every task
    _, found_right = bench.evaluate(load_state_dict(out / "search" / "best_model"), tasks, "test")
    diff = tasks_difference(found_right, bench.per_example("task_arithmetic", tasks, sel.params, "test"),
                            scale=bench.normalised_scale("test"), seed=seed)
    verdict = difference_verdict("Per-block CMA-ES search beats the best hand-tuned task arithmetic", diff,
                                 unit="points of normalised accuracy",
                                 context=f"validation {gain_val:+.2f} points (the search's own objective), "
                                         f"test {gain_test:+.2f} points")
    report = Report(f"Merge search on the {suite} task-vector suite", intro=__doc__.split("\n\n")[1],
                    meta={"suite": suite, "seed": seed, "executor": executor, "best config": str(best_yaml)})
    report.add(Section("Results", verdicts=[verdict], tables=[table],
                       figures=[FigureRef(out / "search" / "scores.png", "validation score per CMA-ES generation",
                                          SCORES_HOW_TO_READ)]))
    return StudyResult(report, {"results": table}, extra={"executor": executor, "best_config": str(best_yaml),
                                                          "lambda_trace": sel.trace})


run = study_runner("task-vector-search", build, Config(), QUICK)


__all__ = ["QUICK", "Config", "build", "evaluate", "run"]
