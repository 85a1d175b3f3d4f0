"""The demo's "The paper's claims" table: one row per claim of issue 14, the demo's own verdict where it measured
the claim, otherwise the study that does, and the verdicts of a run of that study when one is given."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import pytest

from mergelab.report import Report, Section, Verdict
from mergelab.studies import STUDIES
from mergelab.studies import magnitude as shallow_magnitude
from mergelab.studies.demo import claims_section
from mergelab.studies.paper_claims import PAPER_CLAIMS, find_runs, paper_claims_table

#: issue 14's claims, by a word each row must carry
ISSUE_CLAIMS = ("robust", "flips", "Feature ensembles are more robust", "overflow", "beats averaging weights",
                "Perf Ave", "greedy soup's picks", "BN reset", "grows with N", "grows with depth", "ViT soups collapse",
                "different datasets", "SWA", "mode-connected")

DEMO_VERDICTS = [  # the demo's claim texts (weights-vs-features and magnitude at depth ≤ 8, one seed)
    Verdict("Averaging outputs beats averaging weights: logit ensemble > uniform soup", True, "d"),
    Verdict("Averaging features beats averaging weights: feature ensemble > uniform soup", None, "d",
            undecided="no difference at this size"),
    Verdict("The ensemble − soup gap grows with N (N = 2 → 7)", False, "d"),
    Verdict("Soups are more robust to the weight scale than logit ensembles (c = 1 → 110: the ensemble's drop "
            "exceeds the soup's)", None, "d"),
    Verdict("For a linear model the uniform soup is the logit ensemble (the same function)", True, "d", kind="check"),
]


def _run(folder: Path, study: str, verdicts: dict[str, object], *, quick: bool = False, ours: dict[str, str] | None
         = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "report.html").write_text("<html></html>")
    (folder / "mergelab.json").write_text(json.dumps({"study": study, "quick": quick, "config": {"n_seeds": 3},
                                                      "verdicts": verdicts}))
    if ours is not None:
        (folder / "claims.csv").write_text("claim,ours\n" + "".join(f'"{k}","{v}"\n' for k, v in ours.items()))
    return folder


def test_every_claim_of_issue_14_has_one_row_naming_the_paper_and_the_study_that_measures_it() -> None:
    table = paper_claims_table([], {}, base=Path("."))
    assert len(table.rows) == len(PAPER_CLAIMS) == len(ISSUE_CLAIMS)
    for word, row in zip(ISSUE_CLAIMS, table.rows, strict=True):
        assert word in row["claim"], (word, row["claim"])
        assert row["paper"] and row["here"] == "not measured by this run"
        study = row["study"].strip("`").removeprefix("mergelab study ")
        assert study in STUDIES and row["run"] == f"no run given; run `mergelab study {study} --out DIR`"
    assert "5 of 7 datasets" in table.rows[5]["paper"] and "5.8 %" in table.rows[11]["paper"]


def test_each_claims_verdict_text_start_is_one_its_study_or_the_demo_writes() -> None:
    # the rows find verdicts by the start of their claim text: a study that rewords a claim must fail here, not
    # leave its row silently empty
    for pc in PAPER_CLAIMS:
        source = inspect.getsource(importlib.import_module(f"mergelab.studies.{pc.study.replace('-', '_')}"))
        for start in pc.starts:
            assert start in source or start in inspect.getsource(shallow_magnitude), (pc.study, start)


def test_the_demos_own_verdicts_fill_the_rows_it_measured_and_only_those() -> None:
    table = paper_claims_table(DEMO_VERDICTS, {}, base=Path("."), measured_by="the demo")
    here = {r["claim"]: r["here"] for r in table.rows}
    assert here["Averaging features or outputs beats averaging weights"] == (
        "held (Averaging outputs beats averaging weights: logit ensemble > uniform soup); no difference at this "
        "size (Averaging features beats averaging weights: feature ensemble > uniform soup)")
    assert here["The ensemble − soup gap grows with N"].startswith("did not hold (The ensemble − soup gap grows")
    assert here["Soups are more robust than logit ensembles to scaling every weight by c"].startswith("mixed (Soups")
    # the demo has no family at two depths, and no ViT, SWA … claims: those rows name their study instead
    assert here["The ensemble − soup gap grows with depth"] == "not measured by the demo"
    assert sum(v == "not measured by the demo" for v in here.values()) == len(PAPER_CLAIMS) - 3
    assert "check passed" not in " ".join(here.values())  # an identity is never evidence for a claim


def test_a_given_run_of_a_study_is_linked_with_its_verdicts_and_numbers_full_runs_first(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    swa_claim = "SWA (constant lr) > the last checkpoint of the same run"
    _run(runs / "swa-quick", "swa", {swa_claim: "did not hold"}, quick=True)
    _run(runs / "swa", "swa", {swa_claim: "held", "SWA > a uniform soup of independent runs": "mixed"},
         ours={swa_claim: "+1.2 points (CIs from +0.4 to +2.0 over 2 configuration(s), 3 seed(s))"})
    _run(runs / "deep" / "magnitude-deep", "magnitude-deep", {  # records {outcome, detail}, two levels down
        "Soup beats the logit ensemble at c = 90–110 (float32)": {"outcome": "held", "detail": "…"},
        "Soup beats the logit ensemble at c = 90–110 (float64)": {"outcome": "no difference at this size",
                                                                   "detail": "…"}})
    (runs / "notes").mkdir()
    (runs / "notes" / "mergelab.json").write_text("not json")  # ignored, like a folder without a record
    found = find_runs(runs)
    assert sorted(found) == ["magnitude-deep", "swa"] and found["swa"].folder == runs / "swa"
    demo_out = tmp_path / "demo"
    table = paper_claims_table([], found, base=demo_out, runs_folder=runs)
    run = {r["claim"]: r["run"] for r in table.rows}
    assert run["SWA beats the last checkpoint and a soup of independent runs"] == (
        "[swa report](../runs/swa/report.html) (full run, 3 seed(s)): held (SWA (constant lr) > the last checkpoint "
        "of the same run: ours +1.2 points (CIs from +0.4 to +2.0 over 2 configuration(s), 3 seed(s))); mixed (SWA > "
        "a uniform soup of independent runs)")
    deep = run["float32 overflow explains the robustness gap (the issue's hypothesis; float32 vs float64)"]
    assert deep.startswith("[magnitude-deep report](../runs/deep/magnitude-deep/report.html) (full run, 3 seed(s)): "
                           "held (Soup beats the logit ensemble at c = 90–110 (float32)); no difference at this size")
    assert run["The soup − ensemble gap flips sign near ×90 (ensembles ahead before)"].endswith(
        "the run recorded no verdict on this claim")
    assert run["Merging models trained on different datasets: the soup scores on both, ensembles stay near model 1"] \
        == f"no run of it in `{runs}`; run `mergelab study cross-dataset --out DIR`"
    html = table.to_html()
    assert '<a href="../runs/swa/report.html">swa report</a>' in html
    assert "<code>mergelab study cross-dataset --out DIR</code>" in html


def test_the_demo_report_opens_with_the_claims_section(tmp_path: Path) -> None:
    part = Report("part").add(Section("Weights vs features", verdicts=DEMO_VERDICTS))
    section, table = claims_section([part], tmp_path / "demo", None)
    assert section.title == "The paper's claims" and section.tables == [table]
    assert "`mergelab demo --runs DIR`" in section.text[0]
    assert len(table.rows) == len(PAPER_CLAIMS)
    assert table.rows[4]["here"].startswith("held (Averaging outputs beats averaging weights")


def test_run_demo_writes_the_claims_table_and_links_the_runs_it_is_given(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from mergelab.studies import demo, magnitude, templates, weights_vs_features

    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    tiny = {"n_train": 300, "epochs": 1, "pretrain_epochs": 1, "width": 4, "workers": 1}
    monkeypatch.setattr(demo, "demo_configs", lambda seed: (
        weights_vs_features.Config(datasets=("digits",), archs=("linear", "vgg6"), independent_archs=(), ns=(2, 3),
                                   n_seeds=1, seed=seed, **tiny),
        magnitude.Config(datasets=("digits",), archs=("linear",), cs=(1, 10), ns=(2,), seed=seed, **tiny),
        templates.Config(datasets=("digits",), linear_epochs=1, cnn_arch="vgg6", cnn_dataset="digits",
                         kernels_shown=4, seed=seed, **tiny)))
    _run(tmp_path / "runs" / "vit-soups", "vit-soups", {"The soup's fall from N = 2 to 10 is larger with a random "
                                                       "input layer than with no input layer": "held"})
    report = demo.run_demo(tmp_path / "demo", show_progress=False, runs=tmp_path / "runs")
    html = report.read_text()
    assert html.index("The paper&#x27;s claims") < html.index("Weights vs features")
    assert '<a href="../runs/vit-soups/report.html">vit-soups report</a>' in html
    claims = (tmp_path / "demo" / "claims.md").read_text()
    assert claims.count("\n| ") == len(PAPER_CLAIMS) + 1  # the header, then one row per claim
    assert "| The ensemble − soup gap grows with N | Fig. 7a" in claims
    assert "(full run, 3 seed(s)): held (The soup's fall" in claims
