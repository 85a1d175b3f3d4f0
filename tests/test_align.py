"""Permutation specs, weight matching, BatchNorm reset and loss barriers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mergelab.align import (
    apply_permutation,
    barrier_height,
    has_batchnorm,
    identity_permutation,
    interpolate,
    linear_path,
    random_permutation,
    reset_bn_stats,
    weight_matching,
)
from mergelab.align.weight_matching import objective
from mergelab.zoo.models import build_model
from mergelab.zoo.permutation_specs import spec_for

CASES = [("mlp2", (1, 8, 8)), ("vgg6", (1, 8, 8)), ("vgg6bn", (1, 8, 8)), ("resnet8", (1, 8, 8)),
         ("resnet14", (1, 16)), ("vgg9bn", (1, 12, 12))]


def _model(arch: str, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(arch, shape, 5, width=4).double().eval()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters, or permuting them could go unnoticed
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return model


def _outputs(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(7, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = model(x)
    # a dead network (every ReLU off) gives one output for all inputs and would pass any invariance test
    assert (out - out[0]).abs().max() > 1e-6
    return out


@pytest.mark.parametrize(("arch", "shape"), CASES)
def test_permuted_model_computes_the_same_function(arch: str, shape: tuple[int, ...]) -> None:
    model = _model(arch, shape)
    sd = model.state_dict()
    spec = spec_for(model)
    permuted = apply_permutation(spec, random_permutation(spec, sd, seed=1), sd)
    assert any(not torch.equal(permuted[k], sd[k]) for k in sd)
    other = copy.deepcopy(model)
    other.load_state_dict(permuted)
    torch.testing.assert_close(_outputs(other, shape), _outputs(model, shape), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("arch", "shape"), CASES[:4])
def test_spec_covers_every_unit_a_wrong_permutation_changes_outputs(arch: str, shape: tuple[int, ...]) -> None:
    """Negative control: permuting one tensor alone (not its readers) must change the function."""
    model = _model(arch, shape)
    sd = model.state_dict()
    spec = spec_for(model)
    p = spec.names[0]
    name, axis = spec.perm_to_axes[p][0]
    broken = dict(sd)
    n = sd[name].shape[axis]
    broken[name] = torch.index_select(sd[name], axis, torch.roll(torch.arange(n), 1))
    other = copy.deepcopy(model)
    other.load_state_dict(broken)
    assert (_outputs(other, shape) - _outputs(model, shape)).abs().max() > 1e-6


def test_resnet_residual_stream_shares_one_permutation() -> None:
    spec = spec_for(_model("resnet14", (1, 8, 8)))
    stem = dict(spec.perm_to_axes["P_res.stem"])
    # the stem and both blocks of stage 1 write into one stream
    assert {"stem.0.weight", "layers.0.conv2.weight", "layers.1.conv2.weight"} <= set(stem)
    assert spec.axes_to_perm["layers.2.shortcut.0.weight"][:2] == ("P_res.layers.2", "P_res.stem")
    assert spec.axes_to_perm["head.weight"] == (None, "P_res.layers.4")


@pytest.mark.parametrize(("arch", "shape"), [("mlp2", (1, 8, 8)), ("vgg6bn", (1, 8, 8)), ("vgg6", (1, 12, 12)),
                                             ("resnet8", (1, 8, 8))])
def test_weight_matching_recovers_a_known_permutation_exactly(arch: str, shape: tuple[int, ...]) -> None:
    model = _model(arch, shape)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    spec = spec_for(model)
    hidden = random_permutation(spec, sd, seed=3)
    shuffled = apply_permutation(spec, hidden, sd)
    result = weight_matching(spec, sd, shuffled, seed=0)
    assert result.converged
    recovered = apply_permutation(spec, result.perm, shuffled)
    for k in sd:
        assert torch.equal(recovered[k], sd[k]), k
    # the found permutation undoes the hidden one: shuffled[perm] == original
    for p, ix in result.perm.items():
        assert torch.equal(hidden[p][ix], torch.arange(len(ix))), p


def test_weight_matching_is_seeded_and_never_lowers_the_objective() -> None:
    a = _model("vgg6bn", (1, 8, 8), seed=0).state_dict()
    b = _model("vgg6bn", (1, 8, 8), seed=1).state_dict()
    spec = spec_for(_model("vgg6bn", (1, 8, 8)))
    r1 = weight_matching(spec, a, b, seed=5)
    r2 = weight_matching(spec, a, b, seed=5)
    assert all(torch.equal(r1.perm[p], r2.perm[p]) for p in r1.perm)
    start = objective(spec, a, b, identity_permutation(spec, a))
    assert r1.objective[-1] >= start
    assert all(y >= x - 1e-9 for x, y in zip(r1.objective, r1.objective[1:]))


def test_spec_for_other_models_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no permutation spec"):
        spec_for(nn.Linear(3, 3))


def test_bn_reset_recomputes_exact_statistics_and_restores_state() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    net[1].running_mean.fill_(100.0)
    x = torch.randn(64, 4)
    used = reset_bn_stats(net, x, num_batches=4, batch_size=16, seed=0)
    assert used == 64
    with torch.no_grad():
        h = net[0](x)
    torch.testing.assert_close(net[1].running_mean, h.mean(0), rtol=0, atol=1e-5)
    assert net[1].momentum == 0.1 and not net.training
    assert reset_bn_stats(nn.Linear(2, 2), x[:, :2]) == 0
    assert has_batchnorm(net) and not has_batchnorm(nn.Linear(2, 2))


def test_barrier_height_golden() -> None:
    assert barrier_height([0, 0.5, 1], [0.0, 1.0, 0.0]) == 1.0
    assert barrier_height([0, 0.5, 1], [1.0, 2.0, 3.0]) == 0.0  # on the straight line
    assert barrier_height([0, 0.5, 1], [1.0, 1.5, 3.0]) == pytest.approx(0.0)  # below it: clipped at zero
    assert barrier_height([0, 0.25, 1], [0.0, 1.0, 2.0]) == pytest.approx(0.5)


def test_barrier_of_a_model_with_itself_is_zero() -> None:
    model = _model("vgg6bn", (1, 8, 8)).float()
    sd = model.state_dict()
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(1))
    path = linear_path(model, sd, sd, x, y, points=7)
    assert path.loss_barrier < 1e-6
    assert path.accuracy_barrier == 0.0
    assert max(path.losses) - min(path.losses) < 1e-6
    for k, v in interpolate(sd, sd, 0.0).items():
        assert torch.equal(v, sd[k])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_weight_matching_on_gpu_matches_cpu() -> None:
    model = _model("resnet8", (1, 8, 8))
    sd = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    spec = spec_for(model)
    shuffled = apply_permutation(spec, random_permutation(spec, sd, seed=3), sd)
    cpu = weight_matching(spec, sd, shuffled, seed=0)
    gpu = weight_matching(spec, sd, shuffled, seed=0, device="cuda")
    assert all(torch.equal(cpu.perm[p], gpu.perm[p]) for p in cpu.perm)


def test_interpolate_is_the_linear_merge_bit_for_bit() -> None:
    """align/ depends on torch only, so it interpolates itself; it must match the engine's linear method."""
    from mergelab.merge.state_dicts import merge_state_dicts

    a = _model("vgg6bn", (1, 8, 8), seed=0).state_dict()
    b = _model("vgg6bn", (1, 8, 8), seed=1).state_dict()
    for alpha in (0.1, 0.3, 0.5, 0.77):
        ours = interpolate(a, b, alpha)
        ref = merge_state_dicts([a, b], "linear", weights=[1.0 - alpha, alpha])
        assert ours.keys() == ref.keys()
        assert all(torch.equal(ours[k], ref[k]) and ours[k].dtype == ref[k].dtype for k in ref)

