"""Golden tests for the data-aware methods against their closed forms, and the statistics helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mergelab
from mergelab.methods import fisher_merge, regmean_merge
from mergelab.statistics import diagonal_fisher, input_grams


def test_regmean_of_one_model_is_that_model() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 5)
    x = torch.randn(40, 5)
    assert torch.allclose(regmean_merge([w], [x.T @ x], alpha=0.7), w, atol=1e-5)


def test_regmean_with_identical_grams_is_the_average() -> None:
    torch.manual_seed(1)
    ws = [torch.randn(4, 6) for _ in range(3)]
    x = torch.randn(100, 6)
    g = x.T @ x
    assert torch.allclose(regmean_merge(ws, [g, g, g], alpha=0.9), sum(ws) / 3, atol=1e-5)


def test_regmean_is_the_least_squares_solution() -> None:
    """With α = 1 the merged W minimises Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖², so its gradient there is zero."""
    torch.manual_seed(2)
    ws = [torch.randn(2, 4, dtype=torch.float64) for _ in range(2)]
    xs = [torch.randn(30, 4, dtype=torch.float64) * s for s in (1.0, 3.0)]
    merged = regmean_merge(ws, [x.T @ x for x in xs], alpha=1.0)
    grad = sum(x.T @ (x @ merged.T - x @ w.T) for x, w in zip(xs, ws))
    assert grad.abs().max() < 1e-9
    # and it is not simply the average (the second model's inputs are larger)
    assert (merged - (ws[0] + ws[1]) / 2).abs().max() > 1e-3


def test_regmean_alpha_zero_is_a_per_column_weighted_average() -> None:
    """α = 0 keeps only diag G, so each input column j averages W_i[:, j] weighted by G_i[j, j]."""
    ws = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0]])]
    grams = [torch.tensor([[1.0, 5.0], [5.0, 1.0]]), torch.tensor([[3.0, 7.0], [7.0, 1.0]])]
    merged = regmean_merge(ws, grams, alpha=0.0)
    expected = torch.tensor([[(1 * 1 + 3 * 3) / 4, (2 * 1 + 6 * 1) / 2]])
    assert torch.allclose(merged, expected)


def test_regmean_averages_tensors_without_grams() -> None:
    bs = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
    assert torch.equal(regmean_merge(bs, [None, None]), torch.tensor([2.0, 3.0]))


def test_fisher_merge_by_hand() -> None:
    a, b = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([3.0, 6.0, 0.0])
    fa, fb = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([1.0, 4.0, 2.0])
    merged = fisher_merge([a, b], [fa, fb], eps=0.0 + 1e-12)
    assert torch.allclose(merged, torch.tensor([2.0, 6.0, 2.0]), atol=1e-6)
    # model weights multiply the Fisher: w = (3, 1) on the first entry gives (3·1 + 1·3)/4
    merged = fisher_merge([a, b], [fa, fb], [3.0, 1.0])
    assert torch.isclose(merged[0], torch.tensor(1.5))


def test_fisher_with_zero_information_everywhere_is_the_average() -> None:
    a, b = torch.tensor([1.0]), torch.tensor([5.0])
    assert torch.allclose(fisher_merge([a, b], [torch.zeros(1), torch.zeros(1)]), torch.tensor([3.0]))


def _data(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 5, generator=g)
    return [(x[:12], torch.randint(0, 3, (12,), generator=g)), (x[12:], torch.randint(0, 3, (12,), generator=g))]


def test_input_grams_of_a_linear_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    data = _data(0)
    grams = input_grams(model, data)
    x = torch.cat([b[0] for b in data])
    assert set(grams) == {"0.weight", "2.weight"}
    assert torch.allclose(grams["0.weight"], (x.T @ x) / len(x), atol=1e-5)
    h = torch.relu(model[0](x))
    assert torch.allclose(grams["2.weight"], (h.T @ h) / len(x), atol=1e-5)


def test_diagonal_fisher_of_logistic_regression_matches_closed_form() -> None:
    """For softmax regression the true Fisher of W is E_x[(diag(p) − p pᵀ)_kk x_j²] = E_x[p_k(1−p_k) x_j²]."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3, bias=False)
    data = _data(1)
    # the sampled-label Fisher converges to the closed form; with many samples per x it is close
    repeated = [(x.repeat(200, 1), y.repeat(200)) for x, y in data]
    fisher = diagonal_fisher(model, repeated, seed=0)["weight"]
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)
    expected = ((p * (1 - p)).T @ (x**2)) / len(x)
    assert torch.allclose(fisher, expected, rtol=0.15, atol=1e-3)


def test_fisher_and_regmean_through_merge_state_dicts() -> None:
    torch.manual_seed(3)
    models = [nn.Linear(5, 3) for _ in range(2)]
    data = [_data(10), _data(11)]
    grams = [input_grams(m, d) for m, d in zip(models, data)]
    sds = [m.state_dict() for m in models]
    stats = {"weight": [g["weight"] for g in grams]}
    merged = mergelab.merge_state_dicts(sds, "regmean", stats=stats, parameters={"alpha": 1.0})
    expected = regmean_merge([sd["weight"] for sd in sds], stats["weight"], alpha=1.0)
    assert torch.allclose(merged["weight"], expected)
    assert torch.allclose(merged["bias"], (sds[0]["bias"] + sds[1]["bias"]) / 2)
    fishers = [diagonal_fisher(m, d, seed=1) for m, d in zip(models, data)]
    merged = mergelab.merge_state_dicts(sds, "fisher", stats={k: [f[k] for f in fishers] for k in sds[0]})
    assert torch.allclose(merged["bias"], fisher_merge([sd["bias"] for sd in sds], [f["bias"] for f in fishers]))
    with pytest.raises(ValueError, match="needs per-model statistics"):
        mergelab.merge_state_dicts(sds, "fisher")


def test_data_aware_methods_are_refused_from_yaml(families: dict, tmp_path) -> None:  # type: ignore[type-arg]
    from mergelab.errors import CompatibilityError

    _, fts = families["gpt2"]
    config = {"merge_method": "regmean", "models": [{"model": str(p)} for p in fts]}
    with pytest.raises(CompatibilityError, match="needs statistics of each model"):
        mergelab.merge(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
