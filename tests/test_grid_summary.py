"""ablate.grid_summary: the grid's per-cell AP on its parent run, by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from mlflow.utils.validation import _validate_metric_name

from ablate.experiments import list_experiments, load_experiment
from ablate.grid_summary import aligned, cell_table, metric_name, report_note, summary_markdown, summary_metrics

T_975_DF2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2)


def _runs() -> pd.DataFrame:
    """Three cells: three finished seeds; one finished seed; one diverged seed only."""
    rows = [("focal g=2 a=0.25", 0, 0, "finished", 0.30), ("focal g=2 a=0.25", 0, 1, "finished", 0.32),
            ("focal g=2 a=0.25", 0, 2, "finished", 0.34), ("scales=3 ratios=[0.5,1,2]", 1, 0, "finished", 0.25),
            ("ce pi=none", 2, 0, "diverged", math.nan)]
    return pd.DataFrame([{"run_id": f"r{i}", "cell": cell, "cell_index": index, "seed": seed, "outcome": outcome,
                          "AP": ap, "AP50": ap + 0.1, "AP75": ap}
                         for i, (cell, index, seed, outcome, ap) in enumerate(rows)])


def test_metric_names_are_ones_mlflow_takes():
    assert metric_name("focal g=2 a=0.25") == "focal g:2 a:0.25"
    assert metric_name("scales=3 ratios=[0.5,1,2]") == "scales:3 ratios:0.5 1 2"
    assert metric_name("ohem 1:3 B=128/x") == "ohem 1:3 B:128_x"
    cells = [cell.name for path in list_experiments() for cell in load_experiment(str(path)).cells()]
    assert len(cells) > 50
    for cell in cells:
        _validate_metric_name(f"AP_mean/{metric_name(cell)}")  # raises on a name MLflow refuses


def test_summary_metrics_by_hand():
    metrics = summary_metrics(cell_table(_runs()))
    # In percent, like every AP in MLflow (the runs' fractions 0.30, 0.32, 0.34 have std 2 points).
    half = T_975_DF2 * 2.0 / math.sqrt(3)
    assert metrics["AP_mean/focal g:2 a:0.25"] == pytest.approx(32.0)
    assert metrics["AP_ci95_low/focal g:2 a:0.25"] == pytest.approx(32.0 - half, abs=1e-4)
    assert metrics["AP_ci95_high/focal g:2 a:0.25"] == pytest.approx(32.0 + half, abs=1e-4)
    assert metrics["n/focal g:2 a:0.25"] == 3
    # One seed: a mean, no interval; nothing finished: nothing at all.
    assert metrics["AP_mean/scales:3 ratios:0.5 1 2"] == pytest.approx(25.0)
    assert metrics["n/scales:3 ratios:0.5 1 2"] == 1
    assert "AP_ci95_low/scales:3 ratios:0.5 1 2" not in metrics
    assert len(metrics) == 6


def test_summary_table_in_percent():
    text = summary_markdown(cell_table(_runs()))
    lines = text.splitlines()
    assert lines[0] == "| cell | AP | AP50 | AP75 | AP 95% CI | n |"
    half = 100 * T_975_DF2 * 0.02 / math.sqrt(3)
    ci = f"[{32 - half:.1f}, {32 + half:.1f}]"
    assert f"| focal g=2 a=0.25 | 32.0 ± 2.0 | 42.0 ± 2.0 | 32.0 ± 2.0 | {ci} | 3/3 |" in lines
    assert "| ce pi=none | — | — | — | — | 0/1 |" in lines


def test_descriptions_hold_the_tables_as_aligned_text():
    table = "| loss | AP | cell |\n|---:|---:|:---|\n| focal | 31.5 ± 0.9 | a \\| b |\n| ce | 3.4 | ce |"
    assert aligned(table) == ("loss   AP          cell\n"
                              "focal  31.5 ± 0.9  a | b\n"
                              "ce     3.4         ce")
    note = report_note("x", f"{table}\n\nAP: mean ± std.\n", [Path("r/ap.png"), Path("r/table.md")])
    assert note == (f"## x: report\n\n```\n{aligned(table)}\n```\n\nAP: mean ± std.\n\n"
                    "Files (artifacts): `report/ap.png`, `report/table.md`.\n")
