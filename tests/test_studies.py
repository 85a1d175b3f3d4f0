"""The studies end to end on tiny zoos (sklearn digits, a few hundred examples, one epoch)."""

from __future__ import annotations

import csv
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mergelab.analysis.weight_stats import check_bounds, scale_state_dict
from mergelab.soups import uniform_soup
from mergelab.studies import DESCRIPTIONS, STUDIES, run_study
from mergelab.studies.common import ZooEval, splits
from mergelab.studies.weights_vs_features import BN_METHODS, METHODS
from mergelab.zoo.train import train_zoo

TRAIN = {"n_train": 300, "epochs": 1, "pretrain_epochs": 1, "width": 4, "workers": 1}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path_factory.getbasetemp() / "studies-cache"))


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _pngs_referenced(report: Path) -> None:
    text = report.read_text()
    pngs = sorted(p.name for p in report.parent.glob("*.png"))
    assert pngs
    for name in pngs:
        assert name in text, f"{name} not in {report}"
    assert text.count("data:image/png;base64,") == len(re.findall(r"<figure>", text)) >= len(pngs)


def test_registry() -> None:
    assert set(STUDIES) == set(DESCRIPTIONS) == {"weights-vs-features", "magnitude", "magnitude-deep", "templates",
                                                 "task-vectors", "rebasin", "merge-search", "task-vector-search",
                                                 "cross-dataset", "mode-connectivity", "swa", "vit-soups"}
    with pytest.raises(ValueError, match="magnitude"):
        run_study("nope", Path("/tmp/x"))


def test_weights_vs_features_tiny(tmp_path: Path) -> None:
    report = run_study("weights-vs-features", tmp_path, datasets=("digits",), archs=("linear", "vgg6bn"),
                       independent_archs=("vgg6bn",), ns=(2, 3), n_seeds=2, show_progress=False, **TRAIN)
    rows = _csv(tmp_path / "weights_vs_features.csv")
    # (linear, vgg6bn, vgg6bn indep.) × N × methods, the BN-reset soups only for the two BN zoos
    assert len(rows) == 3 * 2 * len(METHODS) - 2 * len(BN_METHODS)
    assert {r["seeds"] for r in rows} == {"2"}
    per_seed = _csv(tmp_path / "weights_vs_features_per_seed.csv")
    assert len(per_seed) == 2 * len(rows) and {r["seed"] for r in per_seed} == {"0", "1"}
    acc = {(r["zoo"], r["N"], r["method"]): float(r["test_acc"]) for r in rows}
    val = {(r["zoo"], r["N"], r["method"]): float(r["val_acc"]) for r in rows}
    picks = {(r["seed"], r["zoo"], r["N"], r["method"]): r["selected"] for r in per_seed}
    for n in ("2", "3"):
        assert acc[("linear", n, "uniform_soup")] == acc[("linear", n, "logit_ensemble")]
        assert ("linear", n, "uniform_soup_bn_reset") not in acc
        for z in ("linear", "vgg6bn"):
            assert val[(z, n, "greedy_soup")] >= val[(z, n, "best_single")]
            for s in ("0", "1"):  # the paper's greedy ensemble ensembles exactly the greedy soup's picks
                assert picks[(s, z, n, "soup_picks_logit_ensemble")] == picks[(s, z, n, "greedy_soup")]
        assert ("vgg6bn", n, "uniform_soup_bn_reset") in acc
    claims = (tmp_path / "claims.md").read_text()  # the claims table, as the other claims studies write it
    assert "| Averaging outputs beats averaging weights: logit ensemble > uniform soup | Tab. 1, Fig. 3" in claims
    assert "The paper's claims beside ours" in report.read_text()
    versus = (tmp_path / "soup_vs_perf_ave.md").read_text()
    assert "5/7" in versus and "| ours, digits | vgg6bn |" in versus
    gaps = _csv(tmp_path / "gap_vs_n.csv")
    assert all(float(g["ci_low"]) <= float(g["gap"]) <= float(g["ci_high"]) for g in gaps)
    assert {g["seeds"] for g in gaps} == {"2"}
    table = (tmp_path / "table1.md").read_text()
    assert table.count("| digits |") == 3 * 2 and "Uniform soup" in table
    assert (tmp_path / "fig3_bars_N2.png").exists() and (tmp_path / "fig7a_gap_vs_n.png").exists()
    _pngs_referenced(report)
    with pytest.raises(ValueError, match="allowed"):
        run_study("weights-vs-features", tmp_path, no_such_option=1)


def test_magnitude_tiny(tmp_path: Path) -> None:
    report = run_study("magnitude", tmp_path, datasets=("digits",), archs=("linear", "vgg6"), cs=(1, 10),
                       ns=(2, 3), show_progress=False, **TRAIN)
    rows = _csv(tmp_path / "magnitude.csv")
    assert len(rows) == 2 * 2 * 2 * 5  # zoos × c × N × methods
    lin = {(r["c"], r["N"], r["method"]): float(r["test_acc"]) for r in rows if r["zoo"] == "linear"}
    assert lin[("1", "3", "uniform_soup")] == lin[("10", "3", "uniform_soup")] == lin[("10", "3", "logit_ensemble")]
    bounds = _csv(tmp_path / "weight_bounds.csv")
    assert all(b["max_bound_held"] == b["checks"] and b["var_bound_held"] == b["checks"] for b in bounds)
    _pngs_referenced(report)


def test_scaling_by_one_changes_nothing() -> None:
    zoo = train_zoo("vgg6bn", "digits", 2, "shared", show_progress=False, **TRAIN)
    sd = zoo.state_dicts()[0]
    for which in ("all", "weights"):
        same = scale_state_dict(sd, 1.0, which=which, include_bn_stats=True)  # type: ignore[arg-type]
        assert all(torch.equal(sd[k], same[k]) for k in sd)
    val, test = splits("digits", 0)
    plain = ZooEval(zoo, val, test)
    scaled = ZooEval(zoo, val, test, transform=lambda s: scale_state_dict(s, 1.0))
    assert plain.soup_acc([0, 1], "test") == scaled.soup_acc([0, 1], "test")
    assert plain.member_acc(1, "val") == scaled.member_acc(1, "val")
    ten = scale_state_dict(sd, 10.0, which="weights")
    assert torch.equal(ten["convs.0.weight"], sd["convs.0.weight"] * 10)
    assert torch.equal(ten["convs.1.bias"], sd["convs.1.bias"])  # BN affine bias is not a weight kernel
    assert torch.equal(ten["convs.1.running_var"], sd["convs.1.running_var"])


def test_bounds_hold_on_random_weights() -> None:
    g = torch.Generator().manual_seed(0)
    members = [{"a": torch.randn(5, 4, generator=g) * (i + 1), "b": torch.randn(7, generator=g)} for i in range(4)]
    checks = check_bounds(members, uniform_soup(members))
    assert [c.name for c in checks] == ["a", "b", "*"]
    assert all(c.max_bound_holds and c.var_bound_holds for c in checks)


def test_templates_tiny(tmp_path: Path) -> None:
    report = run_study("templates", tmp_path, datasets=("digits",), linear_epochs=2, cnn_arch="vgg6",
                       cnn_dataset="digits", kernels_shown=4, show_progress=False, **TRAIN)
    names = {p.name for p in tmp_path.glob("*.png")}
    assert names == {"fig1_templates_digits.png", "fig2_avg_templates_digits.png", "fig_conv_kernels.png"}
    rows = _csv(tmp_path / "templates.csv")
    assert sum(r["kind"] == "template" for r in rows) == 10
    _pngs_referenced(report)


def test_study_rejects_an_option_it_does_not_take(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="takes no option executor"):
        run_study("task-vectors", tmp_path / "x", quick=True, executor="ray")
    assert not (tmp_path / "x").exists()


def test_cli_study_refuses_a_wrong_option_and_an_existing_out(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mergelab.cli import app

    wrong = CliRunner().invoke(app, ["study", "task-vectors", "--out", str(tmp_path / "a"), "--executor", "ray"])
    assert wrong.exit_code == 2 and "takes no option executor" in wrong.output
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    busy = CliRunner().invoke(app, ["study", "templates", "--quick", "--out", str(tmp_path / "b")])
    assert busy.exit_code == 2 and "--overwrite" in busy.output
    assert (tmp_path / "b" / "keep.txt").read_text() == "mine"


def _synthetic_zoos(gaps: dict[str, float], ns: tuple[int, ...] = (2, 5), seeds: int = 1, examples: int = 400
                    ) -> tuple[list[dict[str, object]], dict[tuple[str, str, int, str], torch.Tensor]]:
    """Rows and per-example scores of shared-start zoos where every method is right on every example except
    the uniform soup, which misses the first ``gap`` (a fraction, times N / max N) of the examples."""
    rows: list[dict[str, object]] = []
    correct: dict[tuple[str, str, int, str], torch.Tensor] = {}
    for zoo, gap in gaps.items():
        for n in ns:
            for m in ("perf_ave", "greedy_soup", "logit_ensemble", "feature_ensemble", "greedy_logit_ensemble",
                      "soup_picks_logit_ensemble", "uniform_soup"):
                scores = torch.ones(seeds, examples, dtype=torch.float64)
                if m == "uniform_soup":
                    scores[:, : int(examples * gap * n / max(ns))] = 0.0
                correct[("digits", zoo, n, m)] = scores
                rows.append({"dataset": "digits", "zoo": zoo, "N": n, "method": m,
                             "test_acc": 100.0 * float(scores.mean())})
    return rows, correct


def _zoo_args(gaps: dict[str, float], cfg: object, seeds: int = 1) -> tuple[object, ...]:
    rows, correct = _synthetic_zoos(gaps, seeds=seeds)
    return rows, cfg, correct


def test_gap_vs_depth_claim_compares_the_deepest_with_the_shallowest_variant_of_each_family() -> None:
    from mergelab.studies.weights_vs_features import Config, _claims

    cfg = Config(datasets=("digits",), archs=("vgg6", "vgg9", "resnet8", "resnet14"), ns=(2, 5))
    deeper_loses_more = {"vgg6": 0.05, "vgg9": 0.25, "resnet8": 0.05, "resnet14": 0.20}
    claims, _, _ = _claims(*_zoo_args(deeper_loses_more, cfg))
    depth = next(c for c in claims if c.verdict.claim.startswith("The ensemble − soup gap is larger for the deeper"))
    assert depth.verdict.held is True and "N = 5" in depth.verdict.claim
    assert "vgg9 vs vgg6" in depth.setting and "resnet14 vs resnet8" in depth.setting
    assert [round(d.mean) for d in depth.ours] == [15, 20]  # resnet (20 − 5 points), vgg (25 − 5) at N = 5
    shallower_loses_more = {"vgg6": 0.25, "vgg9": 0.05, "resnet8": 0.20, "resnet14": 0.05}
    claims, _, _ = _claims(*_zoo_args(shallower_loses_more, cfg))
    depth = next(c for c in claims if c.verdict.claim.startswith("The ensemble − soup gap is larger for the deeper"))
    assert depth.verdict.held is False
    flat = {"vgg6": 0.1, "vgg9": 0.1}  # equal gaps: nothing to resolve
    claims, _, _ = _claims(*_zoo_args(flat, replace(cfg, archs=("vgg6", "vgg9"))))
    depth = next(c for c in claims if c.verdict.claim.startswith("The ensemble − soup gap is larger for the deeper"))
    assert depth.verdict.word == "no difference at this size"
    # one variant per family: no pair, no claim (rather than a verdict on nothing)
    claims, _, _ = _claims(*_zoo_args({"vgg6": 0.1, "resnet8": 0.1}, cfg))
    assert not any(c.verdict.claim.startswith("The ensemble − soup gap is larger") for c in claims)


def test_weights_vs_features_claims_rows_carry_the_paper_the_setting_and_the_members_accuracy() -> None:
    from mergelab.studies.weights_vs_features import Config, _claims

    cfg = Config(datasets=("digits",), archs=("vgg6", "vgg9"), ns=(2, 5), n_seeds=3)
    claims, verdicts, summary = _claims(*_zoo_args({"vgg6": 0.1, "vgg9": 0.3}, cfg, seeds=3))
    by = {c.verdict.claim: c for c in claims}
    logit = by["Averaging outputs beats averaging weights: logit ensemble > uniform soup"]
    assert logit.verdict.held is True and logit.paper_number.startswith("Tab. 1, Fig. 3")
    row = logit.as_row()
    assert "4 configuration(s), 3 seed(s)" in row["ours"] and "vgg6, vgg9 on digits" in row["setting"]
    assert row["regime"].startswith("members' mean test accuracy (Perf Ave, N = 5): vgg6 100.0 %, vgg9 100.0 %")
    perf = by["Uniform soup of shared-start fine-tunes > the mean of its members (Perf Ave)"]
    assert "5 of 7 datasets" in perf.paper_number and perf.verdict.held is False
    assert "Fig. 7a" in by["The ensemble − soup gap grows with N (N = 2 → 5)"].paper_number
    assert [v.claim for v in verdicts] == list(by) == list(summary)  # no linear zoo: no check


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_every_study_refuses_an_existing_output_and_an_unknown_option_before_any_work(name: str,
                                                                                      tmp_path: Path) -> None:
    """The skeleton (studies.common.run_config) orders every study the same way: options checked, then the
    output folder, then the work. Each call returns at once: nothing is trained or loaded."""
    from mergelab.errors import OutputExistsError

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        run_study(name, busy, quick=True)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="no_such_option"):
        run_study(name, tmp_path / "new", quick=True, no_such_option=1)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(("name", "option", "message"), [
    ("magnitude", {"which": "biases"}, "which must be"), ("weights-vs-features", {"eval_mode": "test"}, "eval_mode"),
    ("swa", {"n_soup": 1}, "n_soup"), ("vit-soups", {"ns": (5,)}, "two values of N"),
    ("mode-connectivity", {"points": 2}, "points"), ("task-vector-search", {"suite": "audio"}, "unknown suite"),
    ("task-vectors", {"suite": "audio"}, "unknown suite"),
])
def test_a_bad_setting_fails_before_the_output_folder_is_made(name: str, option: dict, message: str,
                                                               tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        run_study(name, tmp_path / "new", quick=True, **option)
    assert not (tmp_path / "new").exists()
