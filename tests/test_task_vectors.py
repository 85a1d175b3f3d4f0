"""The task-vector study: CART sweep helper vs cart_merge, and a smoke run on a tiny synthetic suite."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from mergelab.methods import cart_merge
from mergelab.studies.task_vectors import Plan, make_suite, run, run_suite
from mergelab.studies.task_vectors.bench import CartSweep, MergeBench, Params, _beyond, qkv_group
from mergelab.zoo.task_suite import FinetuneRecipe, Task, TaskData, TaskSuite


def _states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(8, 6, generator=g), "b": torch.randn(8, generator=g),
             "frozen": torch.ones(4, 4), "steps": torch.tensor(3)} for _ in range(n)]


@pytest.mark.parametrize(("ratio", "lam"), [(0.0, 1.0), (1 / 6, 1.0), (0.5, 2.5), (1.0, 3.0), (0.34, -0.5)])
def test_cart_sweep_matches_cart_merge(ratio: float, lam: float) -> None:
    states = _states(4)
    merged = CartSweep(states).merge(ratio, lam)
    for name in ("w", "b", "frozen"):
        expected = cart_merge([s[name] for s in states], rank_ratio=ratio, lambda_=lam)
        assert_close(merged[name], expected, atol=1e-5, rtol=1e-5)
    assert merged["steps"] is states[0]["steps"]  # non-float tensors pass through


def test_qkv_group_names_the_attention_layer_of_query_key_value_weights() -> None:
    assert qkv_group("blocks.3.q.weight") == qkv_group("blocks.3.v.weight") == "blocks.3.qkv"
    assert qkv_group("encoder.layer.0.attention.self.key.weight") == "encoder.layer.0.attention.self.qkv"
    for other in ("blocks.3.q.bias", "blocks.3.o.weight", "blocks.3.fc1.weight", "q.weight"):
        assert qkv_group(other) is None


def test_fused_qkv_cart_spends_one_rank_budget_on_the_stacked_matrix() -> None:
    g = torch.Generator().manual_seed(1)
    states = [{"b.q.weight": torch.randn(4, 6, generator=g), "b.k.weight": torch.randn(4, 6, generator=g),
               "b.v.weight": torch.randn(4, 6, generator=g), "b.o.weight": torch.randn(4, 6, generator=g)}
              for _ in range(3)]
    fused = CartSweep(states, qkv_group).merge(1 / 3, 1.5)  # rank round(6 / 3) = 2 of the 12 × 6 stack
    stacked = [torch.cat([s["b.k.weight"], s["b.q.weight"], s["b.v.weight"]]) for s in states]  # name order
    expected = cart_merge(stacked, rank_ratio=1 / 3, lambda_=1.5)
    assert_close(torch.cat([fused["b.k.weight"], fused["b.q.weight"], fused["b.v.weight"]]), expected,
                 atol=1e-5, rtol=1e-5)
    separate = CartSweep(states).merge(1 / 3, 1.5)
    assert_close(fused["b.o.weight"], separate["b.o.weight"])  # not attention q/k/v: merged on its own
    assert not torch.allclose(fused["b.q.weight"], separate["b.q.weight"])  # one budget for three differs


def test_grid_extension_steps_geometrically_past_the_chosen_end() -> None:
    assert _beyond([0.1, 0.2, 0.4], 0.4, 0.01, 20.0) == 0.8
    assert _beyond([0.1, 0.2, 0.4], 0.1, 0.01, 20.0) == 0.05
    assert _beyond([0.1, 0.2, 0.4], 0.2, 0.01, 20.0) is None  # inside: nothing to extend
    assert _beyond([1.0], 1.0, 0.01, 20.0) == 2.0  # one value: doubled
    assert _beyond([0.5, 0.9], 0.9, 0.005, 0.9) is None  # at its limit already
    assert _beyond([0.3, 0.6], 0.6, 0.005, 0.9) == 0.9  # clipped to the limit


# ---- a tiny suite: an MLP encoder on Gaussian blobs, three tasks with different label rules -------------------
class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc2(torch.relu(self.fc1(x))))


class TinySuite(TaskSuite):
    name = "tiny"
    feature_dim = 8
    RULES: ClassVar[dict[str, tuple[int, ...]]] = {"sum": (0, 1), "first": (0,), "last": (5,)}

    def __init__(self, cache: Path, steps: int = 20, seed: int = 3) -> None:
        tasks = tuple(Task(n, 2, f"sign of x[{cols}]") for n, cols in self.RULES.items())
        super().__init__(tasks, FinetuneRecipe(steps=steps, batch_size=16, lr=1e-2, probe_steps=50),
                         seed=seed, cache=cache, show_progress=False)

    def build_encoder(self) -> nn.Module:
        torch.manual_seed(123)  # the "pretrained" weights: a fixed random MLP
        return _Encoder()

    def suite_recipe(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_split(self, task: Task, split: str) -> TaskData:
        seed = 10 * list(self.RULES).index(task.name) + ("train", "val", "test").index(split)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn({"train": 96, "val": 48, "test": 48}[split], 6, generator=g)
        y = (x[:, list(self.RULES[task.name])].sum(1) > 0).long()
        return TaskData(x, y)


def test_tiny_suite_caches_fine_tunes(tmp_path: Path) -> None:
    first = TinySuite(tmp_path).finetuned()
    assert all(ft.history.get("trained_now") for ft in first.values())
    again = TinySuite(tmp_path).finetuned()
    for name, ft in again.items():
        assert not ft.history.get("trained_now")
        assert ft.cache_key == first[name].cache_key
        for k, v in ft.state.items():
            assert torch.equal(v, first[name].state[k])
    task = TinySuite(tmp_path).tasks[0]
    assert TinySuite(tmp_path, steps=21).cache_key(task) != first["sum"].cache_key  # the recipe is in the key


def test_selection_extends_a_grid_until_its_optimum_is_inside(tmp_path: Path) -> None:
    bench = MergeBench(TinySuite(tmp_path))
    tasks = bench.tasks
    best = bench.select("task_arithmetic", tasks, [{"lambda": 0.3}, {"lambda": 0.6}], {"lambda": (0.01, 20.0)})
    tried = sorted(p["lambda"] for p, _ in best.trace)
    assert len(tried) > 2 and tried[0] < best.params["lambda"] < tried[-1]
    assert best.interior == {"lambda": True}
    scores = dict((p["lambda"], v) for p, v in best.trace)
    assert scores[best.params["lambda"]] == max(scores.values())
    # a limit at the grid's end stops the extension; the selection says the optimum may lie beyond it
    capped = bench.select("task_arithmetic", tasks, [{"lambda": 0.01}, {"lambda": 0.02}], {"lambda": (0.01, 0.02)})
    assert sorted(p["lambda"] for p, _ in capped.trace) == [0.01, 0.02]
    assert capped.interior == {"lambda": False}
    plain = bench.select("task_arithmetic", tasks, [{"lambda": 0.3}])  # no bracket: the grid as given
    assert [p for p, _ in plain.trace] == [{"lambda": 0.3}] and plain.interior == {}


class _Ridge:
    """A val score with CART's shape on the vision benchmark: each rank's best λ grows with the rank (here
    λ* = 40·rank), the ridge's height peaks at rank 1/6: f = 100 r − 300 r² − (λ − 40 r)²."""

    select = MergeBench.select

    def score(self, method: str, tasks: Sequence[str], params: Params, split: str) -> dict[str, float]:
        r, lam = params["rank_ratio"], params["lambda"]
        return {"t": 100 * r - 300 * r * r - (lam - 40 * r) ** 2}

    def mean_normalised(self, accs: dict[str, float], split: str) -> float:
        return accs["t"]


def test_bracketing_lambda_in_every_rank_row_finds_the_ridge_that_the_best_point_alone_misses() -> None:
    grid = [{"rank_ratio": r, "lambda": lam} for r in (0.04, 0.08, 0.12, 0.16, 0.25) for lam in (1.0, 2.0, 3.0)]
    bracket = {"lambda": (0.05, 20.0), "rank_ratio": (0.005, 0.9)}
    # at the best grid point (8 %, λ 3: 6.04) λ 4.5 is worse (4.39) and 8 % is inside the rank axis: it stops
    alone = _Ridge().select("cart", ["t"], grid, bracket)
    assert alone.params == {"rank_ratio": 0.08, "lambda": 3.0}
    # every rank's λ extended by ×1.5 steps: 12 % peaks at λ 4.5 (7.59), 16 % at 6.75 (8.19), 25 % at 10.1
    rows = _Ridge().select("cart", ["t"], grid, bracket, bracket_each=("lambda",))
    assert rows.params == {"rank_ratio": 0.16, "lambda": 6.75}
    assert rows.val["t"] == pytest.approx(16 - 7.68 - 0.35 ** 2)
    for r in (0.04, 0.08, 0.12, 0.16, 0.25):
        tried = {p["lambda"]: v for p, v in rows.trace if p["rank_ratio"] == r}
        best = max(tried, key=lambda lam: tried[lam])
        assert min(tried) < best < max(tried), (r, sorted(tried))  # each row's optimum is inside its values
    assert rows.interior == {"lambda": True, "rank_ratio": True}


def test_a_resumed_bench_reuses_an_interrupted_runs_evaluations_and_only_for_the_same_code(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mergelab.studies.task_vectors import bench as bench_module

    grid = [{"lambda": lam} for lam in (0.3, 0.6, 1.0)]
    first = MergeBench(TinySuite(tmp_path), resume=True)
    before = first.select("task_arithmetic", first.tasks, grid)
    right = first.per_example("task_arithmetic", first.tasks, before.params, "test")
    # a new process (a new bench) with the same code merges nothing and gives the same choice, accuracies and
    # per-example correctness
    again = MergeBench(TinySuite(tmp_path), resume=True)
    monkeypatch.setattr(again, "merge", lambda *a, **k: pytest.fail("merged again instead of resuming"))
    after = again.select("task_arithmetic", again.tasks, grid)
    assert (after.params, after.val, after.test, after.trace) == (before.params, before.val, before.test, before.trace)
    for t, r in again.per_example("task_arithmetic", again.tasks, after.params, "test").items():
        assert torch.equal(r, right[t])
    # changed code (another fingerprint) or resume off: evaluated afresh
    monkeypatch.setattr(bench_module, "code_fingerprint", lambda: "other code")
    for bench in (MergeBench(TinySuite(tmp_path), resume=True), MergeBench(TinySuite(tmp_path))):
        merged: list[str] = []
        real = bench.merge
        monkeypatch.setattr(bench, "merge", lambda m, *a, real=real, seen=merged: seen.append(m) or real(m, *a))
        assert bench.select("task_arithmetic", bench.tasks, grid).params == before.params
        assert len(merged) == len(grid) + 1  # every point on val, and the chosen one on test


def test_study_smoke_on_tiny_suite(tmp_path: Path) -> None:
    plan = Plan(ta_lambdas=(0.3, 1.0), ties_lambdas=(1.0,), dare_lambdas=(1.0,), cart_ranks=(0.25, 0.5),
                cart_lambdas=(1.0, 2.0), interference_ratios=(0.25, 0.5, 1.0), scaling_subsets=1,
                scaling_cart_ranks=(0.25,), scaling_cart_lambdas=(1.0,), fisher_examples=8, gram_examples=32)
    report = run_suite(tmp_path / "out", TinySuite(tmp_path / "cache"), plan, quick=True, seed=5)
    out = report.parent
    html = report.read_text()
    assert html.count("data:image/png;base64") == 4
    for fig in ("methods", "cart_rank_sweep", "interference", "scaling"):
        assert (out / f"{fig}.png").stat().st_size > 1000
    with (out / "methods.csv").open() as f:
        rows = list(csv.DictReader(f))
    names = [r["method"] for r in rows]
    for label in ("individual fine-tuned", "pretrained (frozen heads)", "weight averaging", "task arithmetic",
                  "TIES", "DARE-TIES", "Model Stock", "Fisher", "RegMean", "CART", "CART, fused q/k/v", "TSV-M",
                  "Iso-C", "Iso-CTS", "WUDI", "WUDI, exact minimiser", "logit ensemble (reference)"):
        assert label in names
    individual = next(r for r in rows if r["method"] == "individual fine-tuned")
    assert float(individual["test norm. acc (%)"]) == pytest.approx(100.0)
    record = json.loads((out / "mergelab.json").read_text())
    assert record["seed"] == 5 and record["suite"]["seed"] == 3
    assert set(record["selected"]) >= {"cart", "task_arithmetic"}
    assert record["selected"]["cart"]["params"]["rank_ratio"] in (0.25, 0.5)
    with (out / "scaling.csv").open() as f:
        ts = {int(r["T"]) for r in csv.DictReader(f)}
    assert ts == {2, 3}
    with (out / "cart_sweep.csv").open() as f:
        sweep = list(csv.DictReader(f))
    # ratios 0 and 1 are weight averaging for every λ
    ends = {round(float(r["val_norm_acc"]), 9) for r in sweep if float(r["rank_ratio"]) in (0.0, 1.0)}
    assert len(ends) == 1
    for stem in ("tasks", "regime", "methods", "per_task_accuracy", "cart_sweep", "interference", "scaling_summary"):
        assert (out / f"{stem}.md").exists()
    # CART vs each baseline: a paired bootstrap over every task's test examples, centred on the table's gap
    md = (out / "report.md").read_text()
    norm = {r["method"]: float(r["test norm. acc (%)"]) for r in rows}
    for label in ("task arithmetic", "weight averaging"):
        line = next(x for x in md.splitlines() if f"CART beats {label}" in x)
        assert "paired bootstrap CI over" in line
        point = float(re.search(r"difference ([+-]\d+\.\d)", line).group(1))  # type: ignore[union-attr]
        assert point == pytest.approx(norm["CART"] - norm[label], abs=0.051)


def test_study_over_seeds_averages_them_and_gates_verdicts_on_the_regime(tmp_path: Path) -> None:
    plan = Plan(ta_lambdas=(0.3, 1.0), ties_lambdas=(1.0,), dare_lambdas=(1.0,), cart_ranks=(0.25,),
                cart_lambdas=(1.0,), svd_lambdas=(1.0,), interference_ratios=(0.5, 1.0), scaling_ts=(3,),
                fisher_examples=8, gram_examples=32, n_seeds=2, parallel_seeds=2)
    suites = [TinySuite(tmp_path / "cache", seed=s) for s in (3, 4)]
    report = run_suite(tmp_path / "out", suites, plan, quick=True)
    out = report.parent
    # seeds evaluated in two threads give the numbers of one after the other
    serial = run_suite(tmp_path / "serial", [TinySuite(tmp_path / "cache", seed=s) for s in (3, 4)],
                       dataclasses.replace(plan, parallel_seeds=1, resume=False), quick=True).parent
    for table in ("methods", "cart_sweep", "interference", "scaling", "regime"):
        assert (out / f"{table}.csv").read_text() == (serial / f"{table}.csv").read_text()
    record = json.loads((out / "mergelab.json").read_text())
    assert set(record["selected_per_seed"]) == {"3", "4"}
    with (out / "regime.csv").open() as f:
        regime = {r["check"]: r for r in csv.DictReader(f)}
    gating = [r for r in regime.values() if r["result"] != "information"]
    assert len(gating) == 3 and len(regime) == 5
    assert record["in_regime"] == all(r["result"] == "passed" for r in gating)
    md = (out / "report.md").read_text()
    line = next(x for x in md.splitlines() if "CART beats task arithmetic" in x)
    assert ("outside the papers' regime" in line) != record["in_regime"]
    assert "and 2 seeds" in line  # the CI resamples seeds as well as examples
    with (out / "methods.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    # the table's mean is the mean of the two seeds' own normalised accuracies
    benches = [MergeBench(s) for s in suites]
    ta = [b.mean_normalised(b.score("task_arithmetic", b.tasks, record["selected_per_seed"][str(s.seed)]
                                    ["task_arithmetic"], "test"), "test") for b, s in zip(benches, suites)]
    assert float(rows["task arithmetic"]["test norm. acc (%)"]) == pytest.approx(sum(ta) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="same tasks"):
        run_suite(tmp_path / "bad", [TinySuite(tmp_path / "cache"), _OtherTasks(tmp_path / "cache")], plan)


class _OtherTasks(TinySuite):
    RULES: ClassVar[dict[str, tuple[int, ...]]] = {"sum": (0, 1)}


def test_unknown_suite_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown suite 'audio'"):
        run(tmp_path, suite="audio")
    with pytest.raises(ValueError, match="unknown suite"):
        make_suite("audio", quick=True, seed=0)


def test_make_suite_quick_is_smaller_and_lazy() -> None:
    # building the suites loads no data and no model (the text backbone is imported on first use)
    for name in ("vision", "text"):
        quick_suite, quick_plan = make_suite(name, quick=True, seed=1)
        full_suite, full_plan = make_suite(name, quick=False, seed=1)
        assert quick_suite.seed == 1 and quick_suite.name == name
        assert len(quick_suite.tasks) <= len(full_suite.tasks)
        assert quick_suite.recipe.steps < full_suite.recipe.steps
        assert len(quick_plan.cart_ranks) * len(quick_plan.cart_lambdas) < \
            len(full_plan.cart_ranks) * len(full_plan.cart_lambdas)
        assert not quick_suite._data


def test_verdicts_follow_the_numbers_and_the_regime_gates_them() -> None:
    from mergelab.analysis.interference import CurvePoint
    from mergelab.studies.task_vectors.study import OUTSIDE, _verdicts
    from mergelab.studies.verdict import NO_DIFFERENCE, Difference

    def point(centred: bool, ratio: float, value: float) -> CurvePoint:
        return CurvePoint(centred, ratio, value, value / 2, value / 4, 0.5, 1.0, 3)

    curve = [point(False, 0.1, 2.0), point(True, 0.1, 1.0), point(False, 0.5, 2.0), point(True, 0.5, 3.0)]
    norm = {"cart": 90.0, "task_arithmetic": 85.0, "weight_averaging": 91.0, "tsv": 88.0, "iso_c": 84.0,
            "iso_cts": 86.0}
    peak = {"rank_ratio": 0.08, "lambda": 1.0, "val_norm_acc": 93.0, "test_norm_acc": 92.0, "wa_val": 90.0}
    # CART vs task arithmetic resolved (CI above 0); vs weight averaging −1 point with a CI across 0
    diffs = {("cart", "task_arithmetic"): Difference(5.0, 2.0, 8.0, 400),
             ("cart", "weight_averaging"): Difference(-1.0, -3.0, 1.0, 400),
             ("tsv", "task_arithmetic"): Difference(3.0, 1.0, 5.0, 400),
             ("iso_c", "task_arithmetic"): Difference(-1.0, -2.0, -0.5, 400),
             ("iso_cts", "task_arithmetic"): Difference(1.0, -1.0, 3.0, 400)}
    v = _verdicts(norm, peak, curve, diffs)
    assert [x.held for x in v] == [True, None, True, False, None, True, None]
    assert v[1].word == NO_DIFFERENCE and "-1.0 [-3.0, +1.0]" in v[1].detail
    assert v[2].claim == "TSV-M beats task arithmetic" and "92.3" in v[2].paper
    lost = _verdicts(norm, peak, curve, {**diffs, ("cart", "weight_averaging"): Difference(-4.0, -6.0, -2.0, 400)})
    assert lost[1].held is False
    assert [x.held for x in _verdicts(norm, {**peak, "val_norm_acc": 90.5}, curve, diffs)][5] is None  # < 1 point
    assert [x.held for x in _verdicts(norm, {**peak, "rank_ratio": 0.5}, curve, diffs)][5] is False  # peak not low
    assert _verdicts(norm, None, curve, diffs)[5].held is None
    # a failed regime check leaves every method comparison and the bell without a verdict, numbers still shown
    gated = _verdicts(norm, peak, curve, diffs, outside="task arithmetic leaves room to improve")
    assert [x.held for x in gated[:6]] == [None] * 6
    assert all(x.word == OUTSIDE for x in gated[:6])
    assert "+5.0 [+2.0, +8.0]" in gated[0].detail and "leaves room" in gated[0].detail
    assert gated[6].held is None and gated[6].word == "mixed"  # I(k) is a property of the weights, not gated


def test_task_vector_search_beats_or_matches_its_start_and_reproduces(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from mergelab.studies.task_vectors import search as tvs
    from mergelab.studies.task_vectors.bench import MergeBench

    bench = MergeBench(TinySuite(tmp_path / "cache"), seed=0)
    monkeypatch.setattr(tvs, "_bench", lambda suite, quick, seed: bench)  # in-process executor sees it
    report = tvs.run(tmp_path / "out", suite="vision", quick=True, executor="local:0", generations=2,
                     population=4, lambdas=(0.3, 1.0), show_progress=False)
    out = report.parent
    record = json.loads((out / "search" / "search.json").read_text())
    assert record["reproduced_bitwise"] is True and record["evaluations"] == 1 + 2 * 4
    assert record["best"]["score"] >= record["initial"]["score"]
    with (out / "results.csv").open() as f:
        _pretrained, hand, start, found = list(csv.DictReader(f))
    assert "hand-tuned" in hand["method"] and "CMA-ES" in found["method"]
    # the search starts from the hand-tuned merge: same validation score through both paths
    assert float(start["val"]) == pytest.approx(float(hand["val"]), abs=1e-9)
    assert "data:image/png;base64" in report.read_text()
    # the verdict is a paired bootstrap over the test examples whose point estimate is the table's test gain
    md = (out / "report.md").read_text()
    n_test = sum(len(bench.suite.data(t, "test")) for t in bench.tasks)
    assert f"paired bootstrap CI over {n_test} test examples" in md
    point = float(re.search(r"difference ([+-]\d+\.\d)", md).group(1))  # type: ignore[union-attr]
    assert point == pytest.approx(float(found["test"]) - float(hand["test"]), abs=0.051)


def test_every_study_method_has_its_own_colour() -> None:
    from mergelab.studies.task_vectors.bench import METHODS
    from mergelab.studies.task_vectors.plots import COLORS

    shown = [*METHODS, "logit_ensemble"]
    assert set(shown) <= set(COLORS)
    assert len({COLORS[n] for n in shown}) == len(shown)
