"""The CMA-ES merge search demonstrated on the MLP multi-task suite (:mod:`mergelab.zoo.mlp_suite`).

Suite: an MLP (3 hidden layers of 128) pre-trained on MNIST and fine-tuned on Animal-MNIST, MNIST rotated by
90° and MNIST under a fixed pixel permutation, one head per task; the bodies are merged by task arithmetic.

Comparison (validation picks, test reports): the pre-trained body with the task heads; each fine-tuned
model on its own task (the upper bound); the best hand-tuned task arithmetic (one λ for every task vector
and layer, λ ∈ {0.1, …, 1.5} chosen on validation); and the CMA-ES search of one weight per task vector per
layer, started from that best hand-tuned config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from mergelab.evaluation import correct
from mergelab.report import FigureRef, Report, Section, Table
from mergelab.report.plots import line_panels
from mergelab.search.evaluate import load_state_dict, merge_to_state_dict
from mergelab.search.run import SCORES_HOW_TO_READ, run_search
from mergelab.studies.common import StudyResult, study_runner
from mergelab.studies.verdict import difference_verdict, tasks_difference
from mergelab.zoo.mlp_suite import TASKS, MLPSuiteConfig, build_suite, evaluate, task_logits


@dataclass(frozen=True)
class SuiteConfig(MLPSuiteConfig):
    """The suite's recipe (inherited; only its fields make the suite) and the search settings."""

    lambdas: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 16))
    low: float = 0.0
    high: float = 1.5
    population: int = 10
    generations: int = 15
    sigma0: float = 0.2
    seed: int = 0
    executor: str = "local"  # local, local:N, ray, ray:ADDRESS: where the search evaluates its merges


QUICK = SuiteConfig(pretrain_epochs=5, finetune_epochs=3, n_train=2000, generations=8, population=8)


def _ta_config(root: Path, lam: float) -> dict[str, Any]:
    return {"merge_method": "task_arithmetic", "base_model": str((root / "base.safetensors").resolve()),
            "models": [{"model": str((root / f"{t}.safetensors").resolve()), "parameters": {"weight": lam}}
                       for t in TASKS],
            "parameters": {"lambda": 1.0}}


def build(out: Path, cfg: SuiteConfig, *, show_progress: bool = True) -> StudyResult:
    """Build the suite, tune task arithmetic by hand (λ grid), search per-layer weights."""
    seed, executor = cfg.seed, cfg.executor
    suite = out / "suite"
    build_suite(suite, cfg, seed)
    suite_s = str(suite.resolve())

    # reference points
    rows: list[dict[str, Any]] = []
    base = load_file(str(suite / "base.safetensors"))
    for name, sd in [("pre-trained body (λ = 0)", base)]:
        rows.append({"method": name, **_both(sd, suite_s)})
    for task in TASKS:
        own = load_file(str(suite / f"{task}.safetensors"))
        val = evaluate(own, suite_s, "val", [task])
        test = evaluate(own, suite_s, "test", [task])
        rows.append({"method": f"fine-tuned on {task} (own task only)", f"val acc[{task}]": val["score"],
                     f"test acc[{task}]": test["score"]})
    # hand-tuned: one λ for all task vectors and layers, picked on validation
    sweep = [(lam, *(evaluate(merged, suite_s, split) for split in ("val", "test")))
             for lam in cfg.lambdas for merged in [merge_to_state_dict(_ta_config(suite, lam))]]
    best_lam, best_val, best_test = max(sweep, key=lambda s: s[1]["score"])
    rows.append({"method": f"task arithmetic, best hand-tuned λ = {best_lam}", **_prefixed(best_val, "val"),
                 **_prefixed(best_test, "test")})

    search_yaml = out / "search.yaml"
    search_yaml.write_text(yaml.safe_dump({
        "merge": _ta_config(suite, best_lam),
        "search": {"groups": "blocks", "parameters": [{"name": "weight", "low": cfg.low, "high": cfg.high}],
                   "population": cfg.population, "generations": cfg.generations, "sigma0": cfg.sigma0, "seed": seed},
        "evaluator": {"callable": "mergelab.zoo.mlp_suite:evaluate",
                      "kwargs": {"suite": suite_s, "split": "val"},
                      "test_kwargs": {"suite": suite_s, "split": "test"},
                      "label": "validation accuracy, mean over 3 tasks (%)"},
    }, sort_keys=False))
    best_yaml = run_search(search_yaml, out / "search", seed=seed, executor=executor, show_progress=show_progress)
    record = json.loads((out / "search" / "search.json").read_text())
    rows.append({"method": "task arithmetic, CMA-ES per-layer weights", **_prefixed(record["best"], "val"),
                 **_prefixed(record["test"]["best"], "test")})

    cols = ["method", "val score", "test score", *[f"test acc[{t}]" for t in TASKS]]
    table = Table("Multi-task merge of 3 fine-tuned MLP bodies (accuracy, %; score = mean over the 3 tasks)",
                  rows, columns=cols, floatfmt="{:.2f}",
                  note="Validation picks λ and drives the search; test is reported only. 'own task only' rows "
                       "are each fine-tuned model on its own task: the upper bound for any merge.")
    lam_fig = line_panels(
        {"task arithmetic, one λ": ([s[0] for s in sweep], {"validation": [s[1]["score"] for s in sweep],
                                                            "test": [s[2]["score"] for s in sweep]})},
        out / "lambda_sweep.png", xlabel="λ (weight of every task vector)", ylabel="mean accuracy over tasks (%)",
        title="Hand-tuned task arithmetic")
    gain_val = record["best"]["score"] - best_val["score"]
    gain_test = record["test"]["best"]["score"] - best_test["score"]
    # the search chose on validation: test decides, paired over the same test examples of the 3 tasks
    found, hand = load_state_dict(out / "search" / "best_model"), merge_to_state_dict(_ta_config(suite, best_lam))
    right = [{t: correct(lg, y) for t, (lg, y) in task_logits(sd, suite_s, "test").items()} for sd in (found, hand)]
    verdict = difference_verdict("Per-layer CMA-ES search beats the best hand-tuned task arithmetic",
                                 tasks_difference(*right, seed=seed), unit="points of mean accuracy",
                                 context=f"validation {gain_val:+.2f} points (the search's own objective), test "
                                         f"{gain_test:+.2f} points ({record['evaluations']} merges evaluated)")
    report = Report("Evolutionary merge search on a 3-task MLP suite", intro=__doc__.split("\n\n")[1],
                    meta={"seed": seed, "executor": executor, "best config": str(best_yaml)})
    report.add(Section("Results", verdicts=[verdict], tables=[table],
                       figures=[FigureRef(lam_fig, "mean accuracy vs the single task-arithmetic λ",
                                          "x = λ, the one weight of every task vector, y = accuracy averaged over the "
                                          "3 tasks (%), on validation (used to choose λ) and on test. The chosen λ is "
                                          "the validation peak."),
                                FigureRef(out / "search" / "scores.png", "validation score per CMA-ES generation",
                                          SCORES_HOW_TO_READ)]))
    return StudyResult(report, {"results": table}, extra={"executor": executor, "best_config": str(best_yaml)})


run = study_runner("merge-search", build, SuiteConfig(), QUICK)


def _both(sd: dict[str, torch.Tensor], suite: str) -> dict[str, float]:
    return {**_prefixed(evaluate(sd, suite, "val"), "val"), **_prefixed(evaluate(sd, suite, "test"), "test")}


def _prefixed(metrics: dict[str, Any], split: str) -> dict[str, float]:
    return {f"{split} {k}": float(v) for k, v in metrics.items() if k == "score" or k.startswith("acc[")}
