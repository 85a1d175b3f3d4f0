"""Logit and feature ensembles; identities that must hold for linear models; train-mode evaluation."""

from __future__ import annotations

import copy

import torch

from mergelab import merge_state_dicts
from mergelab.ensemble import (
    ensemble_logits,
    feature_ensemble,
    feature_ensemble_logits,
    logit_ensemble,
    merged_head,
    model_outputs,
)
from mergelab.zoo.models import build_model


def _models(arch: str, n: int, shape: tuple[int, ...] = (1, 8, 8)) -> list[torch.nn.Module]:
    out = []
    for s in range(n):
        torch.manual_seed(s)
        out.append(build_model(arch, shape, 5, width=4).eval())
    return out


def test_linear_soup_equals_logit_and_feature_ensembles() -> None:
    models = _models("linear", 4)
    x = torch.randn(16, 1, 8, 8)
    soup = copy.deepcopy(models[0])
    soup.load_state_dict(merge_state_dicts([m.state_dict() for m in models], "linear"))
    with torch.no_grad():
        torch.testing.assert_close(soup(x), logit_ensemble(models)(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(soup(x), feature_ensemble(models)(x), rtol=1e-5, atol=1e-5)


def test_functional_matches_modules() -> None:
    models = _models("vgg6", 3)
    x = torch.randn(10, 1, 8, 8)
    outs = [model_outputs(m, x) for m in models]
    with torch.no_grad():
        torch.testing.assert_close(ensemble_logits([o.logits for o in outs]), logit_ensemble(models)(x))
        torch.testing.assert_close(feature_ensemble_logits([o.features for o in outs], merged_head(
            [m.head for m in models])), feature_ensemble(models)(x))
        first = feature_ensemble(models, head="first")
        torch.testing.assert_close(first.head.weight, models[0].head.weight)


def test_train_mode_eval_uses_batch_stats_without_touching_running_stats() -> None:
    model = _models("vgg6bn", 1)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(32, 1, 8, 8) * 3 + 1
    ev, tr = model_outputs(model, x), model_outputs(model, x, mode="train")
    assert not torch.allclose(ev.logits, tr.logits)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training
