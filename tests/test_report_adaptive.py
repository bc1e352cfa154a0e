"""ablate.report.adaptive: the sequential table (in points, with the fixed design beside) and the
budget section (results per budget, order changes flagged)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ablate.report.adaptive import sequential_table, write_budgets
from ablate.report.spec import ReportSpec
from ablate.sequential import SequentialRule


def runs_frame(aps: dict[str, list[float]], budget: float = 1.0) -> pd.DataFrame:
    """Tracked-runs rows: one finished run per cell and seed with AP (points) -> fraction."""
    rows = [{"run_id": f"{cell}{seed}{budget}", "cell": cell, "cell_index": i, "seed": seed, "outcome": "finished",
             "loss.cls": cell, "AP": ap / 100, "train.iterations": int(800 * budget)}
            for i, (cell, values) in enumerate(aps.items()) for seed, ap in enumerate(values)]
    return pd.DataFrame(rows)


def test_sequential_table_is_in_points_and_sets_the_fixed_design_beside():
    runs = runs_frame({"focal": [31.0, 30.2, 32.1, 30.8], "alpha_ce": [27.0, 26.1, 28.3, 27.2]})
    table = sequential_table(SequentialRule(max_seeds=4), [("focal", "alpha_ce")], runs)
    row = table.iloc[0]
    assert row["difference"] == pytest.approx(np.mean([4.0, 4.1, 3.8]))  # settled at the first look
    assert row["verdict"] == "settled for" and row["n"] == 3 and abs(row["statistic"]) > row["critical"]
    assert row["error"] == "per comparison, alpha 0.05" and row["collapsed_cell"] == 0
    assert row["adjusted"] < row["difference"]  # settled at the first look: the raw mean is biased up
    assert row["seeds_run"] == 4 and row["fixed_seeds"] >= 2 and row["expected_seeds"] >= 3


def test_budget_section_flags_a_clear_order_change(tmp_path: Path):
    per_budget = {1.0: runs_frame({"a": [30.0, 30.5, 29.5], "b": [20.0, 20.5, 19.5]}),
                  2.0: runs_frame({"a": [40.0, 40.5, 39.5], "b": [50.0, 50.5, 49.5]}, 2.0)}
    paths, text = write_budgets(per_budget, ReportSpec("t", "", varied=["loss.cls"]), tmp_path)
    changes = pd.read_csv(paths["order_changes"])
    assert len(changes) == 1 and bool(changes.iloc[0]["disjoint"])
    assert changes.iloc[0]["difference_from"] == pytest.approx(10.0)
    assert paths["ap_vs_budget"].is_file() and (tmp_path / "budgets" / "x2" / "results.csv").is_file()
    assert "flagged" in text and "| x1 | x2 |" in text
