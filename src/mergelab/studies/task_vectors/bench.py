"""Merge a suite's fine-tuned encoders with every task-vector method and score them with per-task heads.

:class:`MergeBench` owns the expensive parts of the task-vector study: merged encoders are built through
:func:`mergelab.merge_state_dicts` (the registered methods), evaluated once per (method, parameters, task
set, split) and memoised; hyper-parameters are chosen on the validation split by mean *normalised*
accuracy (merged accuracy / the task's own fine-tuned accuracy, in percent), the paper's criterion.

CART sweeps reuse one SVD per (tensor, task): :class:`CartSweep` builds ``θ_avg + λ Σ_t SVD_k(θ_t − θ_avg)``
for any (k, λ) from cached spectra — the same formula as :func:`mergelab.methods.cart.cart_merge` with
uniform weights (a test checks they agree), at a fraction of the cost of re-running the SVDs per point.
With ``fuse=qkv_group`` the query, key and value weights of one attention layer form one matrix (stacked
rows), as OpenCLIP stores them in ``in_proj_weight``: one rank budget covers all three.

Grids bracket their optimum: :meth:`MergeBench.select` extends a numeric axis beyond its end while the best
value sits there (:data:`MethodInfo.bracket` names the axes and their limits), so a chosen value is never a
grid end unless a limit stops the extension, and the selection says so.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.analysis.interference import Spectrum, low_rank_sum, spectrum, task_matrices
from mergelab.ensemble import ensemble_logits
from mergelab.evaluation import accuracy_pct, correct
from mergelab.merge.state_dicts import merge_state_dicts
from mergelab.methods.cart import rank_from_ratio
from mergelab.types import StateDict
from mergelab.zoo.cache import load_entry, recipe_hash, save_entry
from mergelab.zoo.task_suite import TaskSuite

Params = dict[str, Any]


@functools.cache
def code_fingerprint() -> str:
    """A hash of every source file of the installed mergelab: evaluations memoised on disk are reused only by
    the code that made them (any change, in a method or an evaluation, starts afresh)."""
    root = Path(__file__).resolve().parents[2]  # the mergelab package (this file: studies/task_vectors/)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def params_key(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


_QKV = re.compile(r"^(?P<layer>.*\.)(?:q|k|v|query|key|value)\.weight$")


def qkv_group(name: str) -> str | None:
    """The attention layer a query/key/value weight belongs to (``blocks.0.q.weight`` → ``blocks.0.qkv``, BERT's
    ``….attention.self.query.weight`` → ``….attention.self.qkv``); None for every other tensor."""
    m = _QKV.match(name)
    return None if m is None else m["layer"] + "qkv"


class CartSweep:
    """CART merges of one task set for any (rank ratio, λ) from cached SVDs of the centred task vectors.

    ``fuse(name)`` gives a group key for tensors merged as one matrix (their rows stacked in name order), None
    for a tensor on its own; the rank of a group is ``round(ratio · min(rows of all, columns))``.
    """

    def __init__(self, states: Sequence[Mapping[str, torch.Tensor]],
                 fuse: Callable[[str], str | None] = lambda name: None) -> None:
        first = states[0]
        self.avg: StateDict = {}
        avg64: dict[str, torch.Tensor] = {}
        changed: dict[str, list[str]] = {}
        for name, t in first.items():
            if not t.is_floating_point():
                self.avg[name] = t
                continue
            ws = [s[name] for s in states]
            avg64[name] = torch.stack([w.to(torch.float64) for w in ws]).mean(0)
            self.avg[name] = avg64[name].to(t.dtype)
            if t.dim() == 2 and any(not torch.equal(w, ws[0]) for w in ws[1:]):
                changed.setdefault(fuse(name) or name, []).append(name)
        #: matrix key → the tensor names whose rows it stacks
        self.groups = {key: sorted(names) for key, names in changed.items()}
        self.spectra: dict[str, list[Spectrum]] = {}
        # the mean of stacked rows is the stack of each tensor's mean: computed once above
        self._avg64 = {key: torch.cat([avg64[n] for n in names]) for key, names in self.groups.items()}
        for key, names in self.groups.items():
            ws = [torch.cat([s[n].to(torch.float64) for n in names]) for s in states]
            self.spectra[key] = [spectrum(d) for d in task_matrices(ws)]

    def merge(self, rank_ratio: float, lambda_: float) -> StateDict:
        out = dict(self.avg)
        if rank_ratio <= 0 or lambda_ == 0:
            return out
        for key, spectra in self.spectra.items():
            k = rank_from_ratio(self._avg64[key].shape, rank_ratio)
            merged = self._avg64[key] + lambda_ * low_rank_sum(spectra, k)
            names = self.groups[key]
            for name, part in zip(names, merged.split([self.avg[n].shape[0] for n in names]), strict=True):
                out[name] = part.to(self.avg[name].dtype)
        return out


@dataclass
class Selection:
    """A method's chosen parameters and its accuracies (percent) per task on val and test."""

    method: str
    params: Params
    val: dict[str, float]
    test: dict[str, float]
    trace: list[tuple[Params, float]] = field(default_factory=list)  # (params, val mean normalised acc)
    #: per bracketed axis: the chosen value lies strictly inside the evaluated values (False: a limit stopped
    #: the extension at the chosen end)
    interior: dict[str, bool] = field(default_factory=dict)


class MergeBench:
    """Merging and evaluation for one suite (all tasks or any subset of them)."""

    def __init__(self, suite: TaskSuite, *, seed: int = 0, fisher_examples: int = 256,
                 gram_examples: int = 512, resume: bool = False) -> None:
        """``resume``: keep every memoised evaluation on disk beside the suite's fine-tunes
        (``<cache>/task_suites/evaluations``), keyed by the fine-tunes, these settings and a hash of mergelab's
        own source (:func:`code_fingerprint`), and start from what an earlier, interrupted run of the same code
        evaluated: the text benchmark's merges and evaluations take hours on 2 cores."""
        self.suite = suite
        self.seed = seed
        self.fisher_examples = fisher_examples
        self.gram_examples = gram_examples
        ft = suite.finetuned()
        self.tasks = [t.name for t in suite.tasks]
        self.states = {t: ft[t].state for t in self.tasks}
        self.pretrained = suite.pretrained_state()
        self._acc: dict[tuple[Any, ...], dict[str, float]] = {}
        self._correct: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}
        self._memo: tuple[str, Path] | None = None
        if resume:
            key = recipe_hash({"finetuned": [ft[t].cache_key for t in self.tasks], "seed": seed,
                               "fisher_examples": fisher_examples, "gram_examples": gram_examples,
                               "code": code_fingerprint(), "kind": "MergeBench evaluations"})
            self._memo = (key, suite.cache / "evaluations")
            earlier = load_entry(key, self._memo[1])
            if earlier is not None:
                self._acc, self._correct = dict(earlier["acc"]), dict(earlier["correct"])
        self._logits: dict[tuple[str, str, str], torch.Tensor] = {}
        self._fisher: dict[str, StateDict] = {}
        self._grams: dict[str, StateDict] = {}
        self._cart: dict[tuple[tuple[str, ...], bool], CartSweep] = {}  # (tasks, q/k/v fused) -> sweep

    # ---- evaluation -----------------------------------------------------------------------------------
    def accuracies(self, state: Mapping[str, torch.Tensor], tasks: Sequence[str], split: str,
                   key: tuple[Any, ...] | None = None) -> dict[str, float]:
        """Accuracy (%) of one encoder on each task with the task's head; memoised under ``key``."""
        full = None if key is None else (*key, tuple(tasks), split)
        if full is not None and full in self._acc:
            return self._acc[full]
        accs, right = self.evaluate(state, tasks, split)
        if full is not None:
            self._acc[full], self._correct[full] = accs, right
            if self._memo is not None:  # written atomically: a run killed here loses this evaluation only
                save_entry(self._memo[0], {"acc": self._acc, "correct": self._correct}, self._memo[1])
        return accs

    def evaluate(self, state: Mapping[str, torch.Tensor], tasks: Sequence[str], split: str
                 ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Accuracy (%) per task and which examples were right (for paired bootstraps), from one pass."""
        accs, right = {}, {}
        for t in tasks:
            logits, y = self.suite.logits(state, t, split), self.suite.data(t, split).y
            accs[t], right[t] = accuracy_pct(logits, y), correct(logits, y)
        return accs, right

    def per_example(self, method: str, tasks: Sequence[str], params: Params, split: str) -> dict[str, torch.Tensor]:
        """Which examples of each task the merge ``method`` (with ``params``) gets right (memoised with
        :meth:`score`)."""
        self.score(method, tasks, params, split)
        return self._correct[(method, params_key(params), tuple(tasks), split)]

    def individual(self, split: str) -> dict[str, float]:
        """Each fine-tuned encoder on its own task (the denominators of normalised accuracy)."""
        return {t: accuracy_pct(self.member_logits(t, t, split), self.suite.data(t, split).y) for t in self.tasks}

    def normalised_scale(self, split: str) -> dict[str, float]:
        """Per task, the factor from a 0–1 score to normalised accuracy points (100 / fine-tuned accuracy)."""
        return {t: 100.0 / a if a > 0 else 0.0 for t, a in self.individual(split).items()}

    def normalised(self, accs: Mapping[str, float], split: str) -> dict[str, float]:
        ind = self.individual(split)
        return {t: 100.0 * a / ind[t] if ind[t] > 0 else float("nan") for t, a in accs.items()}

    def mean_normalised(self, accs: Mapping[str, float], split: str) -> float:
        vals = list(self.normalised(accs, split).values())
        return sum(vals) / len(vals)

    def member_logits(self, member: str, task: str, split: str) -> torch.Tensor:
        """Logits of ``member``'s fine-tuned encoder with ``task``'s head (memoised; ensembles reuse them)."""
        key = (member, task, split)
        if key not in self._logits:
            self._logits[key] = self.suite.logits(self.states[member], task, split)
        return self._logits[key]

    def ensemble(self, tasks: Sequence[str], split: str) -> dict[str, float]:
        """Logit ensemble of the fine-tuned encoders of ``tasks``, each task read with its own head."""
        return {t: accuracy_pct(ensemble_logits([self.member_logits(m, t, split) for m in tasks]),
                                self.suite.data(t, split).y) for t in tasks}

    def ensemble_correct(self, tasks: Sequence[str], split: str) -> dict[str, torch.Tensor]:
        """Which examples of each task the logit ensemble of ``tasks`` gets right (for paired bootstraps)."""
        return {t: correct(ensemble_logits([self.member_logits(m, t, split) for m in tasks]),
                           self.suite.data(t, split).y) for t in tasks}

    # ---- merging --------------------------------------------------------------------------------------
    def fisher(self, task: str) -> StateDict:
        if task not in self._fisher:
            self._fisher[task] = self.suite.fisher(task, self.fisher_examples, seed=self.seed)
        return self._fisher[task]

    def grams(self, task: str) -> StateDict:
        if task not in self._grams:
            self._grams[task] = self.suite.grams(task, self.gram_examples)
        return self._grams[task]

    def cart(self, tasks: Sequence[str], *, fused_qkv: bool = False) -> CartSweep:
        key = (tuple(tasks), fused_qkv)
        if key not in self._cart:
            self._cart[key] = CartSweep([self.states[t] for t in tasks], qkv_group if fused_qkv else lambda n: None)
        return self._cart[key]

    def merge(self, method: str, tasks: Sequence[str], params: Params) -> StateDict:
        """The merged encoder of ``tasks`` (``method`` is a study method name, see :data:`METHODS`)."""
        states = [self.states[t] for t in tasks]
        if method == "pretrained":
            return self.pretrained
        if method == "weight_averaging":
            return merge_state_dicts(states, "linear")
        if method in ("cart", "cart_qkv"):
            return self.cart(tasks, fused_qkv=method == "cart_qkv").merge(params["rank_ratio"], params["lambda"])
        if method in ("task_arithmetic", "ties", "dare_ties", "model_stock", "tsv", "iso_c", "iso_cts",
                      "wudi"):
            return merge_state_dicts(states, method, base=self.pretrained, parameters=params, seed=self.seed)
        if method == "wudi_exact":
            return merge_state_dicts(states, "wudi", base=self.pretrained, parameters={**params, "solver": "exact"})
        if method == "fisher":
            fishers = [self.fisher(t) for t in tasks]
            stats = {n: [f[n] for f in fishers] for n in fishers[0]}
            return merge_state_dicts(states, "fisher", stats=stats)
        if method == "regmean":
            grams = [self.grams(t) for t in tasks]
            stats = {n: [g[n] for g in grams] for n in grams[0]}
            return merge_state_dicts(states, "regmean", parameters=params, stats=stats)
        raise KeyError(f"unknown study method '{method}'; choose from {sorted(METHODS)}")

    def score(self, method: str, tasks: Sequence[str], params: Params, split: str) -> dict[str, float]:
        key = (method, params_key(params))
        full = (*key, tuple(tasks), split)
        if full in self._acc:
            return self._acc[full]
        return self.accuracies(self.merge(method, tasks, params), tasks, split, key=key)

    def select(self, method: str, tasks: Sequence[str], grid: Sequence[Params],
               bracket: Mapping[str, tuple[float, float]] | None = None, max_extensions: int = 8,
               bracket_each: Sequence[str] = ()) -> Selection:
        """Best parameters of ``grid`` on val (mean normalised accuracy; first wins ties), then test.

        For each axis of ``bracket`` (name → (lowest, highest) value allowed) whose best value is an end of the
        values tried, the axis is extended one geometric step beyond that end (the other axes at their best)
        until the best value is inside, a limit is reached, or ``max_extensions`` rounds are spent.

        An axis in ``bracket_each`` is bracketed so in every row of the grid (each combination of the other
        axes' values), not only at the best point: where the best value of one axis moves with another, as
        CART's λ grows with its rank (its centred low-rank sum shrinks as the rank grows), bracketing at the
        best point alone stops on the wrong ridge. Measured on the vision benchmark (docs/task_vectors.md):
        at ranks 12–25 % the best λ lay beyond the grid's 3 and beat the point chosen without it.
        """
        trace: list[tuple[Params, float]] = []

        def evaluate(params: Params) -> None:
            if all(p != params for p, _ in trace):
                trace.append((dict(params), self.mean_normalised(self.score(method, tasks, params, "val"), "val")))

        def best(among: Sequence[int] | None = None) -> Params:  # first wins ties
            return trace[max(range(len(trace)) if among is None else among, key=lambda i: (trace[i][1], -i))][0]

        for params in grid:
            evaluate(params)
        interior: dict[str, bool] = {}
        for _ in range(max_extensions + 1):
            grown = False
            for axis in bracket_each:
                lowest, highest = (bracket or {})[axis]
                for row in _rows(trace, axis):
                    chosen = best(row)
                    step = _beyond(sorted(trace[i][0][axis] for i in row), chosen[axis], lowest, highest)
                    if step is not None:
                        evaluate({**chosen, axis: step})
                        grown = True
            for axis, (lowest, highest) in (bracket or {}).items():
                chosen = best()
                values = sorted({p[axis] for p, _ in trace if _same_except(p, chosen, axis)})
                step = _beyond(values, chosen[axis], lowest, highest)
                interior[axis] = values[0] < chosen[axis] < values[-1]
                if step is not None:
                    evaluate({**chosen, axis: step})
                    grown = True
            if not grown:
                break
        params = best()
        return Selection(method, params, self.score(method, tasks, params, "val"),
                         self.score(method, tasks, params, "test"), trace, interior)

    def ensemble_selection(self, tasks: Sequence[str]) -> Selection:
        return Selection("logit_ensemble", {}, self.ensemble(tasks, "val"), self.ensemble(tasks, "test"))


def _rows(trace: Sequence[tuple[Params, float]], axis: str) -> list[list[int]]:
    """Indices into ``trace`` grouped by the values of every axis but ``axis`` (first appearance order)."""
    rows: dict[tuple[tuple[str, Any], ...], list[int]] = {}
    for i, (params, _) in enumerate(trace):
        rows.setdefault(params_key({k: v for k, v in params.items() if k != axis}), []).append(i)
    return list(rows.values())


def _same_except(a: Params, b: Params, axis: str) -> bool:
    return all(a.get(k) == v for k, v in b.items() if k != axis)


def _beyond(values: Sequence[float], chosen: float, lowest: float, highest: float) -> float | None:
    """The next value past the end of ``values`` that ``chosen`` sits on, one geometric step (the ratio of the
    two end values; ×2 or ÷2 with one value) further, clipped to [lowest, highest]; None when ``chosen`` is
    inside or the limit is already tried."""
    if len(values) > 1 and values[0] < chosen < values[-1]:
        return None
    if chosen == values[-1]:
        ratio = values[-1] / values[-2] if len(values) > 1 and values[-2] > 0 else 2.0
        nxt = min(highest, float(f"{chosen * ratio:.3g}"))
        return nxt if nxt > chosen else None
    ratio = values[1] / values[0] if len(values) > 1 and values[0] > 0 else 2.0
    nxt = max(lowest, float(f"{chosen / ratio:.3g}"))
    return nxt if nxt < chosen else None


@dataclass(frozen=True)
class MethodInfo:
    label: str
    grid: Callable[[Any], list[Params]]  # plan -> parameter grid
    #: axes extended until their optimum is inside the grid: name -> (lowest, highest) value allowed
    bracket: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    #: axes of ``bracket`` bracketed in every row of the grid (:meth:`MergeBench.select`'s ``bracket_each``)
    bracket_each: tuple[str, ...] = ()


def _grid(**axes: Sequence[Any]) -> list[Params]:
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


_LAMBDA = {"lambda": (0.01, 20.0)}
# rank ratio 1 is weight averaging (every centred task vector kept whole): the bracket stays below it. CART's
# correction shrinks as its rank grows, so its λ needs more room: on the vision benchmark rank 25 % peaked at
# λ 25–30 (docs/task_vectors.md)
_CART = {"lambda": (0.05, 50.0), "rank_ratio": (0.005, 0.9)}

#: study methods in table order; grids come from the study plan (``plan.<field>``)
METHODS: dict[str, MethodInfo] = {
    "pretrained": MethodInfo("pretrained (frozen heads)", lambda p: [{}]),
    "weight_averaging": MethodInfo("weight averaging", lambda p: [{}]),
    "task_arithmetic": MethodInfo("task arithmetic", lambda p: _grid(**{"lambda": p.ta_lambdas}), _LAMBDA),
    "ties": MethodInfo("TIES", lambda p: _grid(density=[p.ties_density], **{"lambda": p.ties_lambdas}), _LAMBDA),
    "dare_ties": MethodInfo("DARE-TIES", lambda p: _grid(density=[p.dare_density], normalize=[True],
                                                         **{"lambda": p.dare_lambdas}), _LAMBDA),
    "model_stock": MethodInfo("Model Stock", lambda p: [{}]),
    "fisher": MethodInfo("Fisher", lambda p: [{}]),
    "regmean": MethodInfo("RegMean", lambda p: [{"alpha": p.regmean_alpha}]),
    "cart": MethodInfo("CART", lambda p: _grid(rank_ratio=p.cart_ranks, **{"lambda": p.cart_lambdas}), _CART,
                       ("lambda",)),
    "cart_qkv": MethodInfo("CART, fused q/k/v", lambda p: _grid(rank_ratio=p.cart_ranks,
                                                                 **{"lambda": p.cart_lambdas}), _CART, ("lambda",)),
    "tsv": MethodInfo("TSV-M", lambda p: _grid(**{"lambda": p.svd_lambdas}), _LAMBDA),
    "iso_c": MethodInfo("Iso-C", lambda p: _grid(**{"lambda": p.svd_lambdas}), _LAMBDA),
    "iso_cts": MethodInfo("Iso-CTS", lambda p: _grid(**{"lambda": p.svd_lambdas}), _LAMBDA),
    # the paper's WUDI has no λ (1.0); the study gives it the SVD family's λ grid, chosen on validation like theirs
    "wudi": MethodInfo("WUDI", lambda p: _grid(**{"lambda": p.svd_lambdas}), _LAMBDA),
    # its loss's minimiser instead of 300 Adam steps from the sum (methods/wudi.py says why)
    "wudi_exact": MethodInfo("WUDI, exact minimiser", lambda p: _grid(**{"lambda": p.svd_lambdas}), _LAMBDA),
}
