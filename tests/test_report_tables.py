"""ablate.report.tables: the displayed table's cells and its Markdown and LaTeX forms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ablate.report import display_table, latex_table, markdown_table, results_table, table_caption
from ablate.report.tables import applies, display_value, format_cell, header
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


def test_markdown_table_aligns_numbers_right_and_escapes_pipes():
    table = pd.DataFrame({"cell": ["a|b", "c"], "AP": ["32.0 ± 2.0", "—"]})
    assert markdown_table(table).splitlines() == ["| cell | AP |", "|:---|---:|", "| a\\|b | 32.0 ± 2.0 |",
                                                  "| c | — |"]


@pytest.mark.parametrize("key, value, shown", [
    ("model.aspect_ratios", [0.5, 1.0, 2.0], 3),  # #ar is a count
    ("model.trunk", "resnet101", 101),
    ("model.trunk", "tiny", "tiny"),
    ("loss.ohem_fg_fraction", 0.25, "1:3"),
    ("model.prior", None, "none"),
    ("loss.gamma", 2.0, 2.0),
])
def test_display_value_as_the_papers_tables_show_it(key, value, shown):
    assert display_value(key, value) == shown


def test_format_cell_header_and_which_loss_keys_apply():
    assert [format_cell(v) for v in (0.25, 2.0, np.float32(0.5), np.bool_(True), "ce", 3)] == [
        "0.25", "2", "0.5", "True", "ce", "3"]
    assert (header("model.num_scales"), header("loss.cls"), header("train.lr")) == ("#sc", "loss", "train.lr")
    assert applies("loss.gamma", pd.Series({"loss.cls": "focal"}))
    assert not applies("loss.gamma", pd.Series({"loss.cls": "ce"}))
    assert not applies("loss.ohem_batch", pd.Series({"loss.cls": "focal"}))
    assert applies("model.prior", pd.Series({"loss.cls": "ce"})) and applies("loss.gamma", pd.Series({"x": 1}))


def test_table_caption_names_the_baseline_and_the_paper_table():
    assert "(`focal`) in AP points." in table_caption(make_spec(paper_table=None), "focal")
    assert table_caption(make_spec(paper_table=None), "focal").endswith("in AP points.")
    assert "Lin et al. 2017, Table 1(b)" in table_caption(make_spec(paper_table="b"), "focal")
