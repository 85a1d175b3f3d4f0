"""The synthetic golden test of issue 17: task vectors = shared component + low-rank task parts + noise, and
tasks that read different input directions (CART's regime by construction, exact losses). CART must beat
task arithmetic and weight averaging by a clear margin, and centring must lower the row-space interference
I(k); outside the regime (isotropic inputs) weight averaging must win, so the test can tell them apart."""

from __future__ import annotations

import pytest
import torch

from mergelab import merge_state_dicts
from mergelab.analysis.synthetic import GRIDS, WEIGHT, make_synthetic_tasks, score_methods


@pytest.fixture(scope="module", params=[0, 1, 2], ids=lambda s: f"seed{s}")
def scored(request: pytest.FixtureRequest) -> tuple[object, dict[str, object]]:
    problem = make_synthetic_tasks(seed=request.param)
    return problem, {s.method: s for s in score_methods(problem)}


def test_loss_is_exact_and_zero_at_each_fine_tune() -> None:
    p = make_synthetic_tasks(tasks=3, seed=5)
    for t, ft in enumerate(p.finetuned):
        assert p.loss(ft, t) == 0.0
    # Monte-Carlo check of the closed form on task 0: E‖(W − W_0) x + (b − b_0)‖², x = C z
    g = torch.Generator().manual_seed(0)
    z = torch.randn(p.inputs[0].shape[1], 200_000, generator=g, dtype=torch.float64)
    err = (p.base[WEIGHT] - p.finetuned[0][WEIGHT]) @ (p.inputs[0] @ z)
    err += (p.base["layer.bias"] - p.finetuned[0]["layer.bias"])[:, None]
    assert float((err ** 2).sum(0).mean()) == pytest.approx(p.loss(p.base, 0), rel=0.02)


def test_the_regime_holds(scored: tuple) -> None:
    problem, _ = scored
    # the shared component dominates the task vectors (≈ 1/T = 0.17 if they were independent)
    assert problem.shared_fraction() > 0.7


def test_centring_lowers_row_space_interference(scored: tuple) -> None:
    problem, _ = scored
    uncentred, centred = problem.interference(centred=False), problem.interference(centred=True)
    # measured: 14.2–14.5 uncentred, 4.3–4.4 centred (of at most T(T−1) = 30)
    assert centred < 0.5 * uncentred


def test_cart_beats_task_arithmetic_and_weight_averaging(scored: tuple) -> None:
    _, s = scored
    cart, ta, avg = s["cart"], s["task_arithmetic"], s["average"]
    # measured mean relative loss: CART 0.15–0.16, task arithmetic 0.44–0.47, average 0.47–0.49
    assert cart.loss < 0.5 * min(ta.loss, avg.loss)
    # each at its best λ strictly inside its grid, so the comparison is not an artefact of a short grid
    assert cart.inside_grid and ta.inside_grid


def test_svd_family_methods_sit_between(scored: tuple) -> None:
    # what TSV-M and Iso do here (reported, and held to it): TSV-M and Iso-C beat both baselines but not CART;
    # Iso-CTS stays near the baselines (its common subspace is the shared component, its task slots small)
    _, s = scored
    baseline = min(s["task_arithmetic"].loss, s["average"].loss)
    for name in ("tsv", "iso_c"):
        assert s["cart"].loss < s[name].loss < 0.8 * baseline, name
        assert s[name].inside_grid, name
    assert s["iso_cts"].loss > s["iso_c"].loss


def test_outside_the_regime_weight_averaging_wins() -> None:
    # isotropic inputs: every task reads every direction, so the average (which minimises the summed loss)
    # is the right merge and CART's low-rank terms only add other tasks' parts
    p = make_synthetic_tasks(focus=0.0, seed=0)
    s = {x.method: x for x in score_methods(p, methods=("cart",))}
    assert s["average"].loss < s["cart"].loss


def test_cart_at_default_lambda_is_already_in_the_lead() -> None:
    p = make_synthetic_tasks(seed=0)
    ratio = p.task_rank / p.base[WEIGHT].shape[1]
    cart = p.mean_relative_loss(merge_state_dicts(p.finetuned, "cart", parameters={"rank_ratio": ratio}))
    ta = min(p.mean_relative_loss(merge_state_dicts(p.finetuned, "task_arithmetic", base=p.base,
                                                    parameters={"lambda": lam}))
             for lam in GRIDS["task_arithmetic"])
    assert cart < 0.5 * ta
