"""Permutation specs of the zoo's families (MLP, VGG with or without BatchNorm, ResNet) for weight matching.

In a ResNet every block of a stage adds into the same residual stream, so the stream carries one permutation
shared by the stem (or the stage's projection shortcut) and every block's last convolution.
"""

from __future__ import annotations

from torch import nn

from mergelab.align.specs import PermutationSpec, SpecBuilder
from mergelab.zoo.models import MLP, VGG, ResNet


def mlp_spec(model: MLP) -> PermutationSpec:
    """``body`` = Flatten, (Linear, ReLU)×depth; one permutation per hidden layer, read by the next layer."""
    b = SpecBuilder(model)
    p_in: str | None = None
    for i, layer in enumerate(model.body):
        if isinstance(layer, nn.Linear):
            p_out = f"P_body.{i}"
            b.dense(f"body.{i}", p_out, p_in)
            p_in = p_out
    b.dense("head", None, p_in)
    return b.spec()


def vgg_spec(model: VGG) -> PermutationSpec:
    """One permutation per conv (shared with its BatchNorm), then the hidden FC layer; pooling keeps channels."""
    b = SpecBuilder(model)
    p_in: str | None = None
    for i, layer in enumerate(model.convs):
        if isinstance(layer, nn.Conv1d | nn.Conv2d):
            p_out = f"P_convs.{i}"
            b.dense(f"convs.{i}", p_out, p_in)
            p_in = p_out
        elif isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
            assert p_in is not None
            b.norm(f"convs.{i}", p_in)
    # global pooling maps channel c to feature c, so the FC layer reads the last conv's permutation
    b.dense("fc.0", "P_fc.0", p_in)
    b.dense("head", None, "P_fc.0")
    return b.spec()


def resnet_spec(model: ResNet) -> PermutationSpec:
    """Residual streams share one permutation per stage; each block's inner channels get their own."""
    b = SpecBuilder(model)
    stream = "P_res.stem"
    b.dense("stem.0", stream, None)
    b.norm("stem.1", stream)
    for i, block in enumerate(model.layers):
        pre = f"layers.{i}"
        inner = f"P_{pre}.inner"
        b.dense(f"{pre}.conv1", inner, stream)
        b.norm(f"{pre}.bn1", inner)
        if isinstance(block.shortcut, nn.Sequential):  # projection: the block starts a new stream
            new_stream = f"P_res.{pre}"
            b.dense(f"{pre}.shortcut.0", new_stream, stream)
            b.norm(f"{pre}.shortcut.1", new_stream)
            stream = new_stream
        b.dense(f"{pre}.conv2", stream, inner)
        b.norm(f"{pre}.bn2", stream)
    b.dense("head", None, stream)
    return b.spec()


def spec_for(model: nn.Module) -> PermutationSpec:
    """The permutation spec of a zoo model (MLP, VGG with or without BN, ResNet)."""
    if isinstance(model, MLP):
        return mlp_spec(model)
    if isinstance(model, VGG):
        return vgg_spec(model)
    if isinstance(model, ResNet):
        return resnet_spec(model)
    raise ValueError(f"no permutation spec for {type(model).__name__}; supported: MLP, VGG, ResNet "
                     "(the 'mlp*', 'vgg*' and 'resnet*' zoo architectures)")
