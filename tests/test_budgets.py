"""Budget curves: the overrides of a multiple, order changes between budgets, findings across budgets."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ablate.budgets import (ORDER_CHANGE_COLUMNS, AcrossBudgets, budget_label, budget_overrides,
                            holds_at_every_budget, order_changes, parse_budgets)
from ablate.builders import lr_factor
from ablate.config import TrainConfig
from ablate.errors import ConfigError


def test_parse_budgets():
    assert parse_budgets("1,2,4") == (1.0, 2.0, 4.0)
    assert parse_budgets(" 4, 0.5 ,1 ") == (0.5, 1.0, 4.0)
    for bad in ("", "1,x", "0,1", "-1", "1,1", "inf"):
        with pytest.raises(ConfigError, match="--budgets"):
            parse_budgets(bad)


def test_budget_overrides_scale_iterations_only():
    assert budget_overrides(1.0, 800, 100) == {"train.iterations": 800}  # budget 1: the config unchanged
    assert budget_overrides(4.0, 800, 100) == {"train.iterations": 3200}
    assert budget_overrides(0.5, 800, 100) == {"train.iterations": 400}
    assert [budget_label(m) for m in (1.0, 2.0, 0.5)] == ["x1", "x2", "x0.5"]
    with pytest.raises(ConfigError, match="whole number"):
        budget_overrides(0.5, 801, 100)
    with pytest.raises(ConfigError, match="warm-up"):
        budget_overrides(0.125, 800, 100)  # 100 iterations, all of them warm-up


def test_lr_steps_scale_by_themselves_and_warmup_stays():
    # The tiny schedule at 2x: steps at 2/3 and 8/9 of 1600 (1066 and 1422), warm-up still 100.
    cfg = TrainConfig(iterations=budget_overrides(2.0, 800, 100)["train.iterations"], warmup_iters=100)
    assert [lr_factor(i, cfg) for i in (0, 100, 1065, 1066, 1421, 1422)] == pytest.approx(
        [1 / 3, 1.0, 1.0, 0.1, 0.1, 0.01])


def table(rows: list[tuple[str, float, float, float]]) -> pd.DataFrame:
    """(cell, budget, AP mean, CI half-width) rows, in points."""
    return pd.DataFrame(rows, columns=["cell", "budget", "AP_mean", "AP_ci95"])


def test_order_changes_flags_disjoint_swaps_and_lists_mean_only_ones():
    # CE and FL as in prior-schedule: FL ahead at 1x (31.5 vs 3.4), CE ahead at 4x (70.2 vs 66.8),
    # CIs disjoint at both; "slow" swaps with FL too but its CIs overlap at 4x (68 +- 3 vs 66.8 +- 0.6).
    t = table([("fl", 1, 31.5, 2.3), ("fl", 2, 52.0, 1.5), ("fl", 4, 66.8, 0.6),
               ("ce", 1, 3.4, 8.9), ("ce", 2, 50.7, 9.7), ("ce", 4, 70.2, 1.5),
               ("slow", 1, 20.0, 1.0), ("slow", 4, 68.0, 3.0)])
    changes = order_changes(t)
    assert list(changes.columns) == ORDER_CHANGE_COLUMNS
    got = {(r.cell_a, r.cell_b, r.budget_from, r.budget_to): (r.difference_from, r.difference_to, r.disjoint)
           for r in changes.itertuples()}
    assert got == {
        ("fl", "ce", 1, 4): (pytest.approx(28.1), pytest.approx(-3.4), True),
        ("fl", "ce", 2, 4): (pytest.approx(1.3), pytest.approx(-3.4), False),  # level at 2x: CIs overlap
        ("fl", "slow", 1, 4): (pytest.approx(11.5), pytest.approx(-1.2), False),
        ("ce", "slow", 1, 4): (pytest.approx(-16.6), pytest.approx(2.2), False),  # 2.2 < 1.5 + 3.0 at 4x
    }  # slow has no 2x: no pair with it at 2x


def test_order_changes_ties_missing_cells_and_single_seed():
    t = table([("a", 1, 30.0, 1.0), ("a", 2, 40.0, math.nan),
               ("b", 1, 30.0, 1.0), ("b", 2, 35.0, 1.0),  # tied at 1x: no order to change
               ("c", 1, 25.0, 0.5), ("c", 2, 45.0, 0.5)])  # c passes a and b; a has one seed at 2x
    changes = order_changes(t)
    assert set(zip(changes.cell_a, changes.cell_b)) == {("a", "c"), ("b", "c")}
    assert not changes.set_index("cell_a").at["a", "disjoint"]  # no CI for a at 2x: not flagged
    assert changes.set_index("cell_a").at["b", "disjoint"]
    assert order_changes(table([("a", 1, 30.0, 1.0), ("b", 2, 20.0, 1.0)])).empty  # never both measured
    with pytest.raises(ValueError, match="AP_ci95"):
        order_changes(t.drop(columns="AP_ci95"))


def test_holds_at_every_budget():
    results = {4.0: {"gap": -3.4}, 1.0: {"gap": 28.1}, 2.0: {"gap": 1.3}}
    leads = holds_at_every_budget(lambda r: r["gap"] >= 2.0, results)
    assert leads == AcrossBudgets({1.0: True, 2.0: False, 4.0: False}, False)
    assert leads.text() == "no at x2, x4; yes at x1"

    def judge(r: dict) -> bool | None:
        if "gap" not in r:
            raise KeyError("gap")  # a missing report: not measured, as in findings.judge_reports
        return None if r["gap"] is None else r["gap"] > 0

    partial = holds_at_every_budget(judge, {1.0: {"gap": 28.1}, 2.0: {"gap": None}, 4.0: {}})
    assert partial.holds is True and partial.text() == "yes at x1; not measured at x2, x4"
    nowhere = holds_at_every_budget(judge, {1.0: {}, 2.0: {}})
    assert nowhere.holds is None and nowhere.text() == "no budget measured"
