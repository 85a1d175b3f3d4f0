"""Uniform and greedy soups, greedy ensembles (standard model-soups procedure, strict improvement)."""

from __future__ import annotations

import torch

from mergelab.soups import greedy_ensemble, greedy_select, greedy_soup, uniform_soup


def test_uniform_soup_is_the_mean_and_copies_int_buffers() -> None:
    sds = [{"w": torch.full((2, 2), float(i)), "n": torch.tensor(i)} for i in range(1, 4)]
    soup = uniform_soup(sds)
    torch.testing.assert_close(soup["w"], torch.full((2, 2), 2.0))
    assert int(soup["n"]) == 1  # non-float buffers (BatchNorm counters) come from the first model


def test_greedy_select_order_and_strictness() -> None:
    scores = [0.5, 0.9, 0.7, 0.8]
    table = {(1,): 0.9, (1, 3): 0.95, (1, 3, 2): 0.95, (1, 3, 0): 0.97}
    res = greedy_select(scores, lambda idx: table[tuple(idx)])
    assert res.order == [1, 3, 2, 0]
    assert res.selected == [1, 3, 0] and res.score == 0.97
    assert [h[2] for h in res.history] == [True, True, False, True]
    loose = greedy_select(scores, lambda idx: table.get(tuple(idx), 0.97))
    assert loose.selected == [1, 3, 0]
    non_strict = greedy_select(scores, lambda idx: table.get(tuple(idx), 0.95), strict=False)
    assert non_strict.selected[:3] == [1, 3, 2]  # a tie is kept only when not strict


def test_greedy_soup_never_below_best_single_on_val() -> None:
    target = torch.tensor([1.0, -2.0, 0.5])
    sds = [{"w": target + torch.randn(3, generator=torch.Generator().manual_seed(s))} for s in range(6)]

    def evaluate(sd) -> float:  # type: ignore[no-untyped-def]
        return -float((sd["w"] - target).norm())

    soup, res = greedy_soup(sds, evaluate)
    best_single = max(evaluate(sd) for sd in sds)
    assert res.score >= best_single
    assert evaluate(soup) == res.score
    assert res.selected[0] == max(range(6), key=lambda i: evaluate(sds[i]))


def test_greedy_ensemble_uses_subset_scores() -> None:
    res = greedy_ensemble([0.1, 0.3, 0.2], lambda idx: 0.3 + 0.01 * len(idx))
    assert res.selected == [1, 2, 0]
