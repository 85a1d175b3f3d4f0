"""Study: magnitude robustness at the paper's depth, and the float32 overflow hypothesis (issue 14).

The paper (Rethinking Weight-Averaged Model-merging, Fig. 4, 7b-c, Tab. 10) multiplies every model's
state-dict entries by c and finds soups more robust than logit ensembles at large c on VGG-19: the soup −
ensemble gap flips sign near ×90 and peaks near ×100–110, and feature ensembles degrade less than logit
ensembles. A hypothesis that would explain it (:mod:`mergelab.analysis.overflow`): logits of an L-layer ReLU
net grow like c^L and leave float32 near c ≈ 107 for L = 19; the mean of N members' logits is computed as a
sum, N times larger, so it overflows first, while a soup (one network, weights no larger than its members')
does not.

This study trains zoos of depth ≥ 19 (plain VGG-19, VGG-19 with BN, ResNet-20) with several seeds, scales
them on a dense grid of c, and for every method (members, uniform soups, logit and feature ensembles)
counts the test examples whose logits are not finite, with accuracy, in float32 and again in float64
(no overflow below c^L ≈ 1e308). What survives float64 is the part of the robustness gap that is not an
overflow artefact. BatchNorm nets run in three settings: parameters ×c with the running statistics kept
(the shallow study's choice), every state-dict entry ×c (running statistics too, literally, as the paper
does) evaluated with running statistics, and the same evaluated with batch statistics (as the paper's code
does; running statistics are then unused).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergelab.analysis.overflow import (
    F32_MAX,
    crossing_c,
    first_nonfinite_c,
    growth_degree,
    max_finite_abs,
    nonfinite_rows,
    predicted_degree,
    predicted_overflow_c,
)
from mergelab.analysis.weight_stats import scale_state_dict
from mergelab.ensemble import EvalMode, ensemble_logits, feature_ensemble_logits, merged_head, model_outputs
from mergelab.executor import get_executor
from mergelab.report import FigureRef, Report, Section, Table, Verdict
from mergelab.report.plots import line_panels
from mergelab.soups import uniform_soup
from mergelab.studies.claims import ClaimRow, claims_table
from mergelab.studies.common import StudyResult, explain, study_runner, zoo_spec
from mergelab.studies.verdict import NO_DIFFERENCE, Difference, check, claim_verdict, paired_difference
from mergelab.zoo.data import load_dataset
from mergelab.zoo.models import ARCHS, ZooModel, bn_layers, fold_batchnorm, weight_layers
from mergelab.zoo.train import ZooSpec, train_zoos

METHODS = {"perf_ave": "Perf Ave", "uniform_soup": "Uniform soup", "logit_ensemble": "Logit ens.",
           "feature_ensemble": "Feature ens."}
#: the scales of the paper's Fig. 7b/7c and Tab. 10
PAPER_CS = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110)
OUTSIDE = "outside the regime"


@dataclass(frozen=True)
class Setting:
    """What is scaled (``params``: float parameters, BN running statistics kept; ``state_dict``: every float
    entry, running statistics included) and how BatchNorm normalises (``running``/``batch`` statistics;
    ``none`` for nets without BN)."""

    scaling: str
    bn_eval: str

    @property
    def key(self) -> str:
        return f"{self.scaling}/{self.bn_eval}"

    @property
    def label(self) -> str:
        if self.bn_eval == "none":
            return "all parameters ×c"
        what = "every entry ×c" if self.scaling == "state_dict" else "params ×c, BN stats kept"
        return f"{what}, {self.bn_eval} BN stats"

    @property
    def mode(self) -> EvalMode:
        return "train" if self.bn_eval == "batch" else "eval"


@dataclass(frozen=True)
class Config:
    datasets: tuple[str, ...] = ("mnist5k",)
    # "NAME-folded": the NAME zoo with every norm layer folded into its conv (a plain net computing the same
    # function). A plain VGG-19 does not train in this budget (33 % after 4 epochs, measured), so the plain
    # 19-layer zoos are folded: vgg19nb (no biases, ScaleNorm) folds to a homogeneous net, whose predictions
    # no c changes in exact arithmetic (the overflow hypothesis' regime); vgg19bn folds to a net with biases
    # (BN's centring), which vanish relative to c^L as c grows. Plain "vgg19" runs as well.
    archs: tuple[str, ...] = ("vgg19nb-folded", "vgg19bn-folded", "vgg19bn", "resnet20")
    n_seeds: int = 3  # zoos with seeds seed, seed + 1, …
    n_models: int = 5
    ns: tuple[int, ...] = (5,)  # soups and ensembles of the first N members
    # the paper's points 1…110 thinned below 50 (BN settings with running statistics overflow below c = 30, the
    # others not before 50), step 5 around the predicted float32 overflow of L = 19 (c ≈ 90–110)
    cs: tuple[float, ...] = (1.0, 10.0, 30.0, 50.0, 70.0, 80.0, 90.0, 95.0, 100.0, 105.0, 110.0, 115.0, 120.0, 130.0,
                             150.0)
    dtypes: tuple[str, ...] = ("float32", "float64")
    scalings: tuple[str, ...] = ("params", "state_dict")  # BN nets only; nets without BN are scaled once
    bn_evals: tuple[str, ...] = ("running", "batch")
    skip_settings: tuple[str, ...] = ()  # "ARCH:SCALING/BN_EVAL" (e.g. "resnet20:params/running") to leave out
    # stratified test subset: float64 convolutions are 4–8× slower than float32 on these CPUs (measured: VGG-19
    # width 8, 1,000 examples, one thread: 0.67 s vs 2.8 s; ResNet-20 0.9 s vs 7.3 s); with the grid above the
    # full run is about 40 CPU-minutes
    n_test: int | None = 200
    batch_size: int = 250  # evaluation batch (the batch of batch-statistics BatchNorm)
    claim_low: float = 90.0  # the paper's flip/peak region: claims compare methods at claim_low ≤ c ≤ claim_high
    claim_high: float = 110.0
    min_member_acc: float = 90.0  # regime: members at c = 1 must be this accurate (a broken zoo is no evidence)
    min_depth: int = 19  # regime: weight layers in series, the paper's VGG-19
    init: str = "shared"
    epochs: int = 2
    pretrain_epochs: int = 3
    # per-architecture pre-training epochs ("ARCH=EPOCHS"): VGG-19-BN's shared bases reached 71/92/71 % after 3
    # epochs (seeds 0/1/2; ResNet-20 93–96 %), so the deep VGG pre-trains longer
    pretrain_overrides: tuple[str, ...] = ("vgg19bn=8", "vgg19nb=8")
    n_train: int | None = 2000
    width: int = 8
    split_seed: int = 0
    seed: int = 0
    workers: int | None = None  # evaluation and training processes (default: one per core)
    executor: str | None = None  # local, local:N, ray, ray:ADDRESS


#: the same zoos as the full run (member i depends only on the recipe and i), fewer of everything
QUICK = Config(n_seeds=1, n_models=3, ns=(3,), cs=(1.0, 50.0, 90.0, 100.0, 105.0, 110.0, 120.0, 150.0), n_test=200)


FOLDED = "-folded"
#: the paper's protocol: every state-dict entry ×c; BatchNorm with batch statistics (nets without BN: all ×c)
PAPER_SETTINGS = ("state_dict/none", "state_dict/batch")


def base_arch(arch: str) -> str:
    """The trained architecture behind a study arch name (``vgg19bn-folded`` → ``vgg19bn``)."""
    return arch.removesuffix(FOLDED)


def settings_for(arch: str, cfg: Config) -> list[Setting]:
    """The scaling × BN-evaluation settings that differ for ``arch``. With batch statistics the running
    statistics are unused, so only the paper's scaling (``state_dict``) is run there (tested identity)."""
    if base_arch(arch) not in ARCHS:
        raise ValueError(f"unknown architecture '{arch}'; choose from {sorted(ARCHS)} (or NAME{FOLDED} for a "
                         "VGG with BatchNorm folded into its convs)")
    if arch.endswith(FOLDED) or not ARCHS[arch].batchnorm:
        return [Setting("state_dict", "none")]
    out = [Setting(s, "running") for s in cfg.scalings if "running" in cfg.bn_evals]
    if "batch" in cfg.bn_evals:
        out.append(Setting("state_dict" if "state_dict" in cfg.scalings else cfg.scalings[0], "batch"))
    return [s for s in out if f"{arch}:{s.key}" not in cfg.skip_settings]


def scaled(sd: Mapping[str, torch.Tensor], c: float, setting: Setting, dtype: torch.dtype
           ) -> dict[str, torch.Tensor]:
    """``sd`` cast to ``dtype`` (float entries), then scaled by ``c`` as ``setting`` says."""
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return scale_state_dict(cast, c, which="all", include_bn_stats=setting.scaling == "state_dict")


@dataclass
class Cell:
    """One (c, dtype) evaluation of one zoo in one setting."""

    rows: list[dict[str, Any]]
    correct: dict[tuple[str, int], torch.Tensor]  # (method, N) → per-example 0/1
    logits: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)


def evaluate_cell(template: ZooModel, sds: Sequence[Mapping[str, torch.Tensor]], x: torch.Tensor, y: torch.Tensor,
                  *, c: float, setting: Setting, dtype: torch.dtype, ns: Sequence[int], batch_size: int,
                  keep_logits: bool = False) -> Cell:
    """Members, uniform soups, logit and feature ensembles of the first N members at scale ``c``.

    Rows carry accuracy (%), the % of examples with a non-finite logit, and the largest finite |logit|
    (for the logit ensemble also of the sum of the N members' logits, the quantity that overflows first).
    """
    net = copy.deepcopy(template).to(dtype)
    members = [scaled(sd, c, setting, dtype) for sd in sds]
    xs = x.to(dtype)

    def run(sd: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
        net.load_state_dict(sd)
        out = model_outputs(net, xs, mode=setting.mode, batch_size=batch_size)
        return out.features, out.logits, copy.deepcopy(net.head)

    outs = [run(sd) for sd in members]
    rows: list[dict[str, Any]] = []
    correct: dict[tuple[str, int], torch.Tensor] = {}
    kept: dict[tuple[str, int], torch.Tensor] = {}

    def record(method: str, n: int, logits: torch.Tensor, member: int | None = None, **extra: float) -> None:
        right = (logits.argmax(1) == y).double()
        rows.append({"method": method, "N": n, "member": "" if member is None else member,
                     "test_acc": 100.0 * float(right.mean()),
                     "nonfinite_pct": 100.0 * float(nonfinite_rows(logits).double().mean()),
                     "max_abs_logit": max_finite_abs(logits), "max_abs_sum": "", **extra})
        if member is None:
            correct[(method, n)] = right
            if keep_logits:
                kept[(method, n)] = logits
    for i, (_, logits, _) in enumerate(outs):
        record("member", 1, logits, member=i)
    for n in ns:
        if n > len(outs):
            continue
        rows.append({"method": "perf_ave", "N": n, "member": "",
                     "test_acc": float(np.mean([r["test_acc"] for r in rows[:n]])),
                     "nonfinite_pct": float(np.mean([r["nonfinite_pct"] for r in rows[:n]])),
                     "max_abs_logit": max(r["max_abs_logit"] for r in rows[:n]), "max_abs_sum": ""})
        _, soup_logits, _ = run(uniform_soup(members[:n]))
        record("uniform_soup", n, soup_logits)
        logit_list = [o[1] for o in outs[:n]]
        record("logit_ensemble", n, ensemble_logits(logit_list),
               max_abs_sum=max_finite_abs(torch.stack(logit_list).sum(0)))
        head = merged_head([o[2] for o in outs[:n]])
        record("feature_ensemble", n, feature_ensemble_logits([o[0] for o in outs[:n]], head))
    return Cell(rows, correct, kept)


@dataclass(frozen=True)
class ZooJob:
    """Every (c, dtype) cell of one zoo in one setting (picklable: an executor job)."""

    spec: ZooSpec
    arch: str  # the study's name: spec's architecture, or NAME-folded
    setting: Setting
    cfg: Config


@dataclass
class ZooJobResult:
    job: ZooJob
    rows: list[dict[str, Any]]
    correct: dict[tuple[str, float, str, int], torch.Tensor]  # (dtype, c, method, N) → per-example 0/1
    depth: int
    degree: float  # predicted growth degree of the logits in c for this setting
    batch_identity: bool | None = None
    seconds: float = 0.0  # batch-stat BN: scaling the running stats or not gives equal logits


def _test_split(dataset: str, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    test = load_dataset(dataset, "test", cfg.split_seed).subset(cfg.n_test, seed=cfg.split_seed)
    return test.x, test.y


def run_zoo_job(job: ZooJob) -> ZooJobResult:
    """Load the zoo (trained beforehand, from the cache) and evaluate the whole grid of one setting."""
    cfg, setting = job.cfg, job.setting
    started = time.perf_counter()
    zoo = train_zoos([job.spec], workers=1, show_progress=False)[0]
    x, y = _test_split(job.spec.config.dataset, cfg)
    models = [fold_batchnorm(m) for m in zoo.models] if job.arch.endswith(FOLDED) else zoo.models
    template = models[0]
    sds = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    rows: list[dict[str, Any]] = []
    correct: dict[tuple[str, float, str, int], torch.Tensor] = {}
    for dtype_name in cfg.dtypes:
        dtype = getattr(torch, dtype_name)
        for c in cfg.cs:
            cell = evaluate_cell(template, sds, x, y, c=c, setting=setting, dtype=dtype, ns=cfg.ns,
                                 batch_size=cfg.batch_size)
            rows += [{"dataset": job.spec.config.dataset, "arch": job.arch, "setting": setting.key,
                      "seed": job.spec.config.seed, "dtype": dtype_name, "c": c, **r} for r in cell.rows]
            correct.update({(dtype_name, c, m, n): v for (m, n), v in cell.correct.items()})
    identity = None
    if setting.bn_eval == "batch":  # running stats are unused with batch statistics: both scalings agree
        c = max(cfg.cs)
        a, b = (evaluate_cell(template, sds[:1], x, y, c=c, setting=Setting(s, "batch"), dtype=torch.float32,
                              ns=(), batch_size=cfg.batch_size).rows[0] for s in ("params", "state_dict"))
        identity = a == b
    bns, after = bn_layers(template)
    degree = predicted_degree(weight_layers(template), bns, after, setting.scaling, setting.bn_eval)
    return ZooJobResult(job, rows, correct, weight_layers(template), degree, identity,
                        round(time.perf_counter() - started, 1))


# ---------------------------------------------------------------------------------------------- summaries

def _mean_rows(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[Any, ...], float]:
    """Accuracy averaged over seeds: (dataset, arch, setting, dtype, c, method, N) → %."""
    acc: dict[tuple[Any, ...], list[float]] = {}
    for r in rows:
        if r["method"] != "member":
            key = (r["dataset"], r["arch"], r["setting"], r["dtype"], r["c"], r["method"], r["N"])
            acc.setdefault(key, []).append(r["test_acc"])
    return {k: float(np.mean(v)) for k, v in acc.items()}


def _combos(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    return list(dict.fromkeys((r["dataset"], r["arch"], r["setting"]) for r in rows))


def _label(combo: tuple[str, str, str]) -> str:
    s = Setting(*combo[2].split("/"))
    return f"{combo[1]}: {s.label}"


def overflow_table_rows(rows: Sequence[Mapping[str, Any]], depth: Mapping[str, int],
                        degree: Mapping[tuple[str, str], float]) -> list[dict[str, Any]]:
    """Per (zoo, setting, method): predicted overflow c (c^d rule from |logit| at c = 1, d the setting's
    predicted degree: L without BN), the float64
    curve's crossing of the float32 maximum, its growth degree, and the first grid c where float32 gave a
    non-finite logit — each as the median over seeds, with the seeds' range."""
    by: dict[tuple[Any, ...], dict[str, list[tuple[float, float, float]]]] = {}
    for r in rows:
        method = r["method"]
        if method == "perf_ave":
            continue
        key = (r["dataset"], r["arch"], r["setting"], r["seed"], method, r["N"], r["member"])
        # the ensemble's mean is computed as a sum: the sum's magnitude is what overflows
        mag = r["max_abs_sum"] if method == "logit_ensemble" else r["max_abs_logit"]
        by.setdefault(key, {}).setdefault(r["dtype"], []).append((r["c"], mag, r["nonfinite_pct"]))
    per_seed: dict[tuple[Any, ...], list[dict[str, float]]] = {}
    for (ds, arch, setting, _seed, method, n, _member), curves in by.items():
        f32 = sorted(curves.get("float32", []))
        f64 = sorted(curves.get("float64", []))
        at1 = next((m for c, m, _ in f32 if c == 1), math.nan)
        d = degree[(arch, setting)]
        res = {"predicted": predicted_overflow_c(at1, d) if at1 == at1 else math.nan,
               "float64_crossing": crossing_c([c for c, _, _ in f64], [m for _, m, _ in f64]) if f64 else math.nan,
               "degree": growth_degree(f64[-2][0], f64[-2][1], f64[-1][0], f64[-1][1]) if len(f64) > 1 else math.nan,
               "float32_first": first_nonfinite_c([c for c, _, _ in f32], [p for _, _, p in f32]) if f32 else math.nan}
        name = "member" if method == "member" else method
        per_seed.setdefault((ds, arch, setting, name, n), []).append(res)
    out = []
    for (ds, arch, setting, method, n), seeds in per_seed.items():
        row: dict[str, Any] = {"dataset": ds, "zoo": f"{arch} (L = {depth[arch]})",
                               "setting": Setting(*setting.split("/")).label,
                               "method": "members (each)" if method == "member" else f"{METHODS[method]} N={n}",
                               "predicted_degree": f"{degree[(arch, setting)]:g}"}
        for k in ("predicted", "float64_crossing", "degree", "float32_first"):
            vals = [s[k] for s in seeds]
            row[k] = _median_range(vals, "{:.1f}" if k == "degree" else "{:.0f}")
        out.append(row)
    return out


def _median_range(vals: Sequence[float], fmt: str) -> str:
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return "none on grid" if any(v == math.inf for v in vals) else "—"
    med = float(np.median(finite))
    text = fmt.format(med)
    if len(vals) > 1:
        lo, hi = min(finite), max(finite)
        text += f" ({fmt.format(lo)}–{fmt.format(hi)})" if fmt.format(lo) != fmt.format(hi) else ""
        if len(finite) < len(vals):
            text += f", {len(vals) - len(finite)}/{len(vals)} none on grid"
    return text


def _correct_by_seed(results: Sequence[ZooJobResult]) -> dict[tuple[Any, ...], torch.Tensor]:
    """(seed, dataset, arch, setting, dtype, c, method, N) → per-example 0/1, over every job."""
    out: dict[tuple[Any, ...], torch.Tensor] = {}
    for res in results:
        c = res.job.spec.config
        out.update({(c.seed, c.dataset, res.job.arch, res.job.setting.key, *k): v for k, v in res.correct.items()})
    return out


def _stack(correct: Mapping[tuple[Any, ...], torch.Tensor], seeds: Sequence[int], key: tuple[Any, ...]
           ) -> torch.Tensor | None:
    parts = [correct.get((s, *key)) for s in seeds]
    return None if any(p is None for p in parts) else torch.stack(parts)  # type: ignore[misc]


def member_accuracy_at_1(rows: Sequence[Mapping[str, Any]], dataset: str, arch: str, dtype: str
                         ) -> tuple[list[float], str]:
    """The members' test accuracies at c = 1 (every member of every seed) and the BN statistics they were
    evaluated with: running statistics (``running``; ``none`` for nets without BN, the deployed model) when the
    zoo ran a setting with them, else batch statistics (``batch``: a zoo run with ``bn_evals=("batch",)``
    only, the paper's protocol, has no other; before this fallback such a zoo found no member and left the
    regime). At c = 1 the scalings agree, so one setting's rows stand for all."""
    members = [r for r in rows if (r["dataset"], r["arch"]) == (dataset, arch) and r["method"] == "member"
               and r["c"] == 1 and r["dtype"] == dtype]
    evals = {r["setting"].rpartition("/")[2] for r in members}
    stats = next((e for e in ("none", "running", "batch") if e in evals), "")
    setting = next((r["setting"] for r in members if r["setting"].endswith(stats)), "") if stats else ""
    return [r["test_acc"] for r in members if r["setting"] == setting], stats


def regime(results: Sequence[ZooJobResult], rows: Sequence[Mapping[str, Any]], cfg: Config
           ) -> tuple[list[dict[str, Any]], dict[tuple[str, str], bool]]:
    """Regime checks per zoo (dataset, arch): depth, member accuracy at c = 1, seeds, float64 finite."""
    table, ok = [], {}
    zoos = list(dict.fromkeys((r.job.spec.config.dataset, r.job.arch) for r in results))
    for ds, arch in zoos:
        depth = next(r.depth for r in results if (r.job.spec.config.dataset, r.job.arch) == (ds, arch))
        accs, stats = member_accuracy_at_1(rows, ds, arch, cfg.dtypes[0])
        seeds = len({r["seed"] for r in rows if (r["dataset"], r["arch"]) == (ds, arch)})
        f64 = [r["nonfinite_pct"] for r in rows if (r["dataset"], r["arch"]) == (ds, arch) and r["dtype"] == "float64"]
        checks = {"depth": depth >= cfg.min_depth, "members": bool(accs) and float(np.mean(accs)) >= cfg.min_member_acc,
                  "seeds": seeds >= 3, "float64 finite": bool(f64) and max(f64) == 0.0}
        ok[(ds, arch)] = all(checks.values())
        table.append({"dataset": ds, "zoo": arch, "weight layers": f"{depth} ({'≥' if checks['depth'] else '<'} "
                                                                     f"{cfg.min_depth})",
                      "members at c = 1 (%)": f"{float(np.mean(accs)) if accs else math.nan:.1f} "
                                              f"({'≥' if checks['members'] else '<'} {cfg.min_member_acc:g}"
                                              f"{', batch BN stats' if stats == 'batch' else ''})",
                      "seeds": f"{seeds} ({'≥' if checks['seeds'] else '<'} 3)",
                      "float64 non-finite logits": "none" if checks["float64 finite"] else
                      (f"{max(f64):.1f} % max" if f64 else "not run"),
                      "in the regime": "yes" if ok[(ds, arch)] else "no"})
    return table, ok


def setting_text(cfg: Config) -> str:
    return (f"{', '.join(cfg.archs)} on {', '.join(cfg.datasets)}, {cfg.n_models} members ({cfg.init} init), "
            f"{cfg.n_seeds} zoo seed(s); the paper's protocol (every state-dict entry ×c; BN nets with batch "
            f"statistics); N = {max(m for m in cfg.ns if m <= cfg.n_models)}; c = {cfg.claim_low:g}–"
            f"{cfg.claim_high:g} for the window claims; {cfg.n_test or 'all'} test examples")


def regime_summary(table: Sequence[Mapping[str, Any]]) -> str:
    """The regime table in one line: per zoo, its depth, members at c = 1 and seeds, and whether it counts."""
    return "; ".join(f"{r['zoo']} {'in' if r['in the regime'] == 'yes' else 'OUT'} (L = {r['weight layers']}, "
                     f"members at c = 1 (%) {r['members at c = 1 (%)']}, seeds {r['seeds']})" for r in table)


def verdicts(rows: Sequence[Mapping[str, Any]], results: Sequence[ZooJobResult], cfg: Config,
             in_regime: Mapping[tuple[str, str], bool], regime_rows: Sequence[Mapping[str, Any]] = ()
             ) -> tuple[list[Verdict], list[ClaimRow]]:
    """The claims as verdicts (checks included) and as claims-table rows (checks excluded)."""
    correct = _correct_by_seed(results)
    seeds = sorted({r.job.spec.config.seed for r in results})
    # claims are judged in the paper's protocol (every entry ×c; BN nets with batch statistics); the running-
    # statistics settings overflow below c ≈ 30 (overflow table) and are reported, not counted
    combos = [k for k in _combos(rows) if in_regime.get((k[0], k[1]), False) and k[2] in PAPER_SETTINGS]
    n = max(m for m in cfg.ns if m <= cfg.n_models)
    window = [c for c in cfg.cs if cfg.claim_low <= c <= cfg.claim_high]
    broken: dict[tuple[Any, ...], list[float]] = {}
    for r in rows:
        if r["N"] == n and r["method"] != "member":
            key = (r["dataset"], r["arch"], r["setting"], r["dtype"], r["c"], r["method"])
            broken.setdefault(key, []).append(r["nonfinite_pct"])
    skipped = [0]
    paper = ("Fig. 7c, Tab. 10 (VGG-19, CIFAR): the soup − logit-ensemble gap flips sign near ×90 and peaks near "
             "×100–110")

    def diffs(dtype: str, a: str, b: str, cs: Sequence[float]) -> list[Difference]:
        out = []
        for ds, arch, setting in combos:
            for c in cs:
                if all(min(broken.get((ds, arch, setting, dtype, c, m), [0.0])) == 100.0 for m in (a, b)):
                    skipped[0] += 1  # both outputs entirely inf/NaN: the comparison cannot fail, not counted
                    continue
                ma = _stack(correct, seeds, (ds, arch, setting, dtype, c, a, n))
                mb = _stack(correct, seeds, (ds, arch, setting, dtype, c, b, n))
                if ma is not None and mb is not None:
                    out.append(paired_difference(ma, mb, seed=int(c)))
        return out

    setting, regime = setting_text(cfg), regime_summary(regime_rows)
    rows_out: list[ClaimRow] = []

    def claim(text: str, ds: list[Difference], paper_text: str) -> Verdict:
        if not combos:
            v = Verdict(text, None, "no zoo passed the regime checks (table above), so nothing here is evidence "
                                    "for or against the claim", paper=paper_text, undecided=OUTSIDE)
            rows_out.append(ClaimRow(v, paper_text, [], setting, regime))
            return v
        v = claim_verdict(text, ds, what=f"(zoo, setting, c) cells at N = {n}", paper=paper_text)
        if skipped[0]:
            v = replace(v, detail=f"{v.detail} {skipped[0]} cell(s) where both outputs were entirely non-finite "
                                  "are not counted.")
        skipped[0] = 0
        rows_out.append(ClaimRow(v, paper_text, ds, setting, regime))
        return v

    out = []
    for dtype in cfg.dtypes:
        out.append(claim(f"Soup beats the logit ensemble at c = {cfg.claim_low:g}–{cfg.claim_high:g} ({dtype})",
                         diffs(dtype, "uniform_soup", "logit_ensemble", window), paper))
    out.append(claim("Before the flip (c = 1) the logit ensemble beats the soup",
                     diffs(cfg.dtypes[0], "logit_ensemble", "uniform_soup", [c for c in cfg.cs if c == 1]),
                     "Fig. 7b/7c: ensembles ahead of soups at small c, behind after the flip"))
    for dtype in cfg.dtypes:
        out.append(claim(f"Feature ensemble beats the logit ensemble at c = {cfg.claim_low:g}–{cfg.claim_high:g} "
                         f"({dtype})", diffs(dtype, "feature_ensemble", "logit_ensemble", window),
                         "Fig. 7b: feature ensembles more robust to ×c than logit ensembles"))
    mechanism = _mechanism_verdict(rows, combos, n)
    out.append(mechanism)
    rows_out.append(ClaimRow(mechanism, mechanism.paper, [], setting + "; float32, first grid c with a non-finite "
                             "logit per (zoo seed, setting)", regime, ours_text=mechanism.detail))
    f64 = [r["nonfinite_pct"] for r in rows if r["dtype"] == "float64"]
    if f64:
        out.append(check("float64 logits are finite on the whole grid (the float64 rerun is overflow-free)",
                         sum(1 for v in f64 if v == 0.0), len(f64), "rows of members, soups and ensembles"))
    ident = [r.batch_identity for r in results if r.batch_identity is not None]
    if ident:
        out.append(check("Batch-statistics BN ignores running statistics: scaling them or not gives equal outputs",
                         sum(ident), len(ident), f"member 0 of every BN zoo at c = {max(cfg.cs):g}, float32"))
    return out, rows_out


def _mechanism_verdict(rows: Sequence[Mapping[str, Any]], combos: Sequence[tuple[str, str, str]], n: int
                       ) -> Verdict:
    """The overflow hypothesis: in float32 the logit ensemble's logits turn non-finite at a smaller grid c than
    every member's and the soup's (per zoo seed and setting; resolved when they differ by a grid step)."""
    first: dict[tuple[Any, ...], dict[str, float]] = {}
    for r in rows:
        if r["dtype"] != "float32" or (r["dataset"], r["arch"], r["setting"]) not in combos:
            continue
        if r["method"] == "member" or (r["N"] == n and r["method"] in ("uniform_soup", "logit_ensemble")):
            if r["method"] == "member" and int(r["member"]) >= n:
                continue
            key = (r["dataset"], r["arch"], r["setting"], r["seed"])
            name = "member" if r["method"] == "member" else r["method"]
            if r["nonfinite_pct"] > 0:
                first.setdefault(key, {})
                first[key][name] = min(first[key].get(name, math.inf), r["c"])
    keys = sorted({(r["dataset"], r["arch"], r["setting"], r["seed"]) for r in rows
                   if (r["dataset"], r["arch"], r["setting"]) in combos})
    earlier = same = later = none = 0
    for k in keys:
        f = first.get(k, {})
        ens = f.get("logit_ensemble", math.inf)
        other = min(f.get("member", math.inf), f.get("uniform_soup", math.inf))
        if ens == other == math.inf:
            none += 1
        elif ens < other:
            earlier += 1
        elif ens == other:
            same += 1
        else:
            later += 1
    tested = len(keys) - none
    claim_text = (f"Overflow hypothesis: in float32 the logit ensemble (N = {n}) overflows at a smaller c than "
                  "its members and the soup")
    paper = ("issue 14's explanation of Fig. 7b/7c: logits ∝ c^L leave float32 near c ≈ 107 for L = 19; the "
             "ensemble's sum of N logits first")
    if not keys:
        return Verdict(claim_text, None, "no zoo in the regime", paper=paper, undecided=OUTSIDE)
    detail = (f"earlier in {earlier}/{len(keys)} (zoo seed, setting) runs, at the same grid c in {same}, later in "
              f"{later}; nothing overflowed on the grid in {none}.")
    if tested == 0:
        return Verdict(claim_text, None, detail, paper=paper, undecided=NO_DIFFERENCE)
    held: bool | None = True if earlier >= 0.75 * tested else (False if later + same >= 0.75 * tested else None)
    return Verdict(claim_text, held, detail, paper=paper)


def gap_table_rows(rows: Sequence[Mapping[str, Any]], results: Sequence[ZooJobResult], cfg: Config,
                   show_cs: Sequence[float]) -> list[dict[str, Any]]:
    """Soup − logit ensemble (points, 95 % CI over test examples and seeds) per zoo/setting/c, float32 beside
    float64: the part of the gap that survives float64 is not an overflow artefact."""
    correct = _correct_by_seed(results)
    seeds = sorted({r.job.spec.config.seed for r in results})
    n = max(m for m in cfg.ns if m <= cfg.n_models)
    out = []
    for combo in _combos(rows):
        for pair, name in ((("uniform_soup", "logit_ensemble"), "soup − logit ens."),
                           (("feature_ensemble", "logit_ensemble"), "feature − logit ens.")):
            row: dict[str, Any] = {"zoo / setting": _label(combo), "difference": name}
            for c in show_cs:
                parts = []
                for dtype in cfg.dtypes:
                    a = _stack(correct, seeds, (*combo, dtype, c, pair[0], n))
                    b = _stack(correct, seeds, (*combo, dtype, c, pair[1], n))
                    parts.append(paired_difference(a, b, seed=int(c)).text() if a is not None and b is not None
                                 else "—")
                row[f"c={c:g}"] = " / ".join(parts)
            out.append(row)
    return out


def accuracy_table_rows(rows: Sequence[Mapping[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    acc = _mean_rows(rows)
    n = max(m for m in cfg.ns if m <= cfg.n_models)
    out = []
    for combo in _combos(rows):
        for dtype in cfg.dtypes:
            for m, label in METHODS.items():
                row: dict[str, Any] = {"zoo / setting": _label(combo), "dtype": dtype, "method": label}
                for c in cfg.cs:
                    row[f"c={c:g}"] = acc.get((*combo, dtype, c, m, n))
                out.append(row)
    return out


def _nonfinite_by(rows: Sequence[Mapping[str, Any]], n: int) -> dict[tuple[Any, ...], float]:
    """float32 % of non-finite examples averaged over seeds (members: the worst member)."""
    vals: dict[tuple[Any, ...], list[float]] = {}
    worst: dict[tuple[Any, ...], float] = {}
    for r in rows:
        if r["dtype"] != "float32":
            continue
        if r["method"] == "member":
            if int(r["member"]) < n:
                k = (r["dataset"], r["arch"], r["setting"], r["c"], r["seed"])
                worst[k] = max(worst.get(k, 0.0), r["nonfinite_pct"])
        elif r["N"] == n:
            vals.setdefault((r["dataset"], r["arch"], r["setting"], r["c"], r["method"]), []).append(r["nonfinite_pct"])
    for (ds, arch, setting, c, _), v in worst.items():
        vals.setdefault((ds, arch, setting, c, "member"), []).append(v)
    return {k: float(np.mean(v)) for k, v in vals.items()}


def figures(rows: Sequence[Mapping[str, Any]], results: Sequence[ZooJobResult], cfg: Config, out: Path,
            vs: Sequence[Verdict]) -> list[FigureRef]:
    acc = _mean_rows(rows)
    n = max(m for m in cfg.ns if m <= cfg.n_models)
    combos = _combos(rows)
    cs = list(cfg.cs)
    figs = []
    for dtype in cfg.dtypes:
        panels = {_label(k): (cs, {m: [acc.get((*k, dtype, c, m, n), math.nan) for c in cs] for m in METHODS})
                  for k in combos}
        figs.append(FigureRef(line_panels(panels, out / f"fig_acc_vs_c_{dtype}.png", xlabel="scale factor c",
                                          ylabel="test accuracy (%)", labels=METHODS,
                                          title=f"Accuracy vs scale c in {dtype} (N = {n}, mean over seeds)"),
                              f"Fig. 7b at depth ≥ 19, {dtype}: test accuracy as every member is scaled by c."))
    nf = _nonfinite_by(rows, n)
    labels = {"member": "worst member", **{k: METHODS[k] for k in ("uniform_soup", "logit_ensemble",
                                                                    "feature_ensemble")}}
    panels = {_label(k): (cs, {m: [nf.get((*k, c, m), math.nan) for c in cs] for m in labels}) for k in combos}
    figs.append(FigureRef(line_panels(panels, out / "fig_nonfinite_float32.png", xlabel="scale factor c",
                                      ylabel="examples with a non-finite logit (%)",
                                      labels={**labels, "member": "worst member"},
                                      title=f"float32 overflow: share of test examples with inf/NaN logits (N = {n})"),
                          "Where float32 overflows, per method. "
                          + " ".join(v.sentence() for v in vs if v.claim.startswith("Overflow hypothesis"))))
    gap = {}
    for k in combos:
        gap[_label(k)] = (cs, {d: [acc.get((*k, d, c, "uniform_soup", n), math.nan)
                                   - acc.get((*k, d, c, "logit_ensemble", n), math.nan) for c in cs]
                               for d in cfg.dtypes})
    figs.append(FigureRef(line_panels(gap, out / "fig_gap_float32_vs_float64.png", xlabel="scale factor c",
                                      ylabel="soup − logit ensemble (points)", hline=0.0,
                                      title=f"Soup − logit ensemble gap (Fig. 7c at N = {n}): float32 vs float64"),
                          "The robustness gap in float32 beside the same grid in float64. "
                          + " ".join(v.sentence() for v in vs[:len(cfg.dtypes)])))
    if "float64" in cfg.dtypes:
        growth: dict[str, tuple[list[float], dict[str, list[float]]]] = {}
        for k in combos:
            series: dict[str, list[float]] = {}
            for name, method, col in (("member 0", "member", "max_abs_logit"), ("uniform soup", "uniform_soup",
                                                                                "max_abs_logit"),
                                      (f"sum of {n} members' logits", "logit_ensemble", "max_abs_sum")):
                vals = []
                for c in cs:
                    v = [r[col] for r in rows if (r["dataset"], r["arch"], r["setting"]) == k
                         and r["dtype"] == "float64" and r["c"] == c and r["method"] == method
                         and (r["member"] == 0 if method == "member" else r["N"] == n)]
                    vals.append(math.log10(float(np.median(v))) if v and min(v) > 0 else math.nan)
                series[name] = vals
            growth[_label(k)] = (cs, series)
        figs.append(FigureRef(line_panels(growth, out / "fig_logit_growth_float64.png", xlabel="scale factor c (log)",
                                          ylabel="log10 max |logit| (float64)", hline=math.log10(F32_MAX),
                                          logx=True, title="How large the logits get (float64); dashed: float32 max"),
                              "Logit magnitude against c in float64, where nothing overflows; a curve crossing the "
                              "dashed line is where float32 overflows (the overflow table lists the crossings)."))
    return explain(figs, {
        "fig_acc_vs_c": "one panel per zoo and scaling setting; x = the factor c every member was multiplied by, "
                        "y = test accuracy (%), mean over seeds, one line per method. A flat line is robust to "
                        "the scale; a line falling to ~10 % is chance (often non-finite logits in float32).",
        "fig_nonfinite": "one panel per zoo and setting; y = % of test examples with any inf/NaN logit in float32 "
                         "(worst member: the member with most). A method whose line rises at a smaller c overflows "
                         "first; lines at 0 never overflow on this grid.",
        "fig_gap": "one panel per zoo and setting; y = uniform soup minus logit ensemble accuracy (points, mean "
                   "over seeds), one line per precision. Above the dashed 0 line the soup wins. Where the float32 "
                   "line leaves 0 and the float64 line stays, the gap is an overflow artefact.",
        "fig_logit_growth": "one panel per zoo and setting; x = c on a log axis, y = log10 of the largest |logit| in "
                            "float64 (median over seeds), so a straight line has slope = the growth degree (about "
                            "L for nets without BN). The dashed line is float32's maximum, 3.4e38.",
    })


def build(out: Path, cfg: Config, *, show_progress: bool = True) -> StudyResult:
    for s in cfg.scalings:
        if s not in ("params", "state_dict"):
            raise ValueError(f"scalings take 'params' and 'state_dict', got '{s}'")
    for b in cfg.bn_evals:
        if b not in ("running", "batch"):
            raise ValueError(f"bn_evals take 'running' and 'batch', got '{b}'")
    for d in cfg.dtypes:
        if d not in ("float32", "float64"):
            raise ValueError(f"dtypes take 'float32' and 'float64', got '{d}'")
    if cfg.n_seeds < 1 or not cfg.cs:
        raise ValueError("need at least one seed and one scale c")
    settings = {a: settings_for(a, cfg) for a in cfg.archs}
    pre = pretrain_epochs(cfg)
    specs = {(d, a, k): zoo_spec(replace(cfg, seed=cfg.seed + k, pretrain_epochs=pre.get(a, cfg.pretrain_epochs)), a,
                                 d, cfg.init, cfg.n_models)
             for d in cfg.datasets for a in dict.fromkeys(map(base_arch, cfg.archs)) for k in range(cfg.n_seeds)}
    zoos = train_zoos(list(specs.values()), workers=cfg.workers, show_progress=show_progress, executor=cfg.executor)
    jobs = [ZooJob(specs[(d, base_arch(a), k)], a, s, cfg)
            for d in cfg.datasets for a in cfg.archs for k in range(cfg.n_seeds) for s in settings[a]]
    # one worker (or none asked) evaluates in this process, as train_zoos does: no process start-up
    spec_text = cfg.executor or ("local" if cfg.workers is None else f"local:{cfg.workers if cfg.workers > 1 else 0}")
    with get_executor(spec_text, show_progress=show_progress) as ex:
        results = ex.map(run_zoo_job, jobs, desc="scale and evaluate (zoo × setting)")
    rows = [r for res in results for r in res.rows]
    depth = {res.job.arch: res.depth for res in results}
    degree = {(res.job.arch, res.job.setting.key): res.degree for res in results}
    regime_rows, in_regime = regime(results, rows, cfg)
    vs, claim_rows = verdicts(rows, results, cfg, in_regime, regime_rows)
    show = [c for c in (1, 50, 80, 90, 95, 100, 105, 110, 120, 150) if c in cfg.cs]
    tables = {
        "magnitude_deep.csv": rows,
        "accuracy_vs_c": Table(f"Test accuracy (%) after scaling by c, N = {max(cfg.ns)}, mean over "
                               f"{cfg.n_seeds} seed(s)", accuracy_table_rows(rows, cfg), floatfmt="{:.1f}"),
        "overflow": Table("Overflow scale c: predicted (c^L rule) vs float64 crossing vs float32 measured",
                          overflow_table_rows(rows, depth, degree),
                          headers={"predicted_degree": "predicted degree d",
                                   "predicted": "predicted c* = (3.4e38/|logit at c=1|)^(1/d)",
                                   "float64_crossing": "float64 |logit| reaches 3.4e38 at c",
                                   "degree": "growth degree (float64)",
                                   "float32_first": "float32: first grid c with inf/NaN"},
                          note="Median over seeds (range). Logit ensemble: the magnitude is that of the sum of the N "
                               "members' logits, which the mean computes first. 'none on grid': no non-finite "
                               "logit up to the largest c."),
        "gap_float32_vs_float64": Table("Differences in points (95 % CI over test examples and seeds): float32 / "
                                        "float64", gap_table_rows(rows, results, cfg, show),
                                        note="Each cell: float32 result / float64 result. A difference present in "
                                             "float32 and gone in float64 is an overflow artefact."),
        "regime": Table("Regime checks (a zoo outside the regime is not counted in the verdicts)", regime_rows),
        "claims": claims_table(claim_rows),
    }
    figs = figures(rows, results, cfg, out, vs)
    text = [f"Zoos: {', '.join(cfg.archs)} on {', '.join(cfg.datasets)}, {cfg.n_models} members each ({cfg.init} "
            f"init), {cfg.n_seeds} seed(s); c ∈ {{{', '.join(f'{c:g}' for c in cfg.cs)}}}; {cfg.n_test or 'all'} "
            f"test examples; evaluated in {' and '.join(cfg.dtypes)}.",
            "Settings: nets without BN scale every parameter. BN nets: (1) parameters ×c with running statistics "
            "kept (the shallow study's default), (2) every state-dict entry ×c, running statistics included "
            "(literally ×c, as the paper does), evaluated with running statistics, (3) the same evaluated with "
            "batch statistics (as the paper's code; the running statistics are then unused).",
            "Prediction: a net with L weight layers in series has logits ∝ c^L, so float32 overflows at "
            "c* = (3.4e38/|logit at c = 1|)^(1/L); the logit ensemble's sum of N logits at N^(-1/L)·c*. BatchNorm "
            "changes the degree d (B BN layers in series, F weight layers after the last): running statistics "
            "kept → L + B (each BN divides by a fixed σ and multiplies by its scaled γ); running statistics ×c "
            "→ L + B/2 (it divides by √(c·σ²)); batch statistics → 1 + F (each BN removes the growth before it). "
            "The overflow table sets this prediction beside the degree measured in float64."]
    shown = [tables[k] for k in ("claims", "regime", "overflow", "gap_float32_vs_float64", "accuracy_vs_c")]
    section = Section("Magnitude robustness at depth ≥ 19: the float32 overflow hypothesis (issue 14)", text=text,
                      verdicts=vs, tables=shown, figures=figs)  # type: ignore[arg-type]
    report = Report("Weight magnitude at depth ≥ 19: soups, ensembles and float32 overflow",
                    meta={"seed": cfg.seed, "zoo seeds": [cfg.seed + k for k in range(cfg.n_seeds)]}).add(section)
    summary = {v.claim: {"outcome": v.word, "detail": v.detail} for v in vs}
    seconds = {f"{r.job.arch}:{r.job.setting.key}:seed{r.job.spec.config.seed}": r.seconds for r in results}
    return StudyResult(report, tables, zoos, {"verdicts": summary, "weight_layers": depth,
                                              "settings": {a: [s.key for s in v] for a, v in settings.items()},
                                              "job_seconds": seconds})


def pretrain_epochs(cfg: Config) -> dict[str, int]:
    """``pretrain_overrides`` parsed: architecture → pre-training epochs."""
    out = {}
    for item in cfg.pretrain_overrides:
        arch, sep, epochs = item.partition("=")
        if not sep or not epochs.strip().isdigit() or arch.strip() not in ARCHS:
            raise ValueError(f"pretrain_overrides takes ARCH=EPOCHS with ARCH one of {sorted(ARCHS)}, got '{item}'")
        out[arch.strip()] = int(epochs)
    return out


run = study_runner("magnitude-deep", build, Config(), QUICK)


__all__ = ["QUICK", "Config", "Setting", "base_arch", "evaluate_cell", "run", "scaled", "settings_for"]
