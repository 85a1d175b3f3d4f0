"""Parameter resolution: layer positions, gradients, conditional lists, per-model precedence."""

from __future__ import annotations

import pytest

from mergelab.merge.params import (
    check_parameter_names,
    evaluate_setting,
    layer_index,
    layer_position,
    resolve_parameters,
)
from mergelab.methods import get_method


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("model.layers.3.mlp.up_proj.weight", 3),
        ("transformer.h.11.attn.c_attn.weight", 11),
        ("bert.encoder.layer.0.attention.self.query.weight", 0),
        ("blocks.7.norm1.weight", 7),
        ("layers.2.weight", 2),
        ("model.embed_tokens.weight", None),
        ("lm_head.weight", None),
        ("model.norm.weight", None),
        ("model.layers_extra.3.weight", None),
    ],
)
def test_layer_index(name: str, index: int | None) -> None:
    assert layer_index(name) == index


def test_layer_position() -> None:
    assert layer_position("model.layers.0.w", 5) == 0.0
    assert layer_position("model.layers.2.w", 5) == 0.5
    assert layer_position("model.layers.4.w", 5) == 1.0
    assert layer_position("model.layers.0.w", 1) == 1.0  # mergekit: t = 1 for a single layer
    assert layer_position("model.embed_tokens.weight", 5) == 0.0


def test_scalar_and_gradient() -> None:
    assert evaluate_setting(0.3, "x", 0.7) == 0.3
    assert evaluate_setting([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    # three anchors over t: 0 → 0, .25 → .5, .5 → 1, .75 → .5, 1 → 0
    for t, v in [(0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.75, 0.5), (1.0, 0.0)]:
        assert evaluate_setting([0, 1, 0], "x", t) == pytest.approx(v)
    assert evaluate_setting([2.0], "x", 0.6) == 2.0
    assert evaluate_setting([], "x", 0.6) is None


def test_non_numeric_lists_select() -> None:
    assert evaluate_setting(["sum", "count"], "x", 0.4) == "sum"
    assert evaluate_setting(["sum", "count"], "x", 1.0) == "count"
    assert evaluate_setting([True, False, True], "x", 0.5) is False


def test_conditional_list_first_match_wins() -> None:
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.9}]
    assert evaluate_setting(setting, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.1
    assert evaluate_setting(setting, "model.layers.1.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_setting(setting, "model.embed_tokens.weight", 0.0) == 0.9
    assert evaluate_setting({"filter": "mlp", "value": 3}, "attn", 0.0) is None
    assert evaluate_setting([{"filter": "*", "value": 4}], "anything", 0.0) == 4


def test_resolve_per_model_over_global_and_defaults() -> None:
    ties = get_method("ties")
    params, per_model = resolve_parameters(
        ties, "model.layers.1.mlp.w", 0.5,
        {"density": 0.5, "weight": [0.0, 2.0], "lambda": 2},
        [{"density": 0.2}, {}],
    )
    assert params["lambda"] == 2.0 and isinstance(params["lambda"], float)
    assert params["normalize"] is True and params["consensus"] == "sum"
    assert per_model[0] == {"weight": pytest.approx(1.0), "density": 0.2, "tie_order": "sort"}
    assert per_model[1] == {"weight": pytest.approx(1.0), "density": 0.5, "tie_order": "sort"}


def test_resolve_falls_back_to_global_when_model_conditional_does_not_match() -> None:
    ties = get_method("ties")
    _, per_model = resolve_parameters(ties, "model.layers.0.mlp.w", 0.0, {"density": 0.7},
                                      [{"density": [{"filter": "attn", "value": 0.1}]}])
    assert per_model[0]["density"] == 0.7


def test_resolve_errors_name_model_tensor_and_parameter() -> None:
    ties = get_method("ties")
    with pytest.raises(ValueError, match=r"m2 \(tensor w\): parameter 'density' must be <= 1.0"):
        resolve_parameters(ties, "w", 0.0, {}, [{}, {"density": 1.5}], model_names=["m1", "m2"])
    with pytest.raises(ValueError, match="missing required parameter 't'"):
        resolve_parameters(get_method("slerp"), "w", 0.0, {}, [{}])


def test_check_parameter_names() -> None:
    ties = get_method("ties")
    problems = check_parameter_names(ties, {"densty": 0.5, "lambda": 1.0}, {"a": {"normalize": True}})
    assert len(problems) == 2
    assert "unknown parameter 'densty'" in problems[0] and "density" in problems[0]
    assert "'normalize' is not a per-model parameter" in problems[1] and "weight, density" in problems[1]
    assert check_parameter_names(ties, {"density": 0.5}, {"a": {"weight": 1.0}}) == []


def test_yaml_scientific_notation_gradient_interpolates() -> None:
    # PyYAML reads 1e-3 (no dot) as the string "1e-3": a float parameter's gradient must still interpolate
    yaml = pytest.importorskip("yaml")
    settings = yaml.safe_load("lambda: [1e-3, 1.0e-2]\ndensity: ['1e-1', 3e-1]")
    assert settings["lambda"][0] == "1e-3"
    params, per_model = resolve_parameters(get_method("ties"), "model.layers.1.w", 0.5, settings, [{}])
    assert params["lambda"] == pytest.approx(0.0055)
    assert per_model[0]["density"] == pytest.approx(0.2)
    # string parameters still select, they do not interpolate
    for t, expected in [(0.9, "sum"), (1.0, "count")]:  # index int(t · (n − 1)), as in mergekit
        params, _ = resolve_parameters(get_method("ties"), "w", t, {"consensus": ["sum", "count"]}, [{}])
        assert params["consensus"] == expected
    # a bad endpoint is reported with the parameter's name, even at a t where it is not selected
    with pytest.raises(ValueError, match="parameter 'lambda' must be float"):
        resolve_parameters(get_method("ties"), "w", 0.0, {"lambda": [1.0, "lots"]}, [{}])
