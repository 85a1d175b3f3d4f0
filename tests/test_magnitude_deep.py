"""The depth-19 magnitude study's pieces: the float32 overflow prediction against hand-built deep nets,
BatchNorm's scale invariance and which statistics each setting uses, BN folding, non-finite counting, and a
tiny end-to-end run where float32 overflows and float64 does not."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mergelab.analysis.overflow import (
    F32_MAX,
    crossing_c,
    first_nonfinite_c,
    growth_degree,
    max_finite_abs,
    nonfinite_rows,
    predicted_overflow_c,
)
from mergelab.analysis.weight_stats import scale_state_dict
from mergelab.ensemble import ensemble_logits, model_outputs
from mergelab.soups import uniform_soup
from mergelab.studies import run_study
from mergelab.studies.magnitude_deep import (
    Config,
    Setting,
    evaluate_cell,
    member_accuracy_at_1,
    regime,
    settings_for,
)
from mergelab.zoo.models import bn_layers, build_model, fold_batchnorm, weight_layers

TRAIN = {"n_train": 300, "epochs": 1, "pretrain_epochs": 1, "width": 4, "workers": 1}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path_factory.getbasetemp() / "magnitude-deep-cache"))


def _deep_linear(depth: int, gain: float = 1.0) -> nn.Sequential:
    """``depth`` bias-free 3×3 linear layers, each ``gain`` × a rotation: |output| = gain^depth · |input|."""
    q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    layers = [nn.Linear(3, 3, bias=False) for _ in range(depth)]
    for layer in layers:
        layer.weight.data = (gain * q).float()
    return nn.Sequential(*layers)


def _at_scale(net: nn.Module, c: float, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    scaled = nn.Sequential(*[nn.Linear(3, 3, bias=False) for _ in net]).to(dtype)
    scaled.load_state_dict({k: v.to(dtype) for k, v in scale_state_dict(net.state_dict(), c).items()})
    with torch.no_grad():
        return scaled(x.to(dtype))


def test_predicted_overflow_c_is_where_a_19_layer_net_leaves_float32_but_not_float64() -> None:
    net = _deep_linear(19)
    x = torch.tensor([[2.5, -1.0, 0.5]])
    with torch.no_grad():
        mag = float(net(x).abs().max())  # rotations keep the norm: about |x|, not a hand-picked number
    c_star = predicted_overflow_c(mag, 19)
    assert 100 < c_star < 110  # the "c ≈ 106 for L = 19" for |logit| of a few units
    assert nonfinite_rows(_at_scale(net, 0.99 * c_star, x, torch.float32)).tolist() == [False]
    assert nonfinite_rows(_at_scale(net, 1.01 * c_star, x, torch.float32)).tolist() == [True]
    assert nonfinite_rows(_at_scale(net, 1.5 * c_star, x, torch.float64)).tolist() == [False]


def test_the_mean_of_n_members_logits_overflows_n_to_the_minus_1_over_l_earlier() -> None:
    depth, n = 19, 5
    nets = [_deep_linear(depth, gain) for gain in (1.0, 1.0, 1.0, 1.0, 1.0)]
    x = torch.tensor([[2.5, -1.0, 0.5]])
    with torch.no_grad():
        mag = float(nets[0](x).abs().max())
    c_member = predicted_overflow_c(mag, depth)
    c_sum = predicted_overflow_c(n * mag, depth)
    assert c_sum == pytest.approx(c_member * n ** (-1 / depth))
    c = 0.5 * (c_sum + c_member)  # between the two: members and their soup finite, the ensemble's sum is not
    members = [_at_scale(m, c, x, torch.float32) for m in nets]
    assert not any(nonfinite_rows(m).any() for m in members)
    assert nonfinite_rows(ensemble_logits(members)).all()
    soup = nn.Sequential(*[nn.Linear(3, 3, bias=False) for _ in range(depth)])
    soup.load_state_dict(uniform_soup([m.state_dict() for m in nets]))
    assert not nonfinite_rows(_at_scale(soup, c, x, torch.float32)).any()
    assert not nonfinite_rows(ensemble_logits([_at_scale(m, c, x, torch.float64) for m in nets])).any()


def test_growth_degree_and_crossing_recover_a_power_law() -> None:
    cs = [10.0, 20.0, 40.0, 80.0]
    mags = [2.0 * c**7 for c in cs]
    assert growth_degree(cs[0], mags[0], cs[-1], mags[-1]) == pytest.approx(7.0)
    expected = predicted_overflow_c(2.0, 7)  # beyond the grid: extrapolated with the last slope
    assert crossing_c(cs, mags) == pytest.approx(expected, rel=1e-9)
    inside = [2.0 * c**21 for c in cs]  # crosses 3.4e38 between 40 and 80
    assert 40 < crossing_c(cs, inside) < 80
    assert crossing_c(cs, inside) == pytest.approx(predicted_overflow_c(2.0, 21), rel=1e-9)
    assert math.isnan(crossing_c([1.0], [1.0]))


def test_nonfinite_rows_and_first_overflow() -> None:
    logits = torch.tensor([[1.0, 2.0], [math.inf, 0.0], [math.nan, 1.0], [-math.inf, -math.inf], [3e38, -3e38]])
    assert nonfinite_rows(logits).tolist() == [False, True, True, True, False]
    assert max_finite_abs(logits) == pytest.approx(3e38)
    assert max_finite_abs(torch.tensor([math.inf, math.nan])) == 0.0
    assert first_nonfinite_c([1, 50, 100, 150], [0.0, 0.0, 2.5, 100.0]) == 100
    assert first_nonfinite_c([1, 50], [0.0, 0.0]) == math.inf
    assert math.isclose(F32_MAX, 3.4028e38, rel_tol=1e-4)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = build_model("vgg6bn", (1, 8, 8), 4, width=4)
    net.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(5):
            net(torch.randn(32, 1, 8, 8) * 3 + 1)
    return net.eval()


def test_bn_in_eval_mode_is_scale_invariant_when_its_statistics_scale_like_the_activations() -> None:
    net = _bn_net()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        ref = net(x)
    c = 50.0
    sd = net.state_dict()
    convs = [k for k in sd if k.startswith("convs.") and k.endswith(".weight") and sd[k].dim() == 4]
    bns = {k.rsplit(".", 1)[0] for k in sd if k.endswith("running_var")}
    invariant = dict(sd)
    for k in convs:
        invariant[k] = sd[k] * c  # each conv's output ×c …
    for b in bns:  # … and its BN statistics as those outputs scale: mean ×c, variance ×c²
        invariant[f"{b}.running_mean"] = sd[f"{b}.running_mean"] * c
        invariant[f"{b}.running_var"] = sd[f"{b}.running_var"] * c**2
    twin = _bn_net()
    twin.load_state_dict(invariant)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), ref, rtol=1e-3, atol=1e-3)
        # the paper's literal scaling (every entry ×c, the variance too) is not that identity
        twin.load_state_dict(scale_state_dict(sd, c, which="all", include_bn_stats=True))
        assert not torch.allclose(twin(x), ref, rtol=0.1, atol=0.1)


def test_batch_statistics_ignore_the_running_statistics_exactly() -> None:
    net = _bn_net()
    x = torch.randn(40, 1, 8, 8)
    outs = []
    for scaling in ("params", "state_dict"):
        twin = _bn_net()
        twin.load_state_dict(scale_state_dict(net.state_dict(), 30.0, which="all",
                                              include_bn_stats=scaling == "state_dict"))
        outs.append(model_outputs(twin, x, mode="train", batch_size=20).logits)
    assert torch.equal(outs[0], outs[1])
    # with running statistics the two scalings differ
    evals = []
    for scaling in ("params", "state_dict"):
        twin = _bn_net()
        twin.load_state_dict(scale_state_dict(net.state_dict(), 30.0, which="all",
                                              include_bn_stats=scaling == "state_dict"))
        evals.append(model_outputs(twin, x, mode="eval").logits)
    assert not torch.allclose(evals[0], evals[1])


def test_fold_batchnorm_keeps_the_function_and_refuses_resnets() -> None:
    net = _bn_net()
    plain = fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), net(x), rtol=1e-4, atol=1e-5)
    assert weight_layers(plain) == weight_layers(net) == 6
    with pytest.raises(ValueError, match="cannot be folded"):
        fold_batchnorm(build_model("resnet8", (1, 8, 8), 4, width=4))


def test_depth_19_zoo_architectures() -> None:
    for arch, depth, bns in (("vgg19", 19, (0, 19)), ("vgg19bn", 19, (16, 3)), ("resnet20", 20, (19, 1))):
        model = build_model(arch, (1, 28, 28), 10, width=4)
        assert weight_layers(model) == depth
        assert bn_layers(model) == bns  # BN layers in series, weight layers after the last one
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    cfg = Config()
    assert [s.key for s in settings_for("vgg19bn", cfg)] == ["params/running", "state_dict/running",
                                                             "state_dict/batch"]
    assert [s.key for s in settings_for("vgg19bn-folded", cfg)] == [s.key for s in settings_for("vgg19", cfg)] \
        == [s.key for s in settings_for("vgg19nb-folded", cfg)] == ["state_dict/none"]
    with pytest.raises(ValueError, match="unknown architecture"):
        settings_for("vgg100", cfg)


def test_evaluate_cell_counts_overflow_in_float32_only() -> None:
    torch.manual_seed(0)
    nets = [fold_batchnorm(_bn_net()) for _ in range(2)]
    sds = [n.state_dict() for n in nets]
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 4, (10,))
    for dtype, expect in ((torch.float32, 100.0), (torch.float64, 0.0)):
        cell = evaluate_cell(nets[0], sds, x, y, c=1e8, setting=Setting("state_dict", "none"), dtype=dtype,
                             ns=(2,), batch_size=5)
        by = {(r["method"], r["member"]): r for r in cell.rows}
        assert by[("member", 0)]["nonfinite_pct"] == expect  # 1e8^6 · |logit| ≫ 3.4e38, ≪ 1.8e308
        assert by[("logit_ensemble", "")]["nonfinite_pct"] == expect
        assert set(cell.correct) == {("uniform_soup", 2), ("logit_ensemble", 2), ("feature_ensemble", 2)}


def test_magnitude_deep_tiny(tmp_path: Path) -> None:
    report = run_study("magnitude-deep", tmp_path, datasets=("digits",), archs=("vgg6bn-folded", "vgg6bn"),
                       n_seeds=1, n_models=2, ns=(2,), cs=(1, 1e7), n_test=100, min_depth=6,
                       show_progress=False, **TRAIN)
    with (tmp_path / "magnitude_deep.csv").open() as f:
        rows = list(csv.DictReader(f))
    # (folded: 1 setting + BN: 3 settings) × 2 dtypes × 2 c × (2 members + perf_ave, soup, logit, feature)
    assert len(rows) == 4 * 2 * 2 * 6
    nf = {(r["arch"], r["setting"], r["dtype"], float(r["c"]), r["method"], r["member"]): float(r["nonfinite_pct"])
          for r in rows}
    acc = {(r["arch"], r["setting"], r["dtype"], float(r["c"]), r["method"], r["member"]): float(r["test_acc"])
           for r in rows}
    # vgg6: c^6 · |logit| ≫ 3.4e38 at c = 1e7 (every example overflows), ≪ 1.8e308 in float64
    assert nf[("vgg6bn-folded", "state_dict/none", "float32", 1e7, "member", "0")] == 100.0
    assert all(v == 0.0 for k, v in nf.items() if k[2] == "float64")
    assert all(v == 0.0 for k, v in nf.items() if k[3] == 1.0)
    for k, v in acc.items():  # at c = 1 float32 and float64 agree
        if k[3] == 1.0 and k[2] == "float32":
            assert v == acc[(k[0], k[1], "float64", *k[3:])]
    record = json.loads((tmp_path / "mergelab.json").read_text())
    outcomes = {v["outcome"] for v in record["verdicts"].values()}
    assert "outside the regime" in outcomes  # one seed: the regime check (≥ 3 seeds) fails
    assert (tmp_path / "overflow.md").exists() and (tmp_path / "regime.md").exists()
    claims = {r["claim"]: r for r in csv.DictReader((tmp_path / "claims.csv").open())}  # checks are not claims
    assert len(claims) == 6 and {r["verdict"] for r in claims.values()} == {"outside the regime"}
    hypothesis = next(r for c, r in claims.items() if c.startswith("Overflow hypothesis"))
    assert hypothesis["ours"] == "no zoo in the regime" and "c ≈ 107 for L = 19" in hypothesis["paper"]
    assert "vgg6bn OUT (L = 6 (≥ 6), members at c = 1 (%)" in hypothesis["regime"]
    with (tmp_path / "overflow.csv").open() as f:
        overflow = list(csv.DictReader(f))
    # the logits' growth degree measured in float64 is the predicted one in every setting (L = 6, B = 4, F = 2)
    measured = {(r["zoo"], r["setting"]): float(r["degree"]) for r in overflow if r["method"] == "members (each)"}
    assert {k: float(r["predicted_degree"]) for r in overflow for k in [(r["zoo"], r["setting"])]} \
        == pytest.approx(measured, abs=0.05)
    assert sorted(measured.values()) == pytest.approx([3.0, 6.0, 8.0, 10.0], abs=0.05)
    assert "fig_gap_float32_vs_float64.png" in report.read_text()


def test_folded_scalenorm_vgg_is_homogeneous_so_scaling_never_changes_a_float64_prediction() -> None:
    torch.manual_seed(0)
    net = build_model("vgg19nb", (1, 28, 28), 10, width=4)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(32, 1, 28, 28))
    net.eval()
    plain = fold_batchnorm(net).double()
    assert not any("bias" in k for k in plain.state_dict())  # no bias anywhere: nothing shrinks relative to c^L
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), net.double()(x))
        twin = fold_batchnorm(net).double()
        twin.load_state_dict(scale_state_dict(plain.state_dict(), 100.0))
        torch.testing.assert_close(twin(x), plain(x) * 100.0**19, rtol=1e-9, atol=0.0)
        # a folded BatchNorm VGG has biases (the centring): at large c they vanish relative to c^L
        bn = fold_batchnorm(_bn_net()).double()
        bn_twin = fold_batchnorm(_bn_net()).double()
        bn_twin.load_state_dict(scale_state_dict(bn.state_dict(), 100.0))
        y = torch.randn(6, 1, 8, 8, dtype=torch.float64)
        assert not torch.allclose(bn_twin(y), bn(y) * 100.0**6, rtol=1e-3)


def _regime_rows(settings: dict[str, float], seeds: int = 3) -> list[dict[str, object]]:
    """Member rows at c = 1 of one vgg19bn zoo: ``settings`` maps a setting key to its members' accuracy."""
    return [{"dataset": "mnist5k", "arch": "vgg19bn", "setting": key, "seed": s, "dtype": dtype, "c": c,
             "method": "member", "member": m, "test_acc": acc if c == 1 else 10.0, "nonfinite_pct": 0.0}
            for key, acc in settings.items() for s in range(seeds) for dtype in ("float32", "float64")
            for c in (1.0, 100.0) for m in range(2)]


def _regime_results(settings: dict[str, float]) -> list[SimpleNamespace]:
    return [SimpleNamespace(depth=19, job=SimpleNamespace(arch="vgg19bn", spec=SimpleNamespace(
        config=SimpleNamespace(dataset="mnist5k")), setting=Setting(*key.split("/")))) for key in settings]


def test_a_bn_zoo_run_with_batch_statistics_only_is_judged_on_its_batch_statistics_members() -> None:
    # the paper's protocol alone (bn_evals=("batch",)): no running-statistics row exists; the members' accuracy
    # at c = 1 is read with batch statistics instead of coming out as nan and putting the zoo out of the regime
    only_batch = {"state_dict/batch": 95.0}
    table, ok = regime(_regime_results(only_batch), _regime_rows(only_batch), Config())  # type: ignore[arg-type]
    assert ok == {("mnist5k", "vgg19bn"): True}
    assert table[0]["members at c = 1 (%)"] == "95.0 (≥ 90, batch BN stats)"
    assert member_accuracy_at_1(_regime_rows(only_batch), "mnist5k", "vgg19bn", "float32") == ([95.0] * 6, "batch")


def test_running_statistics_members_decide_the_regime_when_the_zoo_ran_with_them() -> None:
    # the deployed model (running statistics) is what must have learned; batch statistics only stand in
    both = {"params/running": 60.0, "state_dict/running": 60.0, "state_dict/batch": 95.0}
    table, ok = regime(_regime_results(both), _regime_rows(both), Config())  # type: ignore[arg-type]
    assert ok == {("mnist5k", "vgg19bn"): False}
    assert table[0]["members at c = 1 (%)"] == "60.0 (< 90)"
    accs, stats = member_accuracy_at_1(_regime_rows(both), "mnist5k", "vgg19bn", "float32")
    assert (len(accs), stats) == (6, "running")  # one setting's rows: 3 seeds × 2 members, not counted twice
