"""Small architecture families in plain torch (no torchvision), sized for 28×28 inputs and 2 CPU cores.

Every model is a :class:`ZooModel`: ``forward(x) == head(features(x))`` with ``head`` one ``nn.Linear``.
That split is what feature ensembles need (average ``features`` over models, then apply a head).

Families and depth variants (the number counts weight layers, as in the papers' names):

- ``resnet8``/``resnet14``/``resnet20``: CIFAR-style ResNet with BatchNorm, 3 stages of 1/2/3 basic blocks.
- ``vgg6``/``vgg9``/``vgg19`` and ``vgg6bn``/``vgg9bn``/``vgg19bn``: conv3×3 stacks with max-pooling, with and
  without BatchNorm (``vgg19``: VGG-19's 16 convs and 3 fully connected layers, the magnitude study's depth).
- ``densenet8``/``densenet14``: 3 dense blocks of 2/4 BN-ReLU-conv layers (growth 8) with transitions.
- ``vit2``/``vit4``: pre-norm ViT with a class token, 2/4 encoder layers, dim max(48, 3×width) (narrower
  ViTs do not learn in a few epochs).
- ``vit2-in``/``vit2-randin``: ``vit2`` behind a 3×3 conv input layer, shared by zoo members or re-drawn by
  each (the Rethinking paper's random-input wrapper for ViT soups).
- ``linear``: one linear layer on the flattened input (the template model); ``mlp1``/``mlp2``: ReLU MLPs.

Convolutional models run on images (N, 1, H, W) and on 1-D signals (N, 1, L) with the same code: the
spatial dimensionality picks Conv1d/Conv2d. Tabular data takes only ``linear`` and ``mlp*``.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class ZooModel(nn.Module):
    """A classifier split into a feature extractor and one linear head."""

    head: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _ops(ndim: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module], type[nn.Module]]:
    """(Conv, BatchNorm, MaxPool, AvgPool) for 1 or 2 spatial dimensions."""
    if ndim == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d
    if ndim == 1:
        return nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AvgPool1d
    raise ValueError(f"convolutional models need 1-D or 2-D inputs, got {ndim} spatial dims")


def _global_pool(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).mean(-1)


class _BasicBlock(nn.Module):
    def __init__(self, nd: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        conv, bn, _, _ = _ops(nd)
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = conv(cout, cout, 3, padding=1, bias=False)
        self.bn2 = bn(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False), bn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(ZooModel):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, blocks: int, width: int = 16) -> None:
        super().__init__()
        nd = len(input_shape) - 1
        conv, bn, _, _ = _ops(nd)
        self.stem = nn.Sequential(conv(input_shape[0], width, 3, padding=1, bias=False), bn(width), nn.ReLU())
        layers: list[nn.Module] = []
        cin = width
        for stage, mult in enumerate((1, 2, 4)):
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(_BasicBlock(nd, cin, width * mult, stride))
                cin = width * mult
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _global_pool(self.layers(self.stem(x)))


_VGG_CFG = {6: (1, "M", 2, "M", 4, 4, "M"), 9: (1, 1, "M", 2, 2, "M", 4, 4, 4, "M"),
            # VGG-19's 16 convs (2-2-4-4-4 per stage) with three pools (28 → 14 → 7 → 3), the last 8 convs on 3×3
            # maps. With VGG's fourth pool the last four convs ran on 1×1 maps, where a 3×3 kernel sees 1/9 of its
            # He fan-in: without BN the signal fell to RMS 0.005 at init and the net reached 33 % after 4 epochs
            19: (1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, 8, 8, 8, 8)}
#: hidden fully connected layers after the convs (VGG-19 has two before its classifier: 16 + 2 + 1 = 19)
_VGG_FC = {6: 1, 9: 1, 19: 2}


class ScaleNorm(nn.Module):
    """BatchNorm without centring or shift: ``x · γ / √(E[x²] + ε)`` per channel, with the batch's second
    moment in training and a running one (kept as ``running_var``: the variance about 0) in eval mode.

    A net of bias-free convs/linears, ReLU, pooling and ScaleNorm, once the norms are folded into the convs
    (:func:`fold_batchnorm`), is positively homogeneous: scaling all its weights by c scales its logits by
    exactly c^L and never changes a prediction in exact arithmetic.
    """

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.momentum, self.eps = momentum, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            sq = x.pow(2).mean([0, *range(2, x.dim())])
            with torch.no_grad():
                self.running_var.lerp_(sq.detach(), self.momentum)
        else:
            sq = self.running_var
        return x * (self.weight / torch.sqrt(sq + self.eps)).reshape(1, -1, *[1] * (x.dim() - 2))


class VGG(ZooModel):
    """``norm``: None, ``"bn"`` (BatchNorm, convs without bias) or ``"scale"`` (:class:`ScaleNorm` and no
    bias anywhere: folded, a homogeneous plain net)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, depth: int, bn: bool,
                 width: int = 16, norm_kind: str | None = None) -> None:
        super().__init__()
        nd = len(input_shape) - 1
        conv, bn_layer, maxpool, _ = _ops(nd)
        kind = norm_kind or ("bn" if bn else None)
        norm = ScaleNorm if kind == "scale" else bn_layer
        layers: list[nn.Module] = []
        cin, size = input_shape[0], min(input_shape[1:])
        for item in _VGG_CFG[depth]:
            if item == "M":
                if size >= 2:  # 8×8 digits run out of resolution before the last pool
                    layers.append(maxpool(2))
                    size //= 2
                continue
            cout = width * int(item)
            layers.append(conv(cin, cout, 3, padding=1, bias=kind is None))
            if kind is not None:
                layers.append(norm(cout))
            layers.append(nn.ReLU())
            cin = cout
        self.convs = nn.Sequential(*layers)
        hidden = 4 * width
        # VGG's fully connected trunk, narrowed (and one hidden layer for the shallow variants); its output is
        # the "feature"
        fc: list[nn.Module] = []
        for _ in range(_VGG_FC[depth]):
            fc += [nn.Linear(cin, hidden, bias=kind != "scale"), nn.ReLU()]
            cin = hidden
        self.fc = nn.Sequential(*fc)
        self.head = nn.Linear(hidden, num_classes, bias=kind != "scale")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_global_pool(self.convs(x)))


class _DenseLayer(nn.Module):
    def __init__(self, nd: int, cin: int, growth: int) -> None:
        super().__init__()
        conv, bn, _, _ = _ops(nd)
        self.bn = bn(cin)
        self.conv = conv(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(torch.relu(self.bn(x)))], dim=1)


class DenseNet(ZooModel):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, layers_per_block: int,
                 growth: int = 8, width: int = 16) -> None:
        super().__init__()
        nd = len(input_shape) - 1
        conv, bn, _, avgpool = _ops(nd)
        mods: list[nn.Module] = [conv(input_shape[0], width, 3, padding=1, bias=False)]
        c, size = width, min(input_shape[1:])
        for block in range(3):
            for _ in range(layers_per_block):
                mods.append(_DenseLayer(nd, c, growth))
                c += growth
            if block < 2:  # transition: BN-ReLU-1×1 conv halving channels, then 2× average pooling
                mods += [bn(c), nn.ReLU(), conv(c, c // 2, 1, bias=False)]
                c //= 2
                if size >= 2:
                    mods.append(avgpool(2))
                    size //= 2
        mods += [bn(c), nn.ReLU()]
        self.body = nn.Sequential(*mods)
        self.head = nn.Linear(c, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _global_pool(self.body(x))


class ViT(ZooModel):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, depth: int, dim: int = 48,
                 heads: int = 4) -> None:
        super().__init__()
        nd = len(input_shape) - 1
        conv, _, _, _ = _ops(nd)
        side = min(input_shape[1:])
        # 28×28 → 4×4 tokens of 7×7, 8×8 → 4×4 tokens of 2×2, length 40 → 10 tokens of 4: few tokens keep
        # attention cheap and let a ViT learn from a few thousand examples
        patch = side // 4 if side >= 16 and len(input_shape) == 3 else (4 if side >= 16 else 2)
        tokens = math.prod(s // patch for s in input_shape[1:])
        self.patch = conv(input_shape[0], dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        return self.norm(self.encoder(t))[:, 0]


class InputLayerViT(ZooModel):
    """A ViT behind a 3×3 convolution from the input's channels to 3 (the Rethinking paper's wrapper for its
    ViT soups, Tab. 9: a random input layer in front of a pre-trained ViT). With the ``vit2-randin`` spec every
    zoo member re-draws this layer from its own seed, so members share the ViT but not their first layer."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, depth: int, dim: int = 48) -> None:
        super().__init__()
        nd = len(input_shape) - 1
        conv, _, _, _ = _ops(nd)
        self.input_layer = conv(input_shape[0], 3, 3, padding=1)
        self.vit = ViT((3, *input_shape[1:]), num_classes, depth, dim=dim)
        del self.vit.head  # the wrapper owns the head (one ``head`` key in the state dict)
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.features(self.input_layer(x))


class Linear(ZooModel):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(math.prod(input_shape), num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class MLP(ZooModel):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, depth: int, hidden: int = 128) -> None:
        super().__init__()
        dims = [math.prod(input_shape)] + [hidden] * depth
        mods: list[nn.Module] = [nn.Flatten()]
        for a, b in itertools.pairwise(dims):
            mods += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*mods)
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


Builder = Callable[[tuple[int, ...], int, int], ZooModel]


@dataclass(frozen=True)
class ArchSpec:
    name: str
    family: str
    build: Builder  # (input_shape, num_classes, width) -> model
    batchnorm: bool
    conv: bool  # needs spatial inputs (images or signals)
    description: str
    #: modules a shared-start member re-initialises from its own seed after loading the start
    fresh_per_member: tuple[str, ...] = ()


def _spec(name: str, family: str, build: Builder, bn: bool, conv: bool, desc: str) -> ArchSpec:
    return ArchSpec(name, family, build, bn, conv, desc)


#: architecture name → spec; the ``family`` groups depth variants for plots
ARCHS: dict[str, ArchSpec] = {s.name: s for s in [
    _spec("resnet8", "resnet", lambda s, k, w: ResNet(s, k, 1, w), True, True, "ResNet, 3×1 basic blocks, BN"),
    _spec("resnet14", "resnet", lambda s, k, w: ResNet(s, k, 2, w), True, True, "ResNet, 3×2 basic blocks, BN"),
    _spec("resnet20", "resnet", lambda s, k, w: ResNet(s, k, 3, w), True, True, "ResNet, 3×3 basic blocks, BN"),
    _spec("vgg6", "vgg", lambda s, k, w: VGG(s, k, 6, False, w), False, True, "VGG, 4 conv + 2 FC, no BN"),
    _spec("vgg9", "vgg", lambda s, k, w: VGG(s, k, 9, False, w), False, True, "VGG, 7 conv + 2 FC, no BN"),
    _spec("vgg19", "vgg", lambda s, k, w: VGG(s, k, 19, False, w), False, True,
          "VGG-19, 16 conv + 3 FC, no BN"),
    _spec("vgg6bn", "vgg-bn", lambda s, k, w: VGG(s, k, 6, True, w), True, True, "VGG, 4 conv + 2 FC, BN"),
    _spec("vgg9bn", "vgg-bn", lambda s, k, w: VGG(s, k, 9, True, w), True, True, "VGG, 7 conv + 2 FC, BN"),
    _spec("vgg19bn", "vgg-bn", lambda s, k, w: VGG(s, k, 19, True, w), True, True,
          "VGG-19, 16 conv + 3 FC, BN"),
    _spec("vgg19nb", "vgg-sn", lambda s, k, w: VGG(s, k, 19, False, w, norm_kind="scale"), True, True,
          "VGG-19 without biases, ScaleNorm (BN without centring); folded: a homogeneous plain net"),
    _spec("densenet8", "densenet", lambda s, k, w: DenseNet(s, k, 2, width=w), True, True,
          "DenseNet, 3 blocks × 2 layers, growth 8"),
    _spec("densenet14", "densenet", lambda s, k, w: DenseNet(s, k, 4, width=w), True, True,
          "DenseNet, 3 blocks × 4 layers, growth 8"),
    _spec("vit2", "vit", lambda s, k, w: ViT(s, k, 2, dim=max(48, 3 * w)), False, True,
          "ViT, 2 layers, dim max(48, 3×width)"),
    _spec("vit4", "vit", lambda s, k, w: ViT(s, k, 4, dim=max(48, 3 * w)), False, True,
          "ViT, 4 layers, dim max(48, 3×width)"),
    ArchSpec("vit2-in", "vit", lambda s, k, w: InputLayerViT(s, k, 2, dim=max(48, 3 * w)), False, True,
             "ViT, 2 layers, behind a 3×3 conv input layer shared by zoo members"),
    ArchSpec("vit2-randin", "vit", lambda s, k, w: InputLayerViT(s, k, 2, dim=max(48, 3 * w)), False, True,
             "ViT, 2 layers, behind a 3×3 conv input layer each zoo member re-draws (the paper's wrapper)",
             fresh_per_member=("input_layer",)),
    _spec("linear", "linear", lambda s, k, w: Linear(s, k), False, False, "one linear layer (templates)"),
    _spec("mlp1", "mlp", lambda s, k, w: MLP(s, k, 1, 8 * w), False, False, "MLP, 1 hidden layer of 8×width"),
    _spec("mlp2", "mlp", lambda s, k, w: MLP(s, k, 2, 8 * w), False, False, "MLP, 2 hidden layers of 8×width"),
]}


def _init_weights(model: nn.Module) -> None:
    """He init for convs (fan-in, ReLU): torch's default shrinks activations layer by layer, so a VGG
    without BatchNorm barely trains in a few epochs."""
    for m in model.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_model(arch: str, input_shape: tuple[int, ...], num_classes: int, *, width: int = 16) -> ZooModel:
    """A fresh model (initialised from torch's global RNG: seed it first for reproducibility)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture '{arch}'; choose one of {sorted(ARCHS)}")
    spec = ARCHS[arch]
    if spec.conv and len(input_shape) < 2:
        raise ValueError(f"'{arch}' needs image or signal inputs, got per-example shape {input_shape}; "
                         "tabular data takes 'linear', 'mlp1' or 'mlp2'")
    model = spec.build(tuple(input_shape), num_classes, width)
    if spec.family != "vit":  # the ViT's patch embedding is a linear projection, not a ReLU conv
        _init_weights(model)
    return model


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops_per_example(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs for one example (torch's FlopCounterMode: 2 per multiply-add of matmuls/convs).

    Counted on a train-mode copy: in eval mode ``nn.TransformerEncoderLayer`` takes a fused fast path that
    the counter does not see. Two examples (then halved) because train-mode BatchNorm needs more than one
    value per channel.
    """
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(model).train()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe(torch.zeros(2, *input_shape))
    return int(counter.get_total_flops()) // 2


def _path_layers(model: nn.Module) -> list[str]:
    """"weight" or "bn" for each conv/linear and BatchNorm on the input → logits path, in order (ResNet
    shortcut projections run beside a block, not after it, so they are left out)."""
    kinds = []
    for name, m in model.named_modules():
        if "shortcut" in name:
            continue
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear):
            kinds.append("weight")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm | ScaleNorm):
            kinds.append("bn")
    return kinds


def weight_layers(model: nn.Module) -> int:
    """Weight layers (convs and linears) in series from input to logits: the ``L`` of the ``c^L`` growth of
    a scaled network."""
    return _path_layers(model).count("weight")


def bn_layers(model: nn.Module) -> tuple[int, int]:
    """(BatchNorm layers in series on the path, weight layers after the last of them)."""
    kinds = _path_layers(model)
    if "bn" not in kinds:
        return 0, len(kinds)
    last = len(kinds) - 1 - kinds[::-1].index("bn")
    return kinds.count("bn"), kinds[last:].count("weight")


@torch.no_grad()
def fold_batchnorm(model: ZooModel) -> ZooModel:
    """A BatchNorm-free copy computing the same function as ``model`` in eval mode: every BatchNorm that
    follows a conv inside an ``nn.Sequential`` is folded into that conv (weight × γ/√(var+ε), bias
    β − γ·mean/√(var+ε), plus the conv's own bias scaled) and replaced by ``nn.Identity``.

    A VGG-BN folds completely (a plain VGG with conv biases); nets with a BatchNorm elsewhere (ResNet
    blocks, DenseNet) are refused, naming the first one that cannot be folded.
    """
    plain = copy.deepcopy(model).eval()
    for seq in [m for m in plain.modules() if isinstance(m, nn.Sequential)]:
        for i in range(1, len(seq)):
            conv, bn = seq[i - 1], seq[i]
            if not isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d | ScaleNorm) or not isinstance(
                    conv, nn.Conv1d | nn.Conv2d):
                continue
            assert isinstance(bn.running_var, torch.Tensor)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.reshape(-1, *[1] * (conv.weight.dim() - 1)))
            if isinstance(bn, ScaleNorm):  # no centring, no shift: the conv stays bias-free
                if conv.bias is not None:
                    conv.bias.mul_(scale)
            else:
                assert isinstance(bn.running_mean, torch.Tensor)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
            seq[i] = nn.Identity()
    left = next((name for name, m in plain.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm | ScaleNorm)), None)
    if left is not None:
        raise ValueError(f"BatchNorm '{left}' does not follow a conv in an nn.Sequential and cannot be folded; "
                         "fold_batchnorm takes VGG-style nets (conv → BN → ReLU stacks)")
    return plain
