"""`ablate findings`: the paper's Table 1 findings judged on the reports (ablate.findings), written
to REPORTS/findings.md and, when asked, between the findings markers of a page such as
docs/results.md, and shown on the terminal as two tables.

One verdict per comparison stands (the largest experiment's, `findings.supersede`); where some
report was measured at several budgets (`ablate run --budgets`), each finding is also judged at
every one of them.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ablate.errors import AblateError
from ablate.findings import (FOLLOW_UP_HEADER, FOLLOW_UPS, across_budgets, headline_markdown, holds_text,
                             judge_reports, markdown, measured_budgets, replace_between_markers, supersede)

TITLES = (("The paper's findings on this benchmark", ("finding", "paper")),
          ("Follow-ups: why a finding fails", ("hypothesis", "for")))


def write_findings(reports: Path, readme: Path | None, out: Console) -> list[Path]:
    """Judge the reports under `reports`, print the verdicts on `out`, write reports/findings.md
    (and the findings block of `readme`); returns the files written."""
    if readme is not None and not readme.is_file():
        raise AblateError(f"{readme}: no such file")
    verdicts, follow_ups = judge_reports(reports), judge_reports(reports, FOLLOW_UPS)
    supersede(verdicts + follow_ups)  # one verdict per comparison: the largest experiment's
    across = ((across_budgets(reports), across_budgets(reports, FOLLOW_UPS)) if measured_budgets(reports)
              else (None, None))
    for (title, columns), rows, over in zip(TITLES, (verdicts, follow_ups), across):
        table = Table(title=title)
        for column in (*columns, "ours", "holds", *(("at every budget",) if over else ())):
            table.add_column(column)
        for i, v in enumerate(rows):
            table.add_row(escape(v.finding), escape(v.paper), escape(v.ours), escape(holds_text(v)),
                          *((escape(over[i].text()),) if over else ()))
        out.print(table)

    def block(prefix: str = "") -> str:
        return (f"{markdown(verdicts, across=across[0], link_prefix=prefix)}\nFollow-ups, each an experiment of its own "
                "testing why a finding fails here (its rule fixed before its runs), one verdict per comparison (the "
                "largest experiment's):\n\n"
                f"{markdown(follow_ups, FOLLOW_UP_HEADER, across[1], link_prefix=prefix)}")

    reports.mkdir(parents=True, exist_ok=True)
    findings = reports / "findings.md"
    findings.write_text("# The paper's Table 1 findings on this benchmark\n\nWritten by `ablate findings` from the "
                        f"reports' results.csv.\n\n{block()}\nEvery cell:\n\n{headline_markdown(reports)}")
    if readme is None:
        return [findings]
    prefix = os.path.relpath(reports, readme.parent) + "/"
    readme.write_text(replace_between_markers(readme.read_text(), f"{block(prefix)}\n{headline_markdown(reports, prefix)}",
                                              str(readme)))
    return [findings, readme]
