"""The Rethinking paper's claims (issue 14), one row each: the paper's number, this run's verdict where the run
measured the claim, the study that measures it in the paper's regime (with its command), and that study's
verdict and numbers when a run of it is given.

Nothing here measures anything: a cell holds a verdict word that a study's :func:`~mergelab.studies.verdict.
claim_verdict` gave (this run's, or the one recorded in a study run's ``mergelab.json``), the "ours" text of the
run's ``claims.csv``, or says that nothing measured the claim. A claim's verdicts are found by the start of
their claim text (the studies' claim texts carry their parameters, e.g. ``c = 90–110``, after a fixed start).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergelab.report import Table, Verdict
from mergelab.report.tables import read_csv


@dataclass(frozen=True)
class PaperClaim:
    claim: str  # as issue 14 states it
    paper: str  # the paper's number or statement
    study: str  # the study that measures it in the paper's regime
    starts: tuple[str, ...]  # the start of the claim text of every verdict that measures it (demo and study)


PAPER_CLAIMS: tuple[PaperClaim, ...] = (
    PaperClaim("Soups are more robust than logit ensembles to scaling every weight by c",
               "Fig. 4, 7b, Tab. 10 (VGG-19, CIFAR): soups keep their accuracy at large c, ensembles lose it",
               "magnitude-deep", ("Soups are more robust to the weight scale", "Soup beats the logit ensemble at c =")),
    PaperClaim("The soup − ensemble gap flips sign near ×90 (ensembles ahead before)",
               "Fig. 7c, Tab. 10: flip near c ≈ 90, gap peaking near c ≈ 100–110", "magnitude-deep",
               ("Before the flip (c = 1) the logit ensemble beats the soup",)),
    PaperClaim("Feature ensembles are more robust to ×c than logit ensembles",
               "Fig. 7b: feature ensembles degrade less than logit ensembles", "magnitude-deep",
               ("Feature ensemble beats the logit ensemble at c =",)),
    PaperClaim("float32 overflow explains the robustness gap (the issue's hypothesis; float32 vs float64)",
               "not in the paper: logits ∝ c^L leave float32 near c ≈ 106 for L = 19, the mean of N members' logits "
               "first", "magnitude-deep", ("Overflow hypothesis", "Soup beats the logit ensemble at c =")),
    PaperClaim("Averaging features or outputs beats averaging weights",
               "Tab. 1, Fig. 3: logit and feature ensembles above the uniform soup", "weights-vs-features",
               ("Averaging outputs beats averaging weights", "Averaging features beats averaging weights")),
    PaperClaim("Uniform soup vs the mean of its members (Perf Ave)",
               "Tab. 1: the uniform soup is below Perf Ave on 5 of 7 datasets", "weights-vs-features",
               ("Uniform soup of shared-start fine-tunes > the mean of its members",)),
    PaperClaim("Greedy ensembles built from the greedy soup's picks beat the greedy soup",
               "Tab. 1: greedy ensembles (the greedy soup's ingredients, ensembled) above greedy soups",
               "weights-vs-features", ("Greedy ensemble of the greedy soup's picks",)),
    PaperClaim("A BN reset on training data lifts the soup; ensembles still ahead after it",
               "not the paper's protocol (it keeps the averaged running statistics); REPAIR re-estimates them",
               "weights-vs-features",
               ("A BN reset on training data lifts", "Logit ensemble > uniform soup even after")),
    PaperClaim("The ensemble − soup gap grows with N", "Fig. 7a: the gap widens as more models are combined",
               "weights-vs-features", ("The ensemble − soup gap grows with N",)),
    PaperClaim("The ensemble − soup gap grows with depth",
               "no number in the paper (its nets are VGG-19/ResNet-like deep)", "weights-vs-features",
               ("The ensemble − soup gap is larger for the deeper variant",)),
    PaperClaim("ViT soups collapse as N grows (the paper's unseeded random input layer)",
               "Tab. 9: ViT uniform soups collapse as N grows", "vit-soups",
               ("With a random input layer per member", "The soup's fall from N =")),
    PaperClaim("Merging models trained on different datasets: the soup scores on both, ensembles stay near model 1",
               "Tab. 3: on CIFAR-100 model 1 (CIFAR-10) 5.8 %, the soup 49.6 %", "cross-dataset",
               ("On dataset B the soup", "On dataset A the")),
    PaperClaim("SWA beats the last checkpoint and a soup of independent runs",
               "Izmailov et al. 2018: about +1 to +2 points over conventional SGD on CIFAR-100 (the lecture's SWA)",
               "swa", ("SWA",)),
    PaperClaim("Shared-start fine-tunes are linearly mode-connected; independent runs are not",
               "Frankle et al. 2020: barrier ≈ 0 between fine-tunes of one start; Git Re-Basin lowers it for "
               "independent runs", "mode-connectivity",
               ("Shared-start fine-tunes have a lower loss barrier", "Weight matching lowers the barrier")),
)


@dataclass(frozen=True)
class StudyRun:
    """One run of a study found in the folder the user gave: its report, record and claims table."""

    folder: Path
    record: Mapping[str, Any]

    @property
    def verdicts(self) -> dict[str, str]:
        """Claim → verdict word (claims studies record the word; the others ``{"outcome", "detail"}``)."""
        raw = self.record.get("verdicts", {})
        return {k: v["outcome"] if isinstance(v, dict) else str(v) for k, v in raw.items()}

    @property
    def ours(self) -> dict[str, str]:
        """Claim → the "ours" cell of the run's claims table (difference, CI range, configurations, seeds)."""
        path = self.folder / "claims.csv"
        return {r["claim"]: r["ours"] for r in read_csv(path)} if path.exists() else {}

    def describe(self) -> str:
        cfg = self.record.get("config", {})
        seeds = f"{cfg['n_seeds']} seed(s)" if "n_seeds" in cfg else ""
        return ", ".join(p for p in ("quick run" if self.record.get("quick") else "full run", seeds) if p)


def find_runs(folder: Path | None) -> dict[str, StudyRun]:
    """Study name → the run of it in ``folder`` (``folder`` itself or a sub-folder up to two levels down, each
    holding ``mergelab.json``); a full run is preferred to a quick one, then the newest."""
    if folder is None or not Path(folder).is_dir():
        return {}
    found: dict[str, list[tuple[bool, float, StudyRun]]] = {}
    for path in (Path(folder) / "mergelab.json", *Path(folder).glob("*/mergelab.json"),
                 *Path(folder).glob("*/*/mergelab.json")):
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("study"), str):
            run = StudyRun(path.parent, record)
            found.setdefault(record["study"], []).append((not record.get("quick"), path.stat().st_mtime, run))
    return {name: max(runs, key=lambda r: r[:2])[2] for name, runs in found.items()}


def _matching(claims: Mapping[str, str], starts: Sequence[str]) -> list[tuple[str, str]]:
    return [(claim, word) for claim, word in claims.items() if claim.startswith(tuple(starts))]


def _listed(pairs: Sequence[tuple[str, str]]) -> str:
    return "; ".join(f"{word} ({claim})" for claim, word in pairs)


def paper_claims_table(measured: Sequence[Verdict], runs: Mapping[str, StudyRun], *, base: Path,
                       runs_folder: Path | None = None, measured_by: str = "this run") -> Table:
    """One row per claim of :data:`PAPER_CLAIMS`: the paper's number, ``measured_by``'s verdicts (``measured``,
    e.g. the demo's), the study and command that measure it in the paper's regime, and the verdicts and numbers
    of the run of that study in ``runs`` (linked relative to ``base``, the report's folder)."""
    own = {v.claim: v.word for v in measured if v.kind == "claim"}
    rows = []
    for pc in PAPER_CLAIMS:
        here = _matching(own, pc.starts)
        run = runs.get(pc.study)
        if run is None:
            where = f"no run of it in `{runs_folder}`" if runs_folder is not None else "no run given"
            study_cell = f"{where}; run `mergelab study {pc.study} --out DIR`"
        else:
            link = Path(os.path.relpath(run.folder / "report.html", base)).as_posix()
            ours = run.ours  # each verdict beside its own numbers
            got = [(f"{c}: ours {ours[c]}" if ours.get(c) else c, w) for c, w in _matching(run.verdicts, pc.starts)]
            study_cell = (f"[{pc.study} report]({link}) ({run.describe()}): "
                          + (_listed(got) if got else "the run recorded no verdict on this claim"))
        rows.append({"claim": pc.claim, "paper": pc.paper,
                     "here": _listed(here) if here else f"not measured by {measured_by}",
                     "study": f"`mergelab study {pc.study}`", "run": study_cell})
    return Table("The paper's claims", rows,
                 headers={"claim": "Claim (issue 14)", "paper": "Paper", "here": f"Verdict of {measured_by}",
                          "study": "Measured in the paper's regime by", "run": "That study's run"},
                 markdown=("study", "run"),
                 note="Verdicts follow one rule (mergelab.studies.verdict): held only when the 95 % paired-bootstrap "
                      "CI of the difference excludes 0 in most configurations. A verdict of this run stands for "
                      "its own reduced setting (one seed, depth ≤ 8); the linked study reports give the setting, the "
                      "regime checks and the CIs over their seeds.")


__all__ = ["PAPER_CLAIMS", "PaperClaim", "StudyRun", "find_runs", "paper_claims_table"]
