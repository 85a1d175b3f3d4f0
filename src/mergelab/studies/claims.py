"""One table layout for a paper's claims beside ours (issue 14): the claim, the paper's number, ours with its
95 % CI, the setting, the regime checks that say whether the setting can show the claim, and the verdict.

Each study fills one :class:`ClaimRow` per claim from the :class:`~mergelab.report.html.Verdict` that
:func:`~mergelab.studies.verdict.claim_verdict` gave it, so the table can never say more than the verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergelab.report import FigureRef, Report, Section, Table, Verdict
from mergelab.studies.common import StudyResult, TableOutput
from mergelab.studies.verdict import Difference
from mergelab.zoo.train import Zoo


@dataclass(frozen=True)
class ClaimRow:
    verdict: Verdict
    paper_number: str
    ours: Sequence[Difference]  # the resolved comparisons behind the verdict
    setting: str
    regime: str  # what was checked about the setting (members learned, test size, …) and what it showed
    unit: str = "points"
    #: ours in words, for a claim judged on counts rather than differences (e.g. which output overflows first)
    ours_text: str = ""

    def as_row(self) -> dict[str, str]:
        if self.ours_text:
            ours = self.ours_text
        elif self.ours:
            mean = sum(d.mean for d in self.ours) / len(self.ours)
            lo, hi = min(d.low for d in self.ours), max(d.high for d in self.ours)
            seeds = max(d.n_seeds for d in self.ours)
            fmt = "{:+.1f}" if self.unit == "points" else "{:+.3f}"
            ours = (f"{fmt.format(mean)} {self.unit} (CIs from {fmt.format(lo)} to {fmt.format(hi)} over "
                    f"{len(self.ours)} configuration(s), {seeds} seed(s))")
        else:
            ours = "not measured"
        return {"claim": self.verdict.claim, "paper": self.paper_number, "ours": ours, "setting": self.setting,
                "regime": self.regime, "verdict": self.verdict.word}


def claims_table(rows: Sequence[ClaimRow], title: str = "The paper's claims beside ours") -> Table:
    return Table(title, [r.as_row() for r in rows],
                 headers={"claim": "Claim", "paper": "Paper", "ours": "Ours: difference [95 % CI range]",
                          "setting": "Setting", "regime": "Regime checks", "verdict": "Verdict"},
                 note="Ours: the mean of the compared difference over configurations, with the lowest lower and "
                      "highest upper bound of their 95 % paired-bootstrap CIs (test examples and seeds). A claim "
                      "is held only when the difference exceeds its uncertainty in most configurations.")


def claims_study_result(title: str, meta: Mapping[str, Any], heading: str, text: str, claims: Sequence[ClaimRow],
                        table: Table, figures: Sequence[FigureRef], tables: Mapping[str, TableOutput],
                        zoos: Sequence[Zoo]) -> StudyResult:
    """The end every claims study shares: one section (the claims table first, then the study's own table and
    figures), one report, the claims table written beside the study's tables, each verdict's word recorded."""
    verdicts = [c.verdict for c in claims]
    claims_tab = claims_table(claims)
    section = Section(heading, text=[text], verdicts=verdicts, tables=[claims_tab, table], figures=list(figures))
    return StudyResult(Report(title, meta=dict(meta)).add(section), {**tables, "claims": claims_tab}, list(zoos),
                       {"verdicts": {v.claim: v.word for v in verdicts}})


__all__ = ["ClaimRow", "claims_study_result", "claims_table"]
