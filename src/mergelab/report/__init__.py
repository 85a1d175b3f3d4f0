"""Tables (CSV + Markdown + HTML), matplotlib figures (Agg, 150 dpi) and the self-contained HTML report.

Reusable by every study: build :class:`Table` and figure files, group them in :class:`Section` objects with
a short text and :class:`Verdict` lines, and write them with :class:`Report`.
"""

from mergelab.report.html import FigureRef, Report, Section, Verdict
from mergelab.report.tables import Table, markdown_table, write_csv

__all__ = ["FigureRef", "Report", "Section", "Table", "Verdict", "markdown_table", "write_csv"]
