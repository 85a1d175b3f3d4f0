"""Verdict rules: a difference counts only beyond its bootstrap CI; identities and theorems are checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergelab.studies.verdict import (
    NO_DIFFERENCE,
    Difference,
    check,
    claim_verdict,
    compare,
    difference_verdict,
    paired_difference,
    tasks_difference,
)


def _correct(acc: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(n) < acc).astype(float)


def test_identical_predictions_give_a_zero_width_interval() -> None:
    a = _correct(0.8, 500, 0)
    d = paired_difference(a, a)
    assert d.mean == d.low == d.high == 0.0 and compare(d) == "tie"


def test_difference_is_in_points_and_its_interval_covers_the_mean() -> None:
    a = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1], dtype=float)  # 60 %
    b = np.array([1, 1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=float)  # 40 %
    d = paired_difference(torch.tensor(a), torch.tensor(b))
    assert d.mean == pytest.approx(20.0) and d.low <= 20.0 <= d.high and d.n_examples == 10


def test_a_few_points_on_a_small_test_set_are_not_resolved_but_are_on_a_large_one() -> None:
    small_a, small_b = _correct(0.82, 100, 1), _correct(0.80, 100, 2)
    large_a = np.concatenate([np.ones(9000), np.zeros(1000)])  # 90 %
    large_b = large_a.copy()
    large_b[:300] = 0  # 87 %: wrong where A is right, 300 of 10,000 examples
    assert compare(paired_difference(large_a, large_b)) == "better"
    assert compare(paired_difference(large_b, large_a)) == "worse"
    assert compare(paired_difference(small_a, small_b)) == "tie"


def test_seeds_widen_the_interval_when_they_disagree() -> None:
    a = np.stack([_correct(0.9, 400, s) for s in range(3)])
    b_same = np.stack([_correct(0.9, 400, s + 10) for s in range(3)])
    b_mixed = np.stack([np.zeros(400), np.ones(400), _correct(0.9, 400, 99)])
    narrow, wide = paired_difference(a, b_same), paired_difference(a, b_mixed)
    assert wide.n_seeds == 3 and (wide.high - wide.low) > (narrow.high - narrow.low)


def test_claim_held_only_when_most_differences_are_resolved_in_its_direction() -> None:
    win, tie, loss = Difference(5, 2, 8, 1000), Difference(1, -2, 4, 100), Difference(-5, -8, -2, 1000)
    assert claim_verdict("A beats B", [win, win, win, tie], paper="Tab. 1").held is True
    lost = claim_verdict("A beats B", [loss, loss, loss, win])
    assert lost.held is False and lost.word == "did not hold"
    small = claim_verdict("A beats B", [tie, tie, tie, win])
    assert small.held is None and small.word == NO_DIFFERENCE
    mixed = claim_verdict("A beats B", [win, win, loss, tie])
    assert mixed.held is None and mixed.word == "mixed"
    assert "Tab. 1" in claim_verdict("A beats B", [win], paper="Tab. 1").paper
    assert claim_verdict("A beats B", []).held is None


def test_identities_are_checks_not_claims() -> None:
    ok = check("linear soup = logit ensemble", 4, 4)
    bad = check("averaging bound", 3, 4)
    assert ok.kind == bad.kind == "check" and ok.held is True and bad.held is False
    assert ok.word == "check passed" and "4/4" in ok.detail


def test_task_averaged_difference_weighs_tasks_and_resamples_within_each() -> None:
    a = {"t1": torch.tensor([1, 1, 1, 1]), "t2": torch.tensor([1.0, 0.0])}
    b = {"t1": torch.tensor([0, 0, 1, 1]), "t2": torch.tensor([1.0, 0.0])}
    assert tasks_difference(a, b).mean == pytest.approx(25.0)  # (0.5 + 0) / 2 tasks, in points
    assert tasks_difference(a, b, scale={"t1": 2.0, "t2": 1.0}).mean == pytest.approx(50.0)
    # a 2-example task always right vs a 1,000-example one never: stratified resampling keeps each task's
    # weight, so every draw is exactly (1 + 0) / 2 (pooling the examples would give a wide interval near 0)
    d = tasks_difference({"small": np.ones(2), "large": np.zeros(1000)},
                         {"small": np.zeros(2), "large": np.zeros(1000)})
    assert d.mean == d.low == d.high == 50.0 and d.n_examples == 1002
    with pytest.raises(ValueError, match="same tasks"):
        tasks_difference({"t1": np.ones(2)}, {"t2": np.ones(2)})


def test_one_comparison_holds_only_beyond_its_interval() -> None:
    held = difference_verdict("A beats B", Difference(3.0, 1.0, 5.0, 800), context="A 80 % vs B 77 %")
    assert held.held is True and held.detail.startswith("A 80 % vs B 77 %; difference +3.0 [+1.0, +5.0]")
    assert "800 test examples" in held.detail
    assert difference_verdict("A beats B", Difference(-3.0, -5.0, -1.0, 800)).word == "did not hold"
    assert difference_verdict("A beats B", Difference(1.0, -1.0, 3.0, 800)).word == NO_DIFFERENCE


def test_task_averaged_difference_over_seeds_weighs_each_seed_by_its_own_scale() -> None:
    # two seeds of one task: seed 0 gains 2 of 4 examples, seed 1 gains 0 of 4; normalised scales 2 and 1
    a = {"t": np.array([[1, 1, 1, 1], [1, 0, 1, 0]])}
    b = {"t": np.array([[1, 1, 0, 0], [1, 0, 1, 0]])}
    d = tasks_difference(a, b, scale={"t": [2.0, 1.0]})
    assert d.mean == pytest.approx(100 * (2 * 0.5 + 1 * 0.0) / 2) and d.n_seeds == 2 and d.n_examples == 4
    # resampling the seeds: a draw of seed 1 twice gives 0, of seed 0 twice at most 2 · 4/4 · 100 = 200
    assert 0.0 <= d.low <= d.mean <= d.high <= 200.0 and d.low < d.high
    one_seed = tasks_difference({"t": a["t"][:1]}, {"t": b["t"][:1]}, seed=3)
    assert one_seed == tasks_difference({"t": a["t"][0]}, {"t": b["t"][0]}, seed=3)  # (1, n) is the one-seed case
    with pytest.raises(ValueError, match="3 scales for 2 seeds"):
        tasks_difference(a, b, scale={"t": [1.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match="same number of seeds"):
        tasks_difference({**a, "u": np.ones(4)}, {**b, "u": np.zeros(4)})
