"""A small, real multi-task merging suite from the zoo's offline data, and the CMA-ES search demonstrated on it.

Suite: an MLP (3 hidden layers of 128) is pre-trained on MNIST (mnist5k) and then fine-tuned, each copy
with a fresh head of its own, on three other tasks: Animal-MNIST silhouettes, MNIST rotated by 90°, and
MNIST under one fixed, seeded pixel permutation. The hidden layers ("body") are merged by task
arithmetic; every task keeps its own fine-tuned head (the multi-head setting of task-vector merging).

Comparison (validation picks, test reports): the pre-trained body with the task heads; each fine-tuned
model on its own task (the upper bound); the best hand-tuned task arithmetic (one λ for every task vector
and layer, λ ∈ {0.1, …, 1.5} chosen on validation); and the CMA-ES search of one weight per task vector per
layer, started from that best hand-tuned config.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from mergelab.report import FigureRef, Report, Section, Table, Verdict
from mergelab.report.plots import line_panels
from mergelab.search.evaluate import merge_to_state_dict
from mergelab.search.run import run_search
from mergelab.studies.common import apply_options
from mergelab.zoo.data import Dataset, load_dataset
from mergelab.zoo.models import MLP
from mergelab.zoo.task_suite import accuracy_pct
from mergelab.zoo.train import TrainConfig, fit

TASKS = ("animals", "mnist-rot90", "mnist-perm")
PERM_SEED = 1234  # the pixel permutation of the mnist-perm task (fixed: it defines the task)


@dataclass(frozen=True)
class SuiteConfig:
    hidden: int = 128
    depth: int = 3
    pretrain_epochs: int = 8
    finetune_epochs: int = 4
    n_train: int | None = None  # per task; None: the whole train split
    lambdas: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 16))
    low: float = 0.0
    high: float = 1.5
    population: int = 10
    generations: int = 15
    sigma0: float = 0.2


QUICK = SuiteConfig(pretrain_epochs=5, finetune_epochs=3, n_train=2000, generations=8, population=8)


def _transform(task: str, d: Dataset) -> Dataset:
    x = d.x
    if task == "mnist-rot90":
        x = torch.rot90(x, 1, (2, 3)).contiguous()
    elif task == "mnist-perm":
        perm = torch.randperm(x[0].numel(), generator=torch.Generator().manual_seed(PERM_SEED))
        x = x.flatten(1)[:, perm].reshape(x.shape).contiguous()
    return Dataset(task, d.split, d.seed, x, d.y, d.num_classes, d.kind, d.class_names, d.input_shape, d.norm)


def task_data(task: str, split: str, n: int | None = None, seed: int = 0) -> Dataset:
    """One split of one task (``pretrain`` is plain mnist5k)."""
    source = "animal-mnist" if task == "animals" else "mnist5k"
    d = load_dataset(source, split, 0)  # type: ignore[arg-type]
    return _transform(task, d).subset(n, seed=seed)


def _body(model: MLP) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k.startswith("body.")}


def build_suite(root: Path, cfg: SuiteConfig, seed: int) -> dict[str, Any]:
    """Train and save ``base.safetensors``, ``<task>.safetensors`` (bodies) and ``heads.pt``; cached in ``root``."""
    meta_path = root / "suite.yaml"
    meta = {"config": asdict(cfg), "seed": seed, "tasks": list(TASKS), "perm_seed": PERM_SEED}
    if meta_path.is_file() and yaml.safe_load(meta_path.read_text()) == yaml.safe_load(yaml.safe_dump(meta)):
        return meta
    root.mkdir(parents=True, exist_ok=True)
    shape = (1, 28, 28)
    torch.manual_seed(seed)
    model = MLP(shape, 10, cfg.depth, cfg.hidden)
    train_cfg = TrainConfig("mlp2", "mnist5k", augment=False, n_train=cfg.n_train)
    fit(model, load_dataset("mnist5k", "train", 0).subset(cfg.n_train, seed=seed), train_cfg, cfg.pretrain_epochs,
        seed)
    base = _body(model)
    save_file(base, str(root / "base.safetensors"))
    heads = {}
    for i, task in enumerate(TASKS):
        ft = MLP(shape, 10, cfg.depth, cfg.hidden)
        ft.load_state_dict(model.state_dict())
        torch.manual_seed(seed * 1000 + i + 1)  # the task's own fresh head
        ft.head.reset_parameters()
        fit(ft, task_data(task, "train", cfg.n_train, seed), train_cfg, cfg.finetune_epochs, seed * 1000 + i + 1)
        save_file(_body(ft), str(root / f"{task}.safetensors"))
        heads[task] = {k: v.clone() for k, v in ft.head.state_dict().items()}
    torch.save(heads, root / "heads.pt")
    meta_path.write_text(yaml.safe_dump(meta, sort_keys=False))
    return meta


@lru_cache(maxsize=4)
def _suite(suite: str) -> tuple[dict[str, dict[str, torch.Tensor]], int, int]:
    meta = yaml.safe_load((Path(suite) / "suite.yaml").read_text())
    heads = torch.load(Path(suite) / "heads.pt", weights_only=True)
    return heads, int(meta["config"]["depth"]), int(meta["config"]["hidden"])


@lru_cache(maxsize=8)
def _eval_data(task: str, split: str) -> Dataset:
    return task_data(task, split)


@torch.no_grad()
def evaluate(state_dict: dict[str, torch.Tensor], suite: str, split: str = "val",
             tasks: tuple[str, ...] | list[str] = TASKS) -> dict[str, float]:
    """Evaluator for ``mergelab search``: mean accuracy (%) over the tasks, each with its own head."""
    heads, depth, hidden = _suite(suite)
    model = MLP((1, 28, 28), 10, depth, hidden).eval()
    out: dict[str, float] = {}
    for task in tasks:
        model.load_state_dict({**{k: v for k, v in state_dict.items() if k.startswith("body.")},
                               **{f"head.{k}": v for k, v in heads[task].items()}})
        d = _eval_data(task, split)
        out[f"acc[{task}]"] = accuracy_pct(model(d.x), d.y)
    out["score"] = sum(out[f"acc[{t}]"] for t in tasks) / len(tasks)
    return out


def _ta_config(root: Path, lam: float) -> dict[str, Any]:
    return {"merge_method": "task_arithmetic", "base_model": str((root / "base.safetensors").resolve()),
            "models": [{"model": str((root / f"{t}.safetensors").resolve()), "parameters": {"weight": lam}}
                       for t in TASKS],
            "parameters": {"lambda": 1.0}}


def run(out: Path, *, quick: bool = False, seed: int = 0, executor: str = "local",
        config: SuiteConfig | None = None, show_progress: bool = True, **options: Any) -> Path:
    """Build the suite, tune task arithmetic by hand (λ grid), search per-layer weights; returns report.html.

    ``options`` are :class:`SuiteConfig` fields applied on top of the quick or full settings.
    """
    started = time.perf_counter()
    cfg = apply_options(config or (QUICK if quick else SuiteConfig()), options)
    out = Path(out)
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
        "evaluator": {"callable": "mergelab.studies.multitask_search:evaluate",
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
    table.write_csv(out / "results.csv")
    (out / "results.md").write_text(table.to_markdown() + "\n")
    lam_fig = line_panels(
        {"task arithmetic, one λ": ([s[0] for s in sweep], {"validation": [s[1]["score"] for s in sweep],
                                                            "test": [s[2]["score"] for s in sweep]})},
        out / "lambda_sweep.png", xlabel="λ (weight of every task vector)", ylabel="mean accuracy over tasks (%)",
        title="Hand-tuned task arithmetic")
    gain_val = record["best"]["score"] - best_val["score"]
    gain_test = record["test"]["best"]["score"] - best_test["score"]
    verdict = Verdict("Per-layer CMA-ES search beats the best hand-tuned task arithmetic",
                      gain_test > 0 if gain_val > 0 else False,
                      f"validation {gain_val:+.2f} points, test {gain_test:+.2f} points "
                      f"({record['evaluations']} merges evaluated)")
    report = Report("Evolutionary merge search on a 3-task MLP suite", intro=__doc__.split("\n\n")[1],
                    meta={"seed": seed, "executor": executor, "config": asdict(cfg),
                          "best_config": str(best_yaml), "wall_seconds": round(time.perf_counter() - started, 1)})
    report.add(Section("Results", verdicts=[verdict], tables=[table],
                       figures=[FigureRef(lam_fig, "mean accuracy vs the single task-arithmetic λ"),
                                FigureRef(out / "search" / "scores.png", "validation score per CMA-ES generation")]))
    (out / "report.md").write_text(report.to_markdown())
    return report.write(out / "report.html")


def _both(sd: dict[str, torch.Tensor], suite: str) -> dict[str, float]:
    return {**_prefixed(evaluate(sd, suite, "val"), "val"), **_prefixed(evaluate(sd, suite, "test"), "test")}


def _prefixed(metrics: dict[str, Any], split: str) -> dict[str, float]:
    return {f"{split} {k}": float(v) for k, v in metrics.items() if k == "score" or k.startswith("acc[")}
