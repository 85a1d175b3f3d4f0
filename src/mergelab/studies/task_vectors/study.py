"""Study ``task-vectors``: the task-vector benchmark — CART, TSV-M, Iso-C/Iso-CTS vs task arithmetic and the rest.

Reproduces the claims of Choi et al., "Revisiting Weight Averaging for Model Merging" (CART,
arXiv:2412.12153), Gargiulo et al. (TSV-M, CVPR 2025) and Marczak et al. (Iso-C/Iso-CTS, ICML 2025) on a
suite of tasks (:mod:`mergelab.zoo.vision_suite`: a width-128, depth-6 ViT pretrained on the union of the
offline image data and fine-tuned CLIP-style on eight 28×28 tasks new to it, 3 seeds;
:mod:`mergelab.zoo.text_suite`: the real pretrained all-MiniLM-L6-v2 fine-tuned on offline text tasks).
Encoders are merged, every task keeps its head.

0. Regime checks (:func:`regime_checks`): weight averaging above the pretrained encoder, task arithmetic's
   best λ inside its grid, task arithmetic below 92 % normalised; ‖τ_t‖/‖θ_0‖ and the shared-component
   fraction for information. A failed gating check withholds the method verdicts.
1. Side by side: mean normalised test accuracy (merged / fine-tuned, %) of the pretrained encoder,
   weight averaging, task arithmetic, TIES, DARE-TIES, Model Stock, Fisher, RegMean, CART (also with q/k/v
   as one matrix), TSV-M, Iso-C and Iso-CTS (every hyper-parameter chosen on validation, λ grids extended
   until their optimum is inside), with the logit ensemble of the fine-tuned models as reference; 95 % CIs
   from a paired bootstrap over test examples and seeds.
2. CART's rank × λ sweep (the paper's bell curve, peaking at ~8–12 % of full rank).
3. Row-space interference I(k) and reconstruction error R(k) of centred vs uncentred task matrices
   (definitions in :mod:`mergelab.analysis.interference` and docs/task_vectors.md).
4. Accuracy vs the number of merged tasks T.

Writes CSV + Markdown tables, PNG figures, ``report.html``/``report.md`` and ``mergelab.json`` into OUT.
CLI: ``mergelab study task-vectors --suite vision|text --out DIR [--quick] [--seed N]`` calling
``run(out, suite=..., quick=..., seed=...)``.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from mergelab.analysis.interference import CurvePoint, interference_curves
from mergelab.analysis.task_vector_geometry import TaskVectorGeometry, task_vector_geometry
from mergelab.evaluation import correct
from mergelab.report import FigureRef, Report, Section, Table, Verdict
from mergelab.runtime import make_progress, torch_threads
from mergelab.studies.common import StudyResult, run_config
from mergelab.studies.task_vectors import plots
from mergelab.studies.task_vectors.bench import METHODS, MergeBench, Selection
from mergelab.studies.verdict import Difference, difference_verdict, tasks_difference
from mergelab.zoo.task_suite import FinetuneRecipe, TaskSuite

SUITES = ("vision", "text")


@dataclass(frozen=True)
class Plan:
    """Hyper-parameter grids and analysis settings (recorded in mergelab.json)."""

    ta_lambdas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
    ties_density: float = 0.2
    # TIES/DARE take a disjoint mean, so λ = 1 applies about one whole task vector; smaller λ matter here
    ties_lambdas: tuple[float, ...] = (0.2, 0.3, 0.5, 0.7, 1.0, 1.3)
    dare_density: float = 0.3
    dare_lambdas: tuple[float, ...] = (0.2, 0.3, 0.5, 0.7, 1.0, 1.3)
    regmean_alpha: float = 0.9
    # ratios 0 and 1 are weight averaging for every λ, so the sweep adds them without evaluating CART there
    cart_ranks: tuple[float, ...] = (0.02, 0.04, 0.08, 0.12, 0.16, 0.25, 0.5, 0.75)
    cart_lambdas: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
    # TSV-M, Iso-C, Iso-CTS: the scale of the merged task matrix (the papers choose it on validation)
    svd_lambdas: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
    sweep_test_all: bool = True  # test every sweep point; else only the val-best λ per rank (text: costly)
    interference_ratios: tuple[float, ...] = (0.01, 0.02, 0.04, 0.08, 0.12, 0.16, 0.25, 0.5, 0.75, 1.0)
    interference_max_matrices: int | None = None  # None: every 2-D weight a task changed
    scaling_ts: tuple[int, ...] = ()  # () → 2, 4, …, all
    scaling_subsets: int = 2  # random task subsets per T < all (seeded)
    scaling_cart_ranks: tuple[float, ...] = (0.04, 0.08, 0.16)
    scaling_cart_lambdas: tuple[float, ...] = (1.0, 2.0)
    fisher_examples: int = 256
    gram_examples: int = 512
    #: fine-tuning seeds: the suite's seed and the next ones (each a full set of fine-tuned encoders)
    n_seeds: int = 1
    #: seeds merged and evaluated at once, in threads (torch ops release the GIL; every random choice has its
    #: own seeded generator, so the results do not depend on it)
    parallel_seeds: int = 1
    seed: int = 0  # DARE's masks, the task subsets of the scaling experiment, the verdicts' bootstrap
    #: keep each seed's evaluations on disk and start from an interrupted run's (MergeBench's ``resume``)
    resume: bool = True

    def __post_init__(self) -> None:
        if self.n_seeds < 1 or self.parallel_seeds < 1:
            raise ValueError(f"n_seeds and parallel_seeds must be at least 1, got {self.n_seeds} and "
                             f"{self.parallel_seeds}")

    def scaling_plan(self) -> Plan:
        return dataclasses.replace(self, cart_ranks=self.scaling_cart_ranks, cart_lambdas=self.scaling_cart_lambdas)


#: the benchmark's grids (vision, full): CART's grid as the issue asks (λ 0.5–3, rank 2–25 %), every λ axis
#: extended by MergeBench.select until its optimum is inside
BENCHMARK_PLAN = Plan(ta_lambdas=(0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0), ties_lambdas=(0.3, 0.5, 0.7, 1.0, 1.3),
                      dare_lambdas=(0.3, 0.5, 0.7, 1.0, 1.3), cart_ranks=(0.02, 0.04, 0.08, 0.12, 0.16, 0.25),
                      cart_lambdas=(0.5, 1.0, 1.5, 2.0, 3.0), interference_ratios=(0.02, 0.04, 0.08, 0.12, 0.16,
                                                                                    0.25, 0.5, 0.75, 1.0),
                      scaling_ts=(2, 4, 6, 8), scaling_subsets=1, scaling_cart_ranks=(0.04, 0.08, 0.16),
                      scaling_cart_lambdas=(1.0, 2.0), n_seeds=3, parallel_seeds=2)


def make_suite(name: str, *, quick: bool, seed: int) -> tuple[TaskSuite, Plan]:
    """The suite and the plan of the full or ``quick`` study (quick: fewer tasks, steps, examples, grid)."""
    if name == "vision":
        from mergelab.zoo.vision_suite import BENCHMARK_CONFIG, BENCHMARK_RECIPE, VisionConfig, VisionSuite

        if not quick:
            return VisionSuite(BENCHMARK_CONFIG, BENCHMARK_RECIPE, seed=seed), BENCHMARK_PLAN
        cfg = VisionConfig(tasks=("mnist", "mnist-parity", "digits", "animal-negative"), pretrain_steps=400,
                           n_train=1000, n_val=200, n_test=400)
        recipe = FinetuneRecipe(steps=200, batch_size=64, lr=1e-3, weight_decay=0.01)
        plan = Plan(ta_lambdas=(0.2, 0.3, 0.5, 0.7, 1.0), ties_lambdas=(0.8, 1.0, 1.3),
                    dare_lambdas=(0.8, 1.0, 1.3), cart_ranks=(0.04, 0.08, 0.16, 0.25, 0.5),
                    cart_lambdas=(1.0, 2.0), svd_lambdas=(0.75, 1.0, 1.5), scaling_subsets=1, fisher_examples=64,
                    gram_examples=256)
        return VisionSuite(cfg, recipe, seed=seed), plan
    if name == "text":
        from mergelab.zoo.text_suite import BENCHMARK_CONFIG as TEXT_BENCHMARK
        from mergelab.zoo.text_suite import TextConfig, TextSuite

        if not quick:
            # six tasks from six corpora at a CLIP-like small lr (the 1e-5–3e-5), with zero-shot heads
            # from class prompts as CLIP's: with linear probes as heads (the quick suite's) the pretrained encoder
            # already reached 88.9 % normalised and task arithmetic 97.1 % (3 seeds, docs/task_vectors.md), so no
            # method could be ranked; prompt heads (seed 0): pretrained 67.0 %, weight averaging 81.0 %, task
            # arithmetic 86.5 %. Scaling at T = 3 and 6 only: a MiniLM encoder has ~13× the vision ViT's
            # parameters per token, and each subset repeats every selection
            cfg = dataclasses.replace(TEXT_BENCHMARK, max_len=48, heads="prompts")
            # mixed precision (bfloat16 forwards, float32 weights): on this machine's AMX CPUs a training step
            # (32 × 48 tokens, one thread) took 0.87 s instead of 1.8 and an evaluation batch (128 × 48) 0.65–0.73
            # s instead of 2.16; the pretrained features' cosine to float32 was ≥ 0.99995
            recipe = FinetuneRecipe(steps=300, batch_size=32, lr=2e-5, weight_decay=0.01, probe_examples=512,
                                    compute_dtype="bfloat16")
            plan = Plan(ta_lambdas=(0.2, 0.3, 0.5, 0.8), ties_lambdas=(0.3, 0.5, 1.0),
                        dare_lambdas=(0.3, 0.5, 1.0), cart_ranks=(0.02, 0.04, 0.08, 0.16, 0.25),
                        cart_lambdas=(0.5, 1.0, 2.0), svd_lambdas=(0.5, 1.0, 1.5), sweep_test_all=False,
                        scaling_ts=(3, 6), scaling_subsets=1, scaling_cart_ranks=(0.08, 0.16),
                        scaling_cart_lambdas=(1.0, 2.0), fisher_examples=48, gram_examples=256, n_seeds=3,
                        parallel_seeds=3)  # 3 seeds at once on 2 cores: seeds in twos left one core idle for the third
            return TextSuite(cfg, recipe, seed=seed), plan
        cfg = TextConfig(n_train=192, n_val=32, n_test=48, max_len=40)
        recipe = FinetuneRecipe(steps=30, batch_size=16, lr=1e-4, weight_decay=0.01, probe_examples=192,
                                probe_steps=200)
        plan = Plan(ta_lambdas=(0.3, 0.6), ties_lambdas=(0.5,), dare_lambdas=(0.5,),
                    cart_ranks=(0.08, 0.16), cart_lambdas=(1.0, 2.0), svd_lambdas=(1.0,), sweep_test_all=False,
                    interference_ratios=(0.02, 0.04, 0.08, 0.16, 0.5, 1.0), interference_max_matrices=12,
                    scaling_subsets=1,
                    scaling_cart_ranks=(0.08,), scaling_cart_lambdas=(1.0, 2.0), fisher_examples=16,
                    gram_examples=96)
        return TextSuite(cfg, recipe, seed=seed), plan
    raise ValueError(f"unknown suite '{name}'; choose one of {list(SUITES)}")


def run(out: Path, *, suite: str = "vision", quick: bool = False, seed: int = 0, overwrite: bool = False) -> Path:
    """Run the study on the named suite; returns the path of ``report.html``."""
    suite_obj, plan = make_suite(suite, quick=quick, seed=seed)  # cheap: the suite fine-tunes in build
    suites = [suite_obj, *(make_suite(suite, quick=quick, seed=seed + i)[0] for i in range(1, plan.n_seeds))]
    return run_suite(out, suites, plan, quick=quick, seed=seed, overwrite=overwrite)


def run_suite(out: Path, suite: TaskSuite | Sequence[TaskSuite], plan: Plan, *, quick: bool = False, seed: int = 0,
              overwrite: bool = False) -> Path:
    """The study on any :class:`TaskSuite` (tests pass a tiny one), or on one suite per fine-tuning seed (the
    same tasks, data and pretrained encoder); ``plan`` is the study's Config."""
    suites = [suite] if isinstance(suite, TaskSuite) else list(suite)
    if len({tuple(t.name for t in s.tasks) for s in suites}) != 1:
        raise ValueError("every seed's suite must hold the same tasks")
    return run_config("task-vectors", out, functools.partial(build, suites=suites), plan, quick=quick, seed=seed,
                      overwrite=overwrite, show_progress=suites[0].show_progress)


@dataclass
class SeedRun:
    """Every experiment on one seed's fine-tuned encoders."""

    bench: MergeBench
    selections: dict[str, Selection]
    sweep: list[dict[str, Any]]
    curve: list[CurvePoint]
    scaling: list[dict[str, Any]]
    geometry: TaskVectorGeometry


def build(out: Path, plan: Plan, *, suites: Sequence[TaskSuite], show_progress: bool = True) -> StudyResult:
    """Fine-tune (or load) each seed's suite, run every experiment, draw and tabulate into ``out``."""
    bar = make_progress(disable=not show_progress)
    with torch_threads(suites[0].threads), bar:
        start = time.perf_counter()
        for suite in suites:  # one after another: probe heads are initialised from the global torch RNG
            suite.finetuned(bar)
        tuning = round(time.perf_counter() - start, 2)
        with ThreadPoolExecutor(min(plan.parallel_seeds, len(suites))) as pool:
            done = list(pool.map(lambda suite: _run_seed(suite, plan, bar), suites))
    runs = [run for run, _ in done]
    # seconds summed over seeds (seeds evaluated in parallel overlap in wall time)
    timings = {"fine-tuning (or cache load)": tuning,
               **{name: round(sum(t[name] for _, t in done), 2) for name in done[0][1]}}
    return _result(out, runs, plan, timings)


def _run_seed(suite: TaskSuite, plan: Plan, bar: Progress) -> tuple[SeedRun, dict[str, float]]:
    """Every experiment on one seed's (already fine-tuned) suite, and the seconds each took."""
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        timings[name] = round(time.perf_counter() - t0, 2)
        return time.perf_counter()

    t0 = time.perf_counter()
    bench = MergeBench(suite, seed=plan.seed, fisher_examples=plan.fisher_examples, gram_examples=plan.gram_examples,
                       resume=plan.resume)
    t0 = lap("statistics and setup", t0)
    tasks = bench.tasks
    job = bar.add_task(f"merge and evaluate ({suite.name}, seed {suite.seed})", total=len(METHODS) + 4)
    selections = _select_all(bench, tasks, plan, lambda: bar.advance(job))
    t0 = lap("method selection and test", t0)
    sweep_rows = _cart_sweep(bench, tasks, plan)
    bar.advance(job)
    t0 = lap("CART rank x lambda sweep", t0)
    curve = interference_curves([bench.states[t] for t in tasks], bench.pretrained, plan.interference_ratios,
                                max_matrices=plan.interference_max_matrices)
    bar.advance(job)
    t0 = lap("interference I(k), R(k)", t0)
    scaling_rows = _scaling(bench, plan, plan.seed, selections)
    bar.advance(job)
    lap("scaling with T", t0)
    geometry = task_vector_geometry(bench.pretrained, [bench.states[t] for t in tasks])
    return SeedRun(bench, selections, sweep_rows, curve, scaling_rows, geometry), timings


# ---- experiments ---------------------------------------------------------------------------------------
def _select_all(bench: MergeBench, tasks: list[str], plan: Plan, done: Callable[[], None]) -> dict[str, Selection]:
    out = {}
    for name, info in METHODS.items():
        out[name] = bench.select(name, tasks, info.grid(plan), info.bracket, bracket_each=info.bracket_each)
        done()
    out["logit_ensemble"] = bench.ensemble_selection(tasks)
    done()
    return out


def _cart_sweep(bench: MergeBench, tasks: list[str], plan: Plan) -> list[dict[str, Any]]:
    """Rows (rank ratio, λ, val and test mean normalised accuracy); ratios 0 and 1 are weight averaging.

    Each rank's λ axis is extended beyond the grid until its best λ is inside (``MergeBench.select``): CART's
    best λ grows with the rank, so a λ grid that brackets the best rank leaves higher ranks' optima outside
    it and the bell's right side would be lower bounds (vision, 2026-12-01: rank 12 % rose from 54.2 at λ 3
    to ~60 at λ 5–6)."""
    wa_val = bench.mean_normalised(bench.score("weight_averaging", tasks, {}, "val"), "val")
    wa_test = bench.mean_normalised(bench.score("weight_averaging", tasks, {}, "test"), "test")
    rows = []
    for lam in plan.cart_lambdas:
        for ratio in (0.0, 1.0):
            rows.append({"rank_ratio": ratio, "lambda": lam, "val_norm_acc": wa_val, "test_norm_acc": wa_test})
    bracket = {"lambda": METHODS["cart"].bracket["lambda"]}
    for r in plan.cart_ranks:
        row = bench.select("cart", tasks, [{"rank_ratio": r, "lambda": lam} for lam in plan.cart_lambdas], bracket)
        rows += [{"rank_ratio": r, "lambda": params["lambda"], "val_norm_acc": val} for params, val in row.trace]
    rows.sort(key=lambda row: (row["lambda"], row["rank_ratio"]))
    by_rank: dict[float, dict[str, Any]] = {}
    for row in rows:
        best = by_rank.get(row["rank_ratio"])
        if best is None or row["val_norm_acc"] > best["val_norm_acc"]:
            by_rank[row["rank_ratio"]] = row
    for row in rows:
        if "test_norm_acc" not in row and (plan.sweep_test_all or by_rank[row["rank_ratio"]] is row):
            p = {"rank_ratio": row["rank_ratio"], "lambda": row["lambda"]}
            row["test_norm_acc"] = bench.mean_normalised(bench.score("cart", tasks, p, "test"), "test")
        row["best_lambda_for_rank"] = by_rank[row["rank_ratio"]] is row
    return rows


def _subsets(tasks: list[str], t: int, n: int, seed: int) -> list[tuple[str, ...]]:
    combos = list(combinations(tasks, t))
    if t == len(tasks):
        return combos
    rng = random.Random(seed * 7919 + t)  # recorded: the subsets are listed in the scaling table
    return sorted(rng.sample(combos, min(n, len(combos))))


def _scaling(bench: MergeBench, plan: Plan, seed: int, full: dict[str, Selection]) -> list[dict[str, Any]]:
    tasks = bench.tasks
    ts = plan.scaling_ts or tuple(sorted({*range(2, len(tasks) + 1, 2), len(tasks)}))
    small = plan.scaling_plan()
    rows = []
    for t in ts:
        if t < 2 or t > len(tasks):
            continue
        for subset in _subsets(tasks, t, plan.scaling_subsets, seed):
            sub = list(subset)
            for name, info in [*METHODS.items(), ("logit_ensemble", None)]:
                if name == "pretrained":
                    continue
                if t == len(tasks):
                    sel = full[name]
                elif info is None:
                    sel = bench.ensemble_selection(sub)
                else:
                    sel = bench.select(name, sub, info.grid(small), info.bracket,
                                       bracket_each=info.bracket_each)
                rows.append({"T": t, "tasks": "+".join(sub), "method": name,
                             "test_norm_acc": bench.mean_normalised(sel.test, "test"),
                             "params": _fmt_params(sel.params)})
    return rows


# ---- output --------------------------------------------------------------------------------------------
def _fmt_params(p: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(p.items())) or "—"


def _label(name: str) -> str:
    return METHODS[name].label if name in METHODS else {"logit_ensemble": "logit ensemble (reference)",
                                                         "individual": "individual fine-tuned"}.get(name, name)


def _seed_mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _per_example(run: SeedRun, name: str, split: str = "test") -> dict[str, torch.Tensor]:
    tasks = run.bench.tasks
    if name == "logit_ensemble":
        return run.bench.ensemble_correct(tasks, split)
    if name == "individual":
        return {t: correct(run.bench.member_logits(t, t, split), run.bench.suite.data(t, split).y) for t in tasks}
    return run.bench.per_example(name, tasks, run.selections[name].params, split)


def _stacked(runs: Sequence[SeedRun], name: str) -> dict[str, torch.Tensor]:
    """Per task, which test examples the method got right, one row per seed."""
    per_seed = [_per_example(r, name) for r in runs]
    return {t: torch.stack([p[t] for p in per_seed]).float() for t in runs[0].bench.tasks}


def _scales(runs: Sequence[SeedRun]) -> dict[str, list[float]]:
    per_seed = [r.bench.normalised_scale("test") for r in runs]
    return {t: [s[t] for s in per_seed] for t in runs[0].bench.tasks}


def _difference(runs: Sequence[SeedRun], a: str, b: str, seed: int) -> Difference:
    """Mean normalised test accuracy of ``a`` minus ``b``: paired bootstrap over examples and seeds."""
    return tasks_difference(_stacked(runs, a), _stacked(runs, b), scale=_scales(runs), seed=seed)


def _interval(runs: Sequence[SeedRun], name: str, seed: int) -> Difference:
    """Mean normalised test accuracy of ``name`` with its CI (a difference against always wrong)."""
    right = _stacked(runs, name)
    return tasks_difference(right, {t: torch.zeros_like(v) for t, v in right.items()}, scale=_scales(runs),
                            seed=seed)


def _chosen(runs: Sequence[SeedRun], name: str) -> str:
    picks = [_fmt_params(r.selections[name].params) for r in runs]
    return picks[0] if len(set(picks)) == 1 else " / ".join(picks)


#: CLIP ViT-B/32 on the eight tasks, normalised accuracy (%), as the SVD-family papers report it (CART
#: arXiv:2412.12153 Tab. 1; TSV-M, CVPR 2025; Iso-C / Iso-CTS, ICML 2025)
PAPER_NORMALISED = {"task_arithmetic": "≈ 76", "ties": "≈ 80", "cart": "93.6", "tsv": "92.3", "iso_c": "92.9",
                    "iso_cts": "92.8"}


def _main_tables(runs: Sequence[SeedRun], seed: int) -> tuple[Table, Table, Table, dict[str, Difference]]:
    tasks = runs[0].bench.tasks
    names = ["individual", *runs[0].selections]
    rows, per_task, per_task_norm, intervals = [], [], [], {}
    for name in names:
        if name == "individual":
            val = [r.bench.individual("val") for r in runs]
            test = [r.bench.individual("test") for r in runs]
        else:
            val = [r.selections[name].val for r in runs]
            test = [r.selections[name].test for r in runs]
        norm_test = [r.bench.normalised(a, "test") for r, a in zip(runs, test, strict=True)]
        ci = intervals[name] = _interval(runs, name, seed)
        rows.append({"method": _label(name), "key": name,
                     "chosen on val": "—" if name in ("individual", "logit_ensemble") else _chosen(runs, name),
                     "test acc (%)": _seed_mean([sum(a.values()) / len(a) for a in test]),
                     "test norm. acc (%)": ci.mean, "95 % CI": f"[{ci.low:.1f}, {ci.high:.1f}]",
                     "val norm. acc (%)": _seed_mean([r.bench.mean_normalised(v, "val")
                                                      for r, v in zip(runs, val, strict=True)]),
                     "paper (CLIP ViT-B/32, norm.)": PAPER_NORMALISED.get(name, "")})
        per_task.append({"method": _label(name), **{t: _seed_mean([a[t] for a in test]) for t in tasks}})
        per_task_norm.append({"method": _label(name), **{t: _seed_mean([a[t] for a in norm_test]) for t in tasks}})
    seeds = f"mean over {len(runs)} seeds; " if len(runs) > 1 else ""
    main = Table("Mean accuracy over tasks (test); normalised = merged / fine-tuned accuracy per task", rows,
                 columns=["method", "chosen on val", "test acc (%)", "test norm. acc (%)", "95 % CI",
                          "val norm. acc (%)", "paper (CLIP ViT-B/32, norm.)"],
                 note=f"{seeds}hyper-parameters chosen per seed by mean normalised validation accuracy; CI: paired "
                      "bootstrap over test examples and seeds; the paper column is for orientation only (another "
                      "model, other tasks)")
    breakdown = Table(f"Per-task test accuracy (%{', mean over seeds' if seeds else ''})", per_task)
    breakdown_norm = Table("Per-task normalised test accuracy (% of fine-tuned)", per_task_norm)
    return main, breakdown, breakdown_norm, intervals


@dataclass(frozen=True)
class RegimeCheck:
    """One condition of the papers' regime, measured on this run; ``gates`` checks decide whether verdicts count."""

    check: str
    value: str
    reference: str
    passed: bool | None  # None: shown for information, not a pass/fail condition
    gates: bool = True


def regime_checks(runs: Sequence[SeedRun], seed: int, ta: Difference, *, max_ta: float = 92.0) -> list[RegimeCheck]:
    """The conditions under which the papers' comparison can show itself, from this run's numbers; ``ta`` is
    task arithmetic's mean normalised test accuracy with its CI (the method table's)."""
    wa_gain = _difference(runs, "weight_averaging", "pretrained", seed)
    lambdas = [r.selections["task_arithmetic"].params.get("lambda") for r in runs]
    tried = [sorted({p["lambda"] for p, _ in r.selections["task_arithmetic"].trace}) for r in runs]
    interior = [bool(r.selections["task_arithmetic"].interior.get("lambda")) for r in runs]
    norms = [n for r in runs for n in r.geometry.relative_norms]
    shared = _seed_mean([r.geometry.shared_fraction for r in runs])
    cosine = _seed_mean([r.geometry.mean_cosine for r in runs])
    t = runs[0].geometry.tasks
    return [
        RegimeCheck("weight averaging clearly above the pretrained encoder",
                    f"{wa_gain.text()} points of normalised accuracy",
                    "CI above 0 (CLIP ViT-B/32, 8 tasks, absolute: averaging ≈ 66 %, zero-shot ≈ 48 %)",
                    wa_gain.low > 0),
        RegimeCheck("task arithmetic's best λ strictly inside its grid",
                    "; ".join(f"λ = {lam:g} of {min(v):g}…{max(v):g}"
                              for lam, v in zip(lambdas, tried, strict=True)),
                    "chosen value not an end of the values tried, every seed", all(interior)),
        RegimeCheck("task arithmetic leaves room to improve",
                    f"{ta.mean:.1f} % normalised [{ta.low:.1f}, {ta.high:.1f}]",
                    f"below {max_ta:g} % (CLIP ViT-B/32: ≈ 76 %)", ta.mean < max_ta),
        RegimeCheck("‖τ_t‖ / ‖θ_0‖ per task", f"{min(norms):.4f} … {max(norms):.4f}",
                    "small: fine-tuning stays near the pretrained weights", None, gates=False),
        RegimeCheck("shared-component fraction ‖mean τ‖² / mean ‖τ_t‖²",
                    f"{shared:.3f} (mean pairwise cosine {cosine:+.3f})",
                    f"1/T = {1 / t:.3f} for orthogonal task vectors, 1 for identical ones", None, gates=False),
    ]


def _regime_table(checks: Sequence[RegimeCheck]) -> Table:
    rows = [{"check": c.check, "value": c.value, "reference": c.reference,
             "result": {True: "passed", False: "FAILED", None: "information"}[c.passed]} for c in checks]
    return Table("Regime checks (a failed check puts the method comparison outside the papers' regime)", rows)


def _outside(checks: Sequence[RegimeCheck]) -> str:
    """Empty when every gating check passed, else the failed checks."""
    return "; ".join(c.check for c in checks if c.gates and c.passed is False)


def _average_sweep(runs: Sequence[SeedRun]) -> list[dict[str, Any]]:
    """CART's sweep rows averaged over seeds; the best λ per rank re-chosen on the mean validation accuracy,
    among the λ every seed evaluated (each seed extends a rank's λ axis as far as its own optimum needs)."""
    keyed: dict[tuple[float, float], list[dict[str, Any]]] = {}
    for run in runs:
        for row in run.sweep:
            keyed.setdefault((row["rank_ratio"], row["lambda"]), []).append(row)
    rows = []
    for (ratio, lam), group in sorted(keyed.items(), key=lambda item: (item[0][1], item[0][0])):
        tests = [r["test_norm_acc"] for r in group if "test_norm_acc" in r]
        rows.append({"rank_ratio": ratio, "lambda": lam, "val_norm_acc": _seed_mean([r["val_norm_acc"] for r in group]),
                     "test_norm_acc": _seed_mean(tests) if tests else float("nan"), "seeds": len(group)})
    best: dict[float, dict[str, Any]] = {}
    for row in rows:
        if row["seeds"] == len(runs) and (row["rank_ratio"] not in best
                                          or row["val_norm_acc"] > best[row["rank_ratio"]]["val_norm_acc"]):
            best[row["rank_ratio"]] = row
    for row in rows:
        row["best_lambda_for_rank"] = best.get(row["rank_ratio"]) is row
    return rows


def _average_curve(runs: Sequence[SeedRun]) -> list[CurvePoint]:
    points = []
    for i, first in enumerate(runs[0].curve):
        group = [r.curve[i] for r in runs]
        values = {f.name: _seed_mean([getattr(p, f.name) for p in group]) for f in dataclasses.fields(CurvePoint)
                  if f.name not in ("centred", "ratio", "matrices")}
        points.append(CurvePoint(first.centred, first.ratio, matrices=first.matrices, **values))
    return points


def _result(out: Path, runs: Sequence[SeedRun], plan: Plan, timings: dict[str, float]) -> StudyResult:
    first = runs[0]
    suite, seed, bench = first.bench.suite, plan.seed, first.bench
    figures = out
    tasks = bench.tasks
    seeds_text = f" (mean over {len(runs)} seeds)" if len(runs) > 1 else ""
    norms = [r.geometry.relative_norms for r in runs]
    setup_rows = [{"task": t, "classes": suite.task(t).num_classes, "train": len(suite.data(t, "train")),
                   "val": len(suite.data(t, "val")), "test": len(suite.data(t, "test")),
                   "pretrained test acc (%)": _seed_mean([r.selections["pretrained"].test[t] for r in runs]),
                   "fine-tuned test acc (%)": _seed_mean([r.bench.individual("test")[t] for r in runs]),
                   "‖τ‖/‖θ0‖": _seed_mean([n[i] for n in norms]),
                   "seeds": ", ".join(str(r.bench.suite.finetuned()[t].seed) for r in runs),
                   "description": suite.task(t).description} for i, t in enumerate(tasks)]
    setup = Table(f"Tasks{seeds_text}", setup_rows, floatfmt="{:.4g}")
    main, breakdown, breakdown_norm, intervals = _main_tables(runs, seed)
    checks = regime_checks(runs, seed, intervals["task_arithmetic"])
    regime = _regime_table(checks)
    outside = _outside(checks)

    test_norm = {n: intervals[n].mean for n in first.selections}
    fig_main = plots.method_bars(test_norm, {n: _label(n) for n in test_norm}, figures / "methods.png",
                                 title=f"{suite.name} suite, T = {len(tasks)} tasks: merged encoders, per-task heads")

    sweep = _average_sweep(runs)
    sweep_table = Table(f"CART rank × λ sweep (mean normalised accuracy, %{seeds_text})", sweep,
                        columns=["rank_ratio", "lambda", "val_norm_acc", "test_norm_acc", "best_lambda_for_rank",
                                 "seeds"],
                        note="rank ratio 0 and 1 are weight averaging for every λ; each rank's λ axis is extended "
                             "until its best λ is inside (seeds: how many seeds' extensions reached that λ; the "
                             "best λ per rank is chosen among those every seed evaluated)")
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for lam in plan.cart_lambdas:
        pts = sorted((r["rank_ratio"], r) for r in sweep if r["lambda"] == lam)
        curves[f"λ={lam:g} (val)"] = ([p[0] for p in pts], [p[1]["val_norm_acc"] for p in pts])
        if plan.sweep_test_all:
            curves[f"λ={lam:g} (test)"] = ([p[0] for p in pts], [p[1]["test_norm_acc"] for p in pts])
    best_rows = sorted((r for r in sweep if r["best_lambda_for_rank"]), key=lambda r: r["rank_ratio"])
    curves["best λ per rank (test)"] = ([r["rank_ratio"] for r in best_rows], [r["test_norm_acc"] for r in best_rows])
    baselines = {"task_arithmetic (test)": test_norm["task_arithmetic"],
                 "weight_averaging (test)": test_norm["weight_averaging"]}
    fig_sweep = plots.rank_sweep(curves, baselines, figures / "cart_rank_sweep.png",
                                 title=f"CART on the {suite.name} suite: accuracy vs rank",
                                 ylabel="normalised accuracy (% of fine-tuned)")
    interior = [r for r in best_rows if 0 < r["rank_ratio"] < 1]
    peak = max(interior, key=lambda r: r["val_norm_acc"]) if interior else None
    if peak is not None:  # rank ratio 0 is weight averaging: the bell must rise above it
        peak = {**peak, "wa_val": best_rows[0]["val_norm_acc"]}

    curve = _average_curve(runs)
    curve_rows = [dataclasses.asdict(p) for p in curve]
    curve_table = Table(f"Row-space interference I(k) and reconstruction error R(k){seeds_text}", curve_rows,
                        floatfmt="{:.4f}")
    ratios = sorted({p.ratio for p in curve})
    kinds = (("uncentred θ_t − θ_0", False), ("centred θ_t − θ_avg", True))
    series = {
        "interference": {lab: [p.mean_interference_norm for p in curve if p.centred == c] for lab, c in kinds},
        "interference_full": {lab: [p.mean_interference_full_norm for p in curve if p.centred == c]
                              for lab, c in kinds},
        "reconstruction": {lab: [p.mean_relative_error for p in curve if p.centred == c] for lab, c in kinds},
    }
    fig_int = plots.interference_panels(ratios, series, figures / "interference.png",
                                        title=f"{suite.name} suite: centred vs uncentred task matrices")

    scaling_rows = [{"seed": r.bench.suite.seed, **row} for r in runs for row in r.scaling]
    ts = sorted({r["T"] for r in scaling_rows})
    scaling_table = Table("Accuracy vs number of merged tasks T (per seed and subset)", scaling_rows)
    summary: dict[str, list[float]] = {}
    summary_rows = []
    for name in [n for n in (*METHODS, "logit_ensemble") if n != "pretrained"]:
        ys = [_seed_mean([r["test_norm_acc"] for r in scaling_rows if r["T"] == t and r["method"] == name])
              for t in ts]
        summary[name] = ys
        summary_rows.append({"method": _label(name), **{f"T={t}": y for t, y in zip(ts, ys)}})
    over = "subsets and seeds" if seeds_text else "subsets"
    scaling_summary = Table(f"Mean normalised test accuracy vs T (mean over {over})", summary_rows)
    fig_scaling = plots.scaling(ts, summary, {n: _label(n) for n in summary}, figures / "scaling.png",
                                title=f"{suite.name} suite: merging more tasks")

    diffs = {(a, b): _difference(runs, a, b, seed) for a, b in _COMPARED}
    verdicts = _verdicts(test_norm, peak, curve, diffs, outside=outside)
    n_method = len(_COMPARED)
    report = Report(f"Task-vector merging on the {suite.name} suite (CART, TSV-M, Iso-C/Iso-CTS)",
                    intro=("Encoders fine-tuned per task from one pretrained encoder are merged; each task keeps "
                           f"its own linear head, frozen during fine-tuning ({suite.heads_text()}). "
                           "Normalised accuracy = merged accuracy / the task's fine-tuned accuracy."
                           + (f" {len(runs)} fine-tuning seeds share the pretrained encoder and the data splits."
                              if len(runs) > 1 else "")),
                    meta={"suite": suite.name, "seed": seed, "seeds": [r.bench.suite.seed for r in runs]})
    regime_text = ("Every gating check passed: the method comparison below is in the papers' regime." if not outside
                   else f"Outside the papers' regime ({outside}): the method comparisons below are reported without "
                        "a verdict.")
    report.add(
        Section("Setup", text=[_setup_text(suite, plan, [r.bench.suite.seed for r in runs])], tables=[setup]),
        Section("Regime checks", text=[regime_text], tables=[regime]),
        Section("Merging methods side by side", text=[_METHODS_TEXT], verdicts=verdicts[:n_method],
                tables=[main, breakdown, breakdown_norm],
                figures=[FigureRef(fig_main, "mean normalised test accuracy per method",
                                          "one bar per method, length = test accuracy averaged over tasks as a "
                                          "percentage of each task's fine-tuned model (100 % = as good as the "
                                          "specialists). The logit ensemble is a reference, not a merge.")]),
        Section("CART: rank × λ", verdicts=verdicts[n_method:n_method + 1], tables=[sweep_table],
                figures=[FigureRef(fig_sweep, how_to_read=(
                    "x = rank kept, as a fraction of full rank (0 and 1 are weight averaging), y = normalised accuracy "
                    "(%), one line per λ; horizontal lines: task arithmetic and weight averaging. The paper's claim is "
                    "a bell that peaks at 8–12 % of full rank, above both lines."), caption="CART normalised "
                                          "accuracy vs rank ratio, one line per λ; "
                                              "horizontal lines: task arithmetic and weight averaging (test)")]),
        Section("Interference I(k) and reconstruction error R(k)", text=[_INTERFERENCE_TEXT],
                verdicts=verdicts[n_method + 1:], tables=[curve_table],
                figures=[FigureRef(fig_int, how_to_read=(
                    "x = rank ratio k / min(m, n); left and middle: interference I(k) (lower = task subspaces overlap "
                    "less), right: reconstruction error R(k)/R(0) (lower = rank k keeps more of the task vectors). "
                    "The centred lines (red) should lie below the uncentred ones (orange) at every rank."),
                    caption="I(k)/(T(T−1)) with top-k and with "
                                          "whole-spectrum normalised singular "
                                            "values, and R(k)/R(0); means over the 2-D encoder weights")]),
        Section("Scaling with the number of tasks", text=[_SCALING_TEXT], tables=[scaling_summary, scaling_table],
                figures=[FigureRef(fig_scaling, "mean normalised test accuracy vs T (mean over task subsets)",
                                             "x = number of tasks merged T, y = normalised test accuracy (%), mean "
                                             "over the task subsets, one line per method. Lines that fall less as T "
                                             "grows suffer less from interference between tasks.")]),
    )
    tables = {"tasks": setup, "regime": regime, "methods": main, "per_task_accuracy": breakdown,
              "per_task_normalised": breakdown_norm, "cart_sweep": sweep_table, "interference": curve_table,
              "scaling": scaling_table, "scaling_summary": scaling_summary}
    return StudyResult(report, tables, extra={
        "suite": suite.record(), "seeds": {str(r.bench.suite.seed): r.bench.suite.record() for r in runs[1:]},
        "selected": {n: {"params": s.params, "val_trace": s.trace, "interior": s.interior}
                     for n, s in first.selections.items()},
        "selected_per_seed": {str(r.bench.suite.seed): {n: s.params for n, s in r.selections.items()} for r in runs},
        "regime": [dataclasses.asdict(c) for c in checks], "in_regime": not outside,
        "cart_peak": peak, "dare_seed": seed, "timings_seconds": timings})


_INTERFERENCE_TEXT = (
    "For each 2-D encoder weight and T tasks: Δ_t = θ_t − θ_0 (uncentred) or Δ̄_t = θ_t − θ_avg (centred). "
    "I(k) = Σ_{i≠j} ‖Σ̃_i V_iᵀ V_j Σ̃_j‖_F with V_t the top-k right singular vectors and Σ̃_t the top-k "
    "singular values normalised to unit ℓ2 norm over the top k (or, second panel, over the whole spectrum, "
    "which makes I(k) non-decreasing in k); each term is in [0, 1], shown divided by T(T−1); "
    "R(k) = Σ_t ‖Δ_t − SVD_k(Δ_t)‖_F², shown relative to R(0) = Σ_t ‖Δ_t‖_F². k = round(ratio · min(m, n)).")


_METHODS_TEXT = (
    "Every method merges the encoders only; each task is read with its own head. The logit ensemble runs all T "
    "fine-tuned encoders and averages, for task t, the logits of head t on each encoder's features: the output-space "
    "counterpart of weight averaging. Encoders fine-tuned for other tasks drift away from the feature space head t "
    "was fitted on, so in this per-task-head setting the ensemble is a reference, not an upper bound.")

_SCALING_TEXT = (
    "For each T below the number of tasks, random task subsets (seeded, listed in the per-subset table) are merged "
    "and every method's hyper-parameters are chosen again on validation (smaller CART grid). With T = 2 the centred "
    "task vectors are ±(θ_1 − θ_2)/2, so CART equals weight averaging at every rank and λ.")


def _setup_text(suite: TaskSuite, plan: Plan, seeds: Sequence[int]) -> str:
    r = suite.recipe
    return (f"Suite '{suite.name}' with {len(suite.tasks)} tasks; fine-tuning: {r.steps} AdamW steps, batch "
            f"{r.batch_size}, lr {r.lr:g}, warm-up {r.warmup:g} then cosine; heads: {suite.heads_text()} "
            f"({r.probe_steps} full-batch Adam steps), frozen while fine-tuning. TIES density "
            f"{plan.ties_density:g}, DARE-TIES keep probability {plan.dare_density:g} (seeded, disjoint mean), "
            f"RegMean α {plan.regmean_alpha:g}, Fisher on {plan.fisher_examples} examples per task. "
            f"Suite seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}.")


OUTSIDE = "outside the papers' regime"
_RECORD = ("CART (Choi et al., arXiv:2412.12153), CLIP ViT-B/32 on 8 tasks, normalised accuracy: CART 93.6 %, task "
           "arithmetic about 76 %, TIES about 80 %")
_PEAK = ("CART: accuracy vs rank is bell-shaped with its peak at 8–12 % of full rank, above weight averaging at "
         "both ends")
_CENTRING = "CART Sec. 3: centred task matrices (θ_t − θ_avg) interfere less in their top-k row spaces than θ_t − θ_0"


#: (A, B) pairs of "A beats B" verdicts, each with the paper's claim
_COMPARED = (("cart", "task_arithmetic"), ("cart", "weight_averaging"), ("tsv", "task_arithmetic"),
             ("iso_c", "task_arithmetic"), ("iso_cts", "task_arithmetic"))
_PAPERS = {
    "cart": _RECORD,
    "tsv": "TSV-M (Gargiulo et al., CVPR 2025), CLIP ViT-B/32, 8 tasks: 92.3 % normalised vs task arithmetic ≈ 76 %",
    "iso_c": "Iso-C (Marczak et al., ICML 2025), CLIP ViT-B/32, 8 tasks: 92.9 % normalised vs task arithmetic ≈ 76 %",
    "iso_cts": "Iso-CTS (Marczak et al., ICML 2025), CLIP ViT-B/32, 8 tasks: 92.8 % normalised vs task arithmetic "
               "≈ 76 %",
}


def _verdicts(test_norm: dict[str, float], peak: dict[str, Any] | None, curve: list[Any],
              diffs: dict[tuple[str, str], Difference], *, outside: str = "") -> list[Verdict]:
    out = []
    for (a, b), diff in diffs.items():
        claim = f"{_label(a)} beats {_label(b)}"
        context = (f"{_label(a)} {test_norm[a]:.1f} % vs {_label(b)} {test_norm[b]:.1f} % (mean normalised test "
                   "accuracy, parameters chosen on validation)")
        verdict = difference_verdict(claim, diff, paper=_PAPERS[a], unit="points of normalised accuracy",
                                     context=context)
        if outside:
            verdict = Verdict(claim, None, f"outside the papers' regime ({outside}); {verdict.detail}",
                              paper=verdict.paper, undecided=OUTSIDE)
        out.append(verdict)
    if peak is None:
        out.append(Verdict("accuracy vs rank is bell-shaped, peaking at a low rank", None, "no interior rank swept",
                           paper=_PEAK))
    elif outside:
        out.append(Verdict("accuracy vs rank is bell-shaped, peaking at a low rank", None,
                           f"outside the papers' regime ({outside})", paper=_PEAK, undecided=OUTSIDE))
    else:
        # a peak less than one point above the weight-averaging ends is within split noise here: "mixed"
        gain = peak["val_norm_acc"] - peak["wa_val"]
        # the paper's peak is 8–12 %; the nearest grid points (4 %, 16 %) still count, 25 % or more does not
        low_rank = 0.04 <= peak["rank_ratio"] <= 0.16
        held = None if 0 < gain < 1.0 and low_rank else (low_rank and gain >= 1.0)
        out.append(Verdict(
            "accuracy vs rank is bell-shaped, peaking at a low rank", held,
            f"validation peak at rank ratio {100 * peak['rank_ratio']:g} % (λ={peak['lambda']:g}): "
            f"{peak['val_norm_acc']:.1f} % val ({gain:+.1f} points over weight averaging), "
            f"{peak.get('test_norm_acc', float('nan')):.1f} % test; ratio 0 % and 100 % are weight averaging",
            paper=_PEAK))
    ratios = sorted({p.ratio for p in curve if p.ratio > 0})
    counts = []
    for attr in ("mean_interference", "mean_interference_full_norm"):
        pairs = {(p.ratio, p.centred): getattr(p, attr) for p in curve}
        counts.append(sum(pairs[(r, True)] < pairs[(r, False)] for r in ratios))
    lower = counts[0]
    held = True if lower == len(ratios) else (False if lower == 0 else None)
    out.append(Verdict("centring lowers row-space interference I(k) at every rank", held, paper=_CENTRING, detail=
                       f"centred below uncentred at {lower}/{len(ratios)} rank ratios (top-k normalised σ̃), "
                       f"{counts[1]}/{len(ratios)} with whole-spectrum normalisation"))
    return out
