"""ablate.report.tables: the displayed table's cells and its Markdown and LaTeX forms."""

from __future__ import annotations

import pandas as pd

from ablate.report import display_table, latex_table, results_table
from report_cases import make_config, make_runs, make_spec


def test_table_d_shows_no_ohem_settings_on_the_focal_row():
    runs = make_runs([("focal", make_config(), [(0, "finished", 0.31), (1, "finished", 0.32)]),
                  ("ohem B=256", make_config(loss__cls="ohem", loss__ohem_batch=256), [(0, "finished", 0.2), (1, "finished", 0.21)])])
    spec = make_spec(name="ohem-vs-focal", varied=["loss.cls", "loss.ohem_batch", "loss.ohem_fg_fraction"],
                 paper_table="d", baseline="focal")
    table = display_table(results_table(runs, spec), spec)
    assert table[["loss", "batch", "fg:bg"]].values.tolist() == [["focal", "—", "—"], ["ohem", "256", "none"]]


def test_latex_escapes_headers():
    table = pd.DataFrame({"#sc": ["3"], "AP": ["32.0 ± 2.0"], "AP 95% CI": ["[27.0, 37.0]"], "cell": ["a_b"]})
    latex = latex_table(table, "caption")
    assert r"\#sc" in latex and r"95\% CI" in latex and r"a\_b" in latex and r"$\pm$" in latex
    assert r"\begin{tabular}" in latex
