"""The method registry: metadata of every method, lookup errors, parameter validation."""

from __future__ import annotations

import pytest
import torch

from mergelab.methods import MergeMethod, Param, all_methods, get_method, list_methods, register
from mergelab.methods.registry import REQUIRED, TensorInputs

EXPECTED = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
            "breadcrumbs_ties", "slerp", "model_stock", "cart", "della", "della_linear", "sce",
            "tsv", "iso_c", "iso_cts", "wudi"}


def test_expected_methods_registered() -> None:
    assert set(list_methods()) >= EXPECTED
    assert list_methods() == sorted(list_methods())
    assert [m.name for m in all_methods()] == list_methods()


@pytest.mark.parametrize("method", all_methods(), ids=lambda m: m.name)
def test_every_method_documented(method: MergeMethod) -> None:
    assert "arXiv:" in method.paper or "SIGGRAPH" in method.paper, method.paper
    assert len(method.summary) > 20 and method.summary.endswith(".")
    assert "=" in method.formula and len(method.formula) > 10, method.formula
    assert callable(method.function) and method.function.__doc__
    assert callable(method.adapter)
    assert method.base in ("required", "optional", "ignored")
    names = [p.name for p in method.params]
    assert len(names) == len(set(names)), "duplicate parameter names"
    for p in method.params:
        assert p.help, f"{method.name}.{p.name} has no help"
        if not p.required and p.default is not None:
            # every default passes its own validation
            assert p.validate(p.default, "default") == p.default


@pytest.mark.parametrize("method", all_methods(), ids=lambda m: m.name)
def test_every_adapter_runs_with_defaults(method: MergeMethod) -> None:
    # defaults (plus t for slerp) on small float32 inputs: shape, dtype and finiteness preserved
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, generator=g)
    n = max(method.min_models, 2 if method.max_models is None else 1)
    tensors = [base + 0.1 * torch.randn(4, 3, generator=g) for _ in range(n)]
    params = {p.name: (0.5 if p.required else p.default) for p in method.global_params.values()}
    model_params = [{p.name: p.default for p in method.model_params.values()} for _ in tensors]
    x = TensorInputs(name="layers.0.w", tensors=tensors, model_params=model_params, params=params,
                     base=base if method.base != "ignored" else None, seed=1)
    try:
        out = method.adapter(x)
    except ValueError as exc:
        if "stats" not in str(exc):
            raise
        pytest.skip(f"{method.name} needs precomputed statistics: {exc}")
    assert out.shape == base.shape and out.dtype == base.dtype
    assert torch.isfinite(out).all()


def test_aliases_resolve_to_the_same_method() -> None:
    assert get_method("soup") is get_method("linear")
    assert "soup" not in list_methods()


def test_unknown_method_lists_valid_names() -> None:
    with pytest.raises(KeyError) as err:
        get_method("tiez")
    msg = str(err.value)
    assert "tiez" in msg
    for name in EXPECTED:
        assert name in msg


def test_register_twice_raises() -> None:
    m = get_method("linear")
    with pytest.raises(KeyError, match="registered twice"):
        register(m)


def test_param_required_and_scopes() -> None:
    assert Param("t", float).required
    assert Param("t", float).default is REQUIRED
    assert not Param("t", float, 0.5).required
    ties = get_method("ties")
    assert set(ties.model_params) == {"weight", "density", "tie_order"}
    assert {"lambda", "normalize", "consensus", "scope"} <= set(ties.global_params)
    assert ties.param("nope") is None


def test_param_validate_coerces() -> None:
    assert Param("x", float).validate(1, "w") == 1.0
    assert isinstance(Param("x", float).validate(1, "w"), float)
    assert Param("x", float).validate("1e-3", "w") == pytest.approx(1e-3)
    assert Param("n", int).validate(3.0, "w") == 3
    assert Param("n", int).validate("4", "w") == 4
    assert Param("b", bool).validate(True, "w") is True
    assert Param("s", str, choices=("a", "b")).validate("b", "w") == "b"


@pytest.mark.parametrize(
    ("param", "value", "pattern"),
    [
        (Param("density", float), "lots", r"models\[0\]: parameter 'density' must be float, got 'lots'"),
        (Param("density", float), True, r"parameter 'density' must be float, got True"),
        (Param("density", float), [0.1], r"parameter 'density' must be float"),
        (Param("k", int), 2.5, r"parameter 'k' must be int, got 2.5"),
        (Param("normalize", bool), "yes", r"parameter 'normalize' must be bool, got 'yes'"),
        (Param("normalize", bool), 1, r"parameter 'normalize' must be bool"),
        (Param("consensus", str, choices=("sum", "count")), "max",
         r"parameter 'consensus' must be one of \['sum', 'count'\], got 'max'"),
        (Param("density", float, low=0.0, high=1.0), 1.5, r"parameter 'density' must be <= 1.0, got 1.5"),
        (Param("density", float, low=0.0, high=1.0), -0.1, r"parameter 'density' must be >= 0.0, got -0.1"),
    ],
)
def test_param_validate_errors_name_the_parameter(param: Param, value: object, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        param.validate(value, "models[0]")


def test_registered_density_bounds() -> None:
    for name in ("ties", "dare_linear", "dare_ties", "breadcrumbs"):
        p = get_method(name).param("density")
        assert p is not None
        with pytest.raises(ValueError, match="density"):
            p.validate(1.2, name)


def test_tools_column_names_mergelab_and_the_peers() -> None:
    assert get_method("cart").tools == "mergelab only"
    assert get_method("ties").tools == "mergelab, mergekit, FusionBench"
    assert get_method("sce").tools == "mergelab, mergekit"
    with pytest.raises(ValueError, match="unknown tools"):
        MergeMethod(name="x", function=lambda: None, params=(), summary="",
                    paper="", also_in=("mergekit", "peft"))


def test_mergekit_flag_agrees_with_mergekits_registry() -> None:
    # a method flagged "mergekit" exists there under that name, and every mergekit name we also have is flagged
    mk = pytest.importorskip("mergekit.merge_methods.registry")
    theirs = {m.spec.name for m in mk.registered_methods()}
    ours = {m.name for m in all_methods()}
    flagged = {m.name for m in all_methods() if "mergekit" in m.also_in}
    assert flagged <= theirs
    assert ours & theirs == flagged


def test_methods_cli_shows_the_tools_column() -> None:
    from typer.testing import CliRunner

    from mergelab.cli import app

    result = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    header = next(line for line in result.output.splitlines() if "method" in line and "paper" in line)
    assert "tools" in header
    assert "mergelab only" in result.output and "mergelab, mergekit, FusionBench" in result.output
    one = CliRunner().invoke(app, ["methods", "della"])
    assert one.exit_code == 0 and "tools: mergelab, mergekit" in one.output


def _toy(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], *, lambda_: float = 1.0,
         consensus: str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Records what it was called with, in the tensor it returns."""
    _toy.calls.append({"weights": weights, "lambda_": lambda_, "consensus": consensus, "dtype": dtype})  # type: ignore[attr-defined]
    return base + lambda_ * sum(w * (t - base) for w, t in zip(weights, tensors, strict=True))


def test_adapter_is_derived_from_the_param_declarations() -> None:
    # global params fill their name (lambda → lambda_), per-model ones the plural with one value per model,
    # `fixed` keywords are the registration's, inputs fill the parameters named after them; int8_mask-style
    # params with arg=None are accepted and not passed
    _toy.calls = []  # type: ignore[attr-defined]
    m = MergeMethod(name="toy", function=_toy, summary="", paper="", fixed={"consensus": "sum"},
                    params=(Param("weight", float, 1.0, scope="model"), Param("lambda", float, 1.0),
                            Param("int8_mask", bool, False, arg=None)))
    base, a, b = torch.zeros(2), torch.ones(2), 2 * torch.ones(2)
    x = TensorInputs(name="w", tensors=[a, b], model_params=[{"weight": 0.5}, {"weight": 0.25}],
                     params={"lambda": 2.0, "int8_mask": True}, base=base)
    assert torch.equal(m.adapter(x), torch.full((2,), 2.0))  # 2 · (0.5 · 1 + 0.25 · 2)
    assert _toy.calls == [{"weights": [0.5, 0.25], "lambda_": 2.0, "consensus": "sum", "dtype": None}]  # type: ignore[attr-defined]


def test_a_declaration_that_does_not_fit_the_function_is_refused_at_registration() -> None:
    with pytest.raises(ValueError, match=r"_toy has no parameter \['alpha'\]"):
        MergeMethod(name="toy", function=_toy, summary="", paper="", params=(Param("alpha", float, 1.0),))
    with pytest.raises(ValueError, match=r"nothing fills _toy's \['weights'\]"):
        MergeMethod(name="toy", function=_toy, summary="", paper="", params=())
    with pytest.raises(ValueError, match="no parameter"):
        MergeMethod(name="toy", function=_toy, summary="", paper="", fixed={"typo": 1},
                    params=(Param("weight", float, 1.0, scope="model"),))


def test_one_model_methods_see_the_other_model_and_scalar_model_params() -> None:
    # passthrough's `tensor` is the one model and its per-model `scale` a number, not a list
    x = TensorInputs(name="w", tensors=[torch.ones(2)], model_params=[{"scale": 3.0}], params={})
    assert torch.equal(get_method("passthrough").adapter(x), torch.full((2,), 3.0))
    two = TensorInputs(name="w", tensors=[torch.ones(2)] * 2, model_params=[{"scale": 3.0}] * 2, params={})
    with pytest.raises(ValueError, match="exactly one model besides the base"):
        get_method("passthrough").adapter(two)


def test_missing_statistics_and_base_are_clear_errors_naming_the_tensor() -> None:
    x = TensorInputs(name="layers.0.w", tensors=[torch.ones(2)] * 2, model_params=[{"weight": 1.0}] * 2,
                     params={"eps": 1e-8, "lambda": 1.0, "normalize": False})
    with pytest.raises(ValueError, match=r"fisher needs per-model statistics.*tensor 'layers.0.w'"):
        get_method("fisher").adapter(x)
    with pytest.raises(ValueError, match=r"task_arithmetic needs a base for tensor 'layers.0.w'"):
        get_method("task_arithmetic").adapter(x)
    # regmean without Grams for a tensor (not a linear layer's weight) is the plain mean
    assert torch.equal(get_method("regmean").adapter(
        TensorInputs(name="b", tensors=[torch.ones(2), 3 * torch.ones(2)], model_params=[{}] * 2,
                     params={"alpha": 0.9})), torch.full((2,), 2.0))
