"""``merge_state_dicts`` end to end on hand-made state dicts: gradients over layers, conditional lists."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mergelab.merge.state_dicts import merge_state_dicts

NAMES = ["model.embed_tokens.weight", *[f"model.layers.{i}.mlp.weight" for i in range(4)],
         *[f"model.layers.{i}.self_attn.weight" for i in range(4)], "model.norm.weight"]
A = {n: torch.tensor([1.0, 2.0], dtype=torch.float64) for n in NAMES}
B = {n: 2 * v for n, v in A.items()}  # parallel to A: SLERP falls back to LERP, θ = (1 + t) A


def _t_of(out: dict[str, torch.Tensor], name: str) -> float:
    # invert θ = (1 + t) A
    return float(out[name][0]) - 1.0


def test_slerp_gradient_interpolates_per_layer() -> None:
    out = merge_state_dicts([B], "slerp", base=A, parameters={"t": [0.0, 1.0]})
    # 4 layers → layer i sits at i/3; tensors outside the stack at 0
    for i in range(4):
        assert _t_of(out, f"model.layers.{i}.mlp.weight") == pytest.approx(i / 3)
    assert_close(out["model.layers.0.mlp.weight"], A["model.layers.0.mlp.weight"])
    assert_close(out["model.layers.3.mlp.weight"], B["model.layers.3.mlp.weight"])
    assert _t_of(out, "model.embed_tokens.weight") == 0.0
    assert _t_of(out, "model.norm.weight") == 0.0


def test_three_anchor_gradient_and_num_layers_override() -> None:
    out = merge_state_dicts([B], "slerp", base=A, parameters={"t": [0.0, 1.0, 0.0]}, num_layers=5)
    # with 5 layers, layer i at i/4: layers 0..3 → t = 0, .5, 1, .5
    for i, t in enumerate([0.0, 0.5, 1.0, 0.5]):
        assert _t_of(out, f"model.layers.{i}.self_attn.weight") == pytest.approx(t)


def test_conditional_filters() -> None:
    t = [{"filter": "self_attn", "value": 0.25}, {"filter": "mlp", "value": [1.0, 0.0]}, {"value": 0.5}]
    out = merge_state_dicts([B], "slerp", base=A, parameters={"t": t})
    for i in range(4):
        assert _t_of(out, f"model.layers.{i}.self_attn.weight") == pytest.approx(0.25)
        assert _t_of(out, f"model.layers.{i}.mlp.weight") == pytest.approx(1 - i / 3)
    assert _t_of(out, "model.embed_tokens.weight") == pytest.approx(0.5)


def test_per_model_weight_gradient_in_linear() -> None:
    # weights (1 − t, t) with normalize: θ = (1 − t) A + t B = (1 + t) A
    gradients = [{"weight": [1.0, 0.0]}, {"weight": [0.0, 1.0]}]
    out = merge_state_dicts([A, B], "linear", model_parameters=gradients)
    for i in range(4):
        assert _t_of(out, f"model.layers.{i}.mlp.weight") == pytest.approx(i / 3)


def test_weights_shortcut_and_per_model_override() -> None:
    out = merge_state_dicts([A, B], "linear", weights=[3.0, 1.0])
    assert_close(out["model.norm.weight"], (3 * A["model.norm.weight"] + B["model.norm.weight"]) / 4)
    # an explicit per-model weight wins over the shortcut
    out = merge_state_dicts([A, B], "linear", weights=[3.0, 1.0], model_parameters=[{"weight": 1.0}, {}])
    assert_close(out["model.norm.weight"], (A["model.norm.weight"] + B["model.norm.weight"]) / 2)


def test_ties_through_state_dicts_matches_hand_values() -> None:
    base = {"w": torch.zeros(4, dtype=torch.float64)}
    m1 = {"w": torch.tensor([1.0, -2.0, 3.0, 0.0], dtype=torch.float64)}
    m2 = {"w": torch.tensor([-3.0, 1.0, 1.0, 2.0], dtype=torch.float64)}
    out = merge_state_dicts([m1, m2], "ties", base=base, parameters={"density": 1.0})
    assert_close(out["w"], torch.tensor([-3.0, -2.0, 2.0, 2.0], dtype=torch.float64))


def test_dare_seed_reproducible_and_per_tensor() -> None:
    base = {"a": torch.zeros(64), "b": torch.zeros(64)}
    m = {"a": torch.ones(64), "b": torch.ones(64)}
    o1 = merge_state_dicts([m], "dare_linear", base=base, parameters={"density": 0.5}, seed=1)
    o2 = merge_state_dicts([m], "dare_linear", base=base, parameters={"density": 0.5}, seed=1)
    o3 = merge_state_dicts([m], "dare_linear", base=base, parameters={"density": 0.5}, seed=2)
    assert torch.equal(o1["a"], o2["a"]) and not torch.equal(o1["a"], o3["a"])
    assert not torch.equal(o1["a"], o1["b"]), "tensors with different names get different masks"


def test_non_float_tensors_pass_through() -> None:
    base = {"w": torch.zeros(2), "n": torch.tensor(5)}
    m = {"w": torch.ones(2), "n": torch.tensor(9)}
    out = merge_state_dicts([m], "task_arithmetic", base=base)
    assert out["n"].item() == 5 and out["n"].dtype == torch.int64


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="needs a base model"):
        merge_state_dicts([A], "ties")
    with pytest.raises(ValueError, match=r"takes 1..1 non-base models, got 2"):
        merge_state_dicts([A, B], "slerp", base=A, parameters={"t": 0.5})
    with pytest.raises(ValueError, match="unknown parameter 'denisty'"):
        merge_state_dicts([A], "ties", base=A, parameters={"denisty": 0.5})
    with pytest.raises(ValueError, match="different keys"):
        merge_state_dicts([A, {"x": torch.zeros(1)}], "linear")
    with pytest.raises(KeyError, match="valid methods"):
        merge_state_dicts([A], "nope")
