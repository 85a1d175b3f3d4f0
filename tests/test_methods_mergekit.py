"""Side-by-side checks against mergekit 0.1.5 (a dev dependency, never a runtime one) on random tensors.

Only deterministic settings: DARE's random masks come from different generators, so it is compared at
density 1 only; DELLA is compared with mergekit's ``torch.bernoulli`` fed our seeded draws. Random float
tensors have no magnitude ties, so top-k masks agree exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mergelab.methods import (
    arcee_fusion_merge,
    breadcrumbs_merge,
    dare_merge,
    della_merge,
    karcher_merge,
    linear_merge,
    model_stock_merge,
    multislerp_merge,
    nearswap_merge,
    nuslerp_merge,
    sce_merge,
    slerp_merge,
    task_arithmetic_merge,
    ties_merge,
)
from mergelab.methods.sparsify import generator_for

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


HALF = (torch.float16, torch.bfloat16)


def _exact(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs), (ours.double() - theirs.double()).abs().max().item()


@pytest.mark.parametrize("shape", [(6, 10), (17,), (4, 3, 5)])
@pytest.mark.parametrize(("name", "consensus", "normalize"), [("della", "sum", True), ("della_linear", None, False)])
def test_della_with_our_coins(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], name: str,
                              consensus: str | None, normalize: bool) -> None:
    # mergekit flips torch.bernoulli(p) per model in model order; fed our per-model generators, it must draw
    # the same masks: same keep probabilities (rows = dim 1, 1-D as one row), same coin rule u < p
    g = torch.Generator().manual_seed(5)
    base = torch.randn(*shape, generator=g)
    models = [base + 0.5 * torch.randn(*shape, generator=g) for _ in range(3)]
    dens, eps, seed = [0.3, 0.5, 0.8], [0.1, 0.2, 0.15], 123
    gens = iter([generator_for(seed, i) for i in range(3)])
    monkeypatch.setattr(torch, "bernoulli",
                        lambda p: (torch.rand(p.shape, generator=next(gens), dtype=torch.float32) < p).to(p.dtype))
    theirs = _mk(name, models, base, weight=W, density=dens, epsilon=eps, **{"lambda": 1.3})
    monkeypatch.undo()
    ours = della_merge(base, models, W, dens, eps, seed=seed, consensus=consensus, normalize=normalize,  # type: ignore[arg-type]
                       lambda_=1.3, rescale_mode="l1")
    _exact(ours, theirs)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("name", "consensus", "normalize"), [("della", "sum", True), ("della_linear", None, False)])
def test_della_in_half_precision_same_bits(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, name: str,
                                           consensus: str | None, normalize: bool) -> None:
    # computed in the half dtype (the config's): ties among half-precision magnitudes ranked by mergekit's
    # argsort, bf16 probabilities, float16 rescaled in float32 — the same bits as mergekit
    base, models = HALF_BASE.to(dtype), [m.to(dtype) for m in HALF_MODELS]
    dens, eps = [0.4, 0.5, 0.6], [0.2, 0.3, 0.1]
    gens = iter([generator_for(9, i) for i in range(3)])
    monkeypatch.setattr(torch, "bernoulli",
                        lambda p: (torch.rand(p.shape, generator=next(gens), dtype=torch.float32) < p).to(p.dtype))
    theirs = _mk(name, models, base, weight=W, density=dens, epsilon=eps)
    monkeypatch.undo()
    _exact(della_merge(base, models, W, dens, eps, seed=9, consensus=consensus, normalize=normalize,  # type: ignore[arg-type]
                       rescale_mode="l1", dtype=dtype), theirs)


@pytest.mark.parametrize("dtype", HALF)
def test_della_half_inputs_without_dtype_match_mergekit_in_float32(monkeypatch: pytest.MonkeyPatch,
                                                                   dtype: torch.dtype) -> None:
    # Without a dtype our task-vector core computes in float32, so we equal mergekit run on the float32
    # copies, rounded.
    base, models = BASE.to(dtype), [m.to(dtype) for m in MODELS]
    dens, eps = [0.4, 0.5, 0.6], [0.2, 0.2, 0.2]
    gens = iter([generator_for(9, i) for i in range(3)])
    monkeypatch.setattr(torch, "bernoulli",
                        lambda p: (torch.rand(p.shape, generator=next(gens), dtype=torch.float32) < p).to(p.dtype))
    theirs = _mk("della", [m.float() for m in models], base.float(), weight=W, density=dens, epsilon=eps)
    monkeypatch.undo()
    _exact(della_merge(base, models, W, dens, eps, seed=9, rescale_mode="l1"), theirs.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("shape", [(6, 10), (17,), (4, 3, 5)])
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
def test_sce_same_bits_in_every_dtype(dtype: torch.dtype, shape: tuple[int, ...], select_topk: float) -> None:
    g = torch.Generator().manual_seed(42)
    base = torch.randn(*shape, generator=g)
    models = [(base + 0.5 * torch.randn(*shape, generator=g)).to(dtype) for _ in range(3)]
    base = base.to(dtype)
    _exact(sce_merge(base, models, select_topk=select_topk, dtype=dtype),
           _mk("sce", models, base, select_topk=select_topk))


def test_sce_two_models_and_tiny_deltas() -> None:
    # two models (variance ties are common), and deltas so small that mergekit's 1e-6 guard makes weights uniform
    _exact(sce_merge(BASE, MODELS[:2], select_topk=0.5), _mk("sce", MODELS[:2], BASE, select_topk=0.5))
    tiny = [BASE + 1e-4 * (m - BASE) for m in MODELS]
    _exact(sce_merge(BASE, tiny, select_topk=0.7), _mk("sce", tiny, BASE, select_topk=0.7))


# -- half precision: mergekit computes in the inputs' (the config's) dtype, and so do we, bit for bit -------
HALF_BASE = (torch.randn(64, 48, generator=G) * 0.02)
# deltas rounded to few distinct magnitudes: many ties at every top-k boundary, as half precision has
HALF_MODELS = [HALF_BASE + torch.round(torch.randn(64, 48, generator=G) * 8) / 400 for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["task_arithmetic", "ties", "ties_rescale", "breadcrumbs", "breadcrumbs_ties",
                                  "breadcrumbs_rescale", "breadcrumbs_ties_rescale", "slerp", "model_stock"])
def test_half_precision_bit_for_bit(case: str, dtype: torch.dtype) -> None:
    base = HALF_BASE.to(dtype)
    models = [m.to(dtype) for m in HALF_MODELS]
    dens, gam, w = [0.3, 0.55, 0.8], [0.05, 0.1, 0.0], [0.6, 1.0, 0.35]
    if case == "task_arithmetic":
        ours = task_arithmetic_merge(base, models, w, lambda_=0.7, normalize=True, dtype=dtype)
        theirs = _mk(case, models, base, weight=w, normalize=True, **{"lambda": 0.7})
    elif case.startswith("ties"):
        rescale = case == "ties_rescale"
        ours = ties_merge(base, models, w, dens, lambda_=1.3, rescale=rescale, dtype=dtype)
        theirs = _mk("ties", models, base, weight=w, density=dens, rescale=rescale, **{"lambda": 1.3})
    elif case.startswith("breadcrumbs"):
        consensus = "sum" if case.startswith("breadcrumbs_ties") else None
        rescale = case.endswith("rescale")
        ours = breadcrumbs_merge(base, models, w, dens, gam, consensus=consensus,  # type: ignore[arg-type]
                                 rescale=rescale, dtype=dtype)
        theirs = _mk(case.removesuffix("_rescale"), models, base, weight=w, density=dens, gamma=gam,
                     rescale=rescale)
    elif case == "slerp":
        ours = slerp_merge(0.35, base, models[0])
        theirs = _mk("slerp", [models[0]], base, t=0.35)
    else:
        ours = model_stock_merge(base, models, dtype=dtype)
        theirs = _mk("model_stock", models, base)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


def _inputs(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    models = [(base + 0.5 * torch.randn(*shape, generator=g)).to(dtype) for _ in range(3)]
    return base.to(dtype), models


SHAPES = [(6, 10), (17,), (4, 3, 5)]
DTYPES = [torch.float32, *HALF]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize(("row_wise", "flatten"), [(False, True), (False, False), (True, False)])
def test_nuslerp_same_bits(dtype: torch.dtype, shape: tuple[int, ...], with_base: bool, row_wise: bool,
                           flatten: bool) -> None:
    base, models = _inputs(dtype, shape, 3)
    b = base if with_base else None
    _exact(nuslerp_merge(models[:2], [0.3, 0.9], base=b, row_wise=row_wise, flatten=flatten, dtype=dtype),
           _mk("nuslerp", models[:2], b, weight=[0.3, 0.9], nuslerp_row_wise=row_wise, nuslerp_flatten=flatten))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_multislerp_same_bits(dtype: torch.dtype, shape: tuple[int, ...], with_base: bool, n: int) -> None:
    base, models = _inputs(dtype, shape, 4)
    b = base if with_base else None
    weights = [0.2, 0.5, 0.3][:n]
    _exact(multislerp_merge(models[:n], weights, base=b, dtype=dtype), _mk("multislerp", models[:n], b, weight=weights))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_karcher_same_bits(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    base, models = _inputs(dtype, shape, 5)
    _exact(karcher_merge(models, dtype=dtype), _mk("karcher", models, None))
    # with a base, mergekit averages it as one more input (its karcher ignores which one is the base)
    _exact(karcher_merge([base, *models], max_iter=4, tol=1e-4, dtype=dtype),
           _mk("karcher", models, base, max_iter=4, tol=1e-4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 2.0])
def test_nearswap_same_bits(dtype: torch.dtype, shape: tuple[int, ...], t: float) -> None:
    base, models = _inputs(dtype, shape, 6)
    _exact(nearswap_merge(base, models[0], t, dtype=dtype), _mk("nearswap", [models[0]], base, t=t))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES, (40, 64)])
def test_arcee_fusion_same_bits(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    # mergekit returns float32 for half inputs (its mask is float32); its writer then casts to the dtype
    base, models = _inputs(dtype, shape, 7)
    _exact(arcee_fusion_merge(base, models[0], dtype=dtype), _mk("arcee_fusion", [models[0]], base).to(dtype))
