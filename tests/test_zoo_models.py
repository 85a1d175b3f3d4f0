"""Architecture families: forward shapes on images, small images and 1-D signals; features feed the head."""

from __future__ import annotations

import pytest
import torch

from mergelab.zoo.models import ARCHS, build_model, count_parameters, flops_per_example


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (1, 40)])
def test_forward_and_features(arch: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(arch, shape, 7, width=4).eval()
    x = torch.randn(3, *shape)
    out = model(x)
    feats = model.features(x)
    assert out.shape == (3, 7)
    assert feats.shape == (3, model.head.in_features)
    torch.testing.assert_close(model.head(feats), out)


def test_tabular_takes_only_dense_models() -> None:
    assert build_model("mlp1", (30,), 2)(torch.randn(4, 30)).shape == (4, 2)
    with pytest.raises(ValueError, match="tabular"):
        build_model("resnet8", (30,), 2)


def test_depth_variants_grow_and_costs_count() -> None:
    small, big = build_model("resnet8", (1, 28, 28), 10), build_model("resnet20", (1, 28, 28), 10)
    assert count_parameters(big) > count_parameters(small)
    assert flops_per_example(big, (1, 28, 28)) > flops_per_example(small, (1, 28, 28)) > 0
    # ViT flops are counted despite the fused eval-mode encoder path
    assert flops_per_example(build_model("vit2", (1, 28, 28), 10), (1, 28, 28)) > 1e6
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in build_model("vgg6bn", (1, 28, 28), 10).modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in build_model("vgg6", (1, 28, 28), 10).modules())
