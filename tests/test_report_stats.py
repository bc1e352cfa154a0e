"""ablate.report.stats: per-cell statistics over seeds by hand, deltas against the baseline
(paired or Welch), against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ablate.report import aggregate, baseline_deltas, summarize, welch
from report_cases import T_975_DF1, T_975_DF2, gamma_sweep, make_config, make_runs, make_spec


def test_summarize_by_hand():
    mean, std, ci, n = summarize([0.30, 0.32, 0.34, math.nan])
    assert (mean, std, n) == (pytest.approx(0.32), pytest.approx(0.02), 3)
    assert ci == pytest.approx(T_975_DF2 * 0.02 / math.sqrt(3)) == pytest.approx(0.049682, abs=1e-6)
    one = summarize([0.3])
    assert one[0] == 0.3 and math.isnan(one[1]) and math.isnan(one[2])


def test_aggregate_means_stds_cis_equal_hand_computed():
    cells = aggregate(gamma_sweep(), make_spec())
    assert list(cells["cell"]) == ["focal g=0 a=0.75", "focal g=2 a=0.25", "focal g=5 a=0.25"]
    assert list(cells["loss.gamma"]) == [0.0, 2.0, 5.0] and list(cells["loss.alpha"]) == [0.75, 0.25, 0.25]
    first = cells.iloc[0]
    assert first["n"] == 3 and first["n_diverged"] == 0 and first["n_failed"] == 0
    assert first["AP_mean"] == pytest.approx(0.32)
    assert first["AP_std"] == pytest.approx(0.02)
    assert first["AP_ci95"] == pytest.approx(T_975_DF2 * 0.02 / math.sqrt(3))
    assert first["AP50_mean"] == pytest.approx(0.52) and first["AR100_mean"] == pytest.approx(0.47)
    assert first["run_ids"] == "run00 run01 run02"
    second = cells.iloc[1]
    assert second["AP_mean"] == pytest.approx(0.35)
    assert second["AP_std"] == pytest.approx(np.std([0.33, 0.36, 0.36], ddof=1))


def test_diverged_run_is_counted_not_averaged():
    cells = aggregate(gamma_sweep(), make_spec())
    g5 = cells.iloc[2]
    assert (g5["n"], g5["n_runs"], g5["n_diverged"], g5["n_failed"]) == (2, 3, 1, 0)
    # Its bogus AP of 0.0 would give a mean of 0.2133 if it were averaged in.
    assert g5["AP_mean"] == pytest.approx(0.32)
    assert g5["AP_std"] == pytest.approx(0.02 / math.sqrt(2))
    assert g5["AP_ci95"] == pytest.approx(T_975_DF1 * (0.02 / math.sqrt(2)) / math.sqrt(2))
    assert g5["run_ids"] == "run20 run21"


def test_fully_diverged_cell_has_counts_and_no_numbers():
    runs = make_runs([("ce", make_config(loss__cls="ce"), [(0, "diverged", math.nan), (1, "diverged", math.nan)]),
                  ("focal", make_config(), [(0, "finished", 0.3), (1, "failed", math.nan)])])
    cells = aggregate(runs, make_spec(varied=["loss.cls"]))
    ce, fl = cells.iloc[0], cells.iloc[1]
    assert (ce["n"], ce["n_diverged"]) == (0, 2) and math.isnan(ce["AP_mean"]) and ce["run_ids"] == ""
    assert (fl["n"], fl["n_failed"]) == (1, 1) and fl["AP_mean"] == 0.3 and math.isnan(fl["AP_std"])


def test_every_outcome_is_counted():
    runs = make_runs([("fl", make_config(), [(0, "finished", 0.3), (1, "pruned", math.nan), (2, "interrupted", math.nan),
                                     (3, "weird", math.nan), (4, "failed", math.nan)])])
    cell = aggregate(runs, make_spec()).iloc[0]
    assert (cell["n"], cell["n_runs"], cell["n_pruned"], cell["n_interrupted"], cell["n_other"],
            cell["n_failed"], cell["n_diverged"]) == (1, 5, 1, 1, 1, 1, 0)


def test_aggregate_names_missing_columns():
    runs = gamma_sweep().drop(columns=["model.num_scales"])
    with pytest.raises(ValueError, match="model.num_scales"):
        aggregate(runs, make_spec(varied=["model.num_scales"]))
    with pytest.raises(ValueError, match="no runs"):
        aggregate(runs.iloc[:0], make_spec())


def test_deltas_paired_when_seeds_match_else_welch():
    runs = gamma_sweep()
    cells = aggregate(runs, make_spec())
    deltas = baseline_deltas(runs, cells, make_spec())
    base, g2, g5 = [0.30, 0.32, 0.34], [0.33, 0.36, 0.36], [0.31, 0.33]
    assert deltas.iloc[0]["AP_delta"] == 0.0 and bool(deltas.iloc[0]["delta_paired"])
    # Same seeds: per-seed differences 0.03, 0.04, 0.02 -> 0.03 +- t(2) * 0.01 / sqrt(3).
    assert bool(deltas.iloc[1]["delta_paired"])
    assert deltas.iloc[1]["AP_delta"] == pytest.approx(0.03)
    assert deltas.iloc[1]["AP_delta_ci95"] == pytest.approx(T_975_DF2 * 0.01 / math.sqrt(3))
    low, high = stats.ttest_rel(g2, base).confidence_interval()
    assert deltas.iloc[1]["AP_delta_ci95"] == pytest.approx((high - low) / 2)
    # Seed 2 of g=5 diverged: seeds differ, so the interval is Welch's.
    assert not deltas.iloc[2]["delta_paired"]
    assert deltas.iloc[2]["AP_delta"] == pytest.approx(0.0, abs=1e-12)
    low, high = stats.ttest_ind(g5, base, equal_var=False).confidence_interval()
    assert deltas.iloc[2]["AP_delta_ci95"] == pytest.approx((high - low) / 2)


def test_explicit_baseline_and_unknown_baseline():
    runs = gamma_sweep()
    spec = make_spec(baseline="focal g=2 a=0.25")
    deltas = baseline_deltas(runs, aggregate(runs, spec), spec)
    assert deltas.iloc[0]["AP_delta"] == pytest.approx(-0.03) and deltas.iloc[1]["AP_delta"] == 0.0
    with pytest.raises(ValueError, match="no cell"):
        baseline_deltas(runs, aggregate(runs, spec), make_spec(baseline="nope"))


def test_welch_equals_scipy():
    a, b = [0.31, 0.33, 0.36, 0.30], [0.25, 0.29, 0.26]
    test = welch((np.mean(a), np.std(a, ddof=1), 4), (np.mean(b), np.std(b, ddof=1), 3))
    result = stats.ttest_ind(a, b, equal_var=False)
    low, high = result.confidence_interval()
    assert test.difference == pytest.approx(np.mean(a) - np.mean(b))
    assert test.half == pytest.approx((high - low) / 2) and test.p == pytest.approx(result.pvalue)
    one = welch((0.3, math.nan, 1), (0.2, 0.01, 3))
    assert one.difference == pytest.approx(0.1) and math.isnan(one.half) and math.isnan(one.p)
    flat = welch((0.3, 0.0, 3), (0.2, 0.0, 3))  # no spread on either side
    assert flat.half == 0.0 and flat.p == 0.0
