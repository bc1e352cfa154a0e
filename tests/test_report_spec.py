"""ablate.report.spec: what a report is about and the metrics it summarises; the reporter's import
stays free of torch."""

from __future__ import annotations

import subprocess
import sys

from ablate.report.spec import METRICS, TABLE_METRICS, ReportSpec


def test_a_spec_defaults_to_no_layout_and_no_paper_table():
    spec = ReportSpec("gamma-sweep", "Focal loss: gamma.")
    assert (spec.varied, spec.x, spec.hue, spec.baseline, spec.paper_table, spec.command) == ([], None, None, None,
                                                                                              None, "")
    assert ReportSpec("a", "").varied is not ReportSpec("b", "").varied  # no list shared between specs


def test_the_table_metrics_are_the_papers_three_among_the_summarised():
    assert TABLE_METRICS == ("AP", "AP50", "AP75") and set(TABLE_METRICS) <= set(METRICS)
    assert "AR100" in METRICS and len(set(METRICS)) == len(METRICS)


def test_the_reporter_does_not_import_torch():
    code = "import sys, ablate.report; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
