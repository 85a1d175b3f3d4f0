"""Side-by-side checks against mergekit 0.1.5 (a dev dependency, never a runtime one) on random tensors.

Only deterministic settings: DARE's random masks come from different generators, so it is compared at
density 1 only. Random float tensors have no magnitude ties, so top-k masks agree exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mergelab.methods import (
    breadcrumbs_merge,
    dare_merge,
    linear_merge,
    model_stock_merge,
    slerp_merge,
    task_arithmetic_merge,
    ties_merge,
)

registry = pytest.importorskip("mergekit.merge_methods.registry")
TensorGroup = pytest.importorskip("mergekit.merge_methods.base").TensorGroup

G = torch.Generator().manual_seed(42)
BASE = torch.randn(6, 10, generator=G)
MODELS = [BASE + 0.5 * torch.randn(6, 10, generator=G) for _ in range(3)]
W = [0.7, 1.3, 0.4]


def _mk(name: str, tensors: list[torch.Tensor], base: torch.Tensor | None, **params: object) -> torch.Tensor:
    inputs = ([base] if base is not None else []) + tensors
    group = TensorGroup.from_tensors(inputs, base_index=0 if base is not None else None)
    offset = 1 if base is not None else 0
    resolved = {k: ({i + offset: x for i, x in enumerate(v)} if isinstance(v, list) else v)
                for k, v in params.items()}
    return registry.get(name)([group], parameters=resolved)[0]


def test_linear() -> None:
    assert_close(linear_merge(MODELS, W), _mk("linear", MODELS, None, weight=W))
    assert_close(linear_merge(MODELS, W, normalize=False),
                 _mk("linear", MODELS, None, weight=W, normalize=False))


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(normalize: bool) -> None:
    assert_close(task_arithmetic_merge(BASE, MODELS, W, lambda_=0.8, normalize=normalize),
                 _mk("task_arithmetic", MODELS, BASE, weight=W, normalize=normalize, **{"lambda": 0.8}))


@pytest.mark.parametrize(("densities", "normalize"), [([0.3, 0.5, 0.9], True), ([0.2, 0.2, 1.0], False)])
def test_ties(densities: list[float], normalize: bool) -> None:
    ours = ties_merge(BASE, MODELS, W, densities, normalize=normalize, lambda_=1.5)
    theirs = _mk("ties", MODELS, BASE, weight=W, density=densities, normalize=normalize, **{"lambda": 1.5})
    assert_close(ours, theirs)


@pytest.mark.parametrize(("name", "consensus"), [("breadcrumbs", None), ("breadcrumbs_ties", "sum")])
def test_breadcrumbs(name: str, consensus: str | None) -> None:
    dens, gam = [0.5, 0.3, 0.8], [0.1, 0.05, 0.15]
    ours = breadcrumbs_merge(BASE, MODELS, W, dens, gam, consensus=consensus)  # type: ignore[arg-type]
    assert_close(ours, _mk(name, MODELS, BASE, weight=W, density=dens, gamma=gam))


@pytest.mark.parametrize(("name", "consensus"), [("dare_linear", None), ("dare_ties", "sum")])
def test_dare_density_one(name: str, consensus: str | None) -> None:
    ours = dare_merge(BASE, MODELS, W, [1.0] * 3, seed=0, consensus=consensus)  # type: ignore[arg-type]
    assert_close(ours, _mk(name, MODELS, BASE, weight=W, density=[1.0] * 3))


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp(t: float) -> None:
    assert_close(slerp_merge(t, BASE, MODELS[0]), _mk("slerp", [MODELS[0]], BASE, t=t))


@pytest.mark.parametrize(("n", "filter_wise"), [(2, False), (3, False), (3, True)])
def test_model_stock(n: int, filter_wise: bool) -> None:
    assert_close(model_stock_merge(BASE, MODELS[:n], filter_wise=filter_wise),
                 _mk("model_stock", MODELS[:n], BASE, filter_wise=filter_wise))
