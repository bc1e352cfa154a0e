"""ablate.report.plots: what the AP plot draws (bands and error bars cut at 0, one dot per seed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.collections import PathCollection, PolyCollection

from ablate.report import ReportSpec, display_table, results_table
from ablate.report import plots
from ablate.report.plots import draw_ap
from report_cases import T_975_DF2, make_config, make_runs, make_spec


def _seed_dots(ax) -> list[tuple[float, float]]:
    """(x, y) in display pixels of every dot drawn for a single seed (the AP plot's scatter)."""
    dots = [c for c in ax.collections if isinstance(c, PathCollection)]
    return [tuple(xy) for c in dots for xy in c.get_offset_transform().transform(c.get_offsets())]


def test_ap_plot_cuts_the_band_at_zero_and_draws_each_seed_beside_the_mean():
    # gamma 0: AP 0, 0 and 10 -> mean 3.3, std 5.77, t interval [-11.0, 17.7] (no AP is negative).
    runs = make_runs([("focal g=0 a=0.75", make_config(loss__gamma=0.0, loss__alpha=0.75),
                   [(0, "finished", 0.0), (1, "finished", 0.0), (2, "finished", 0.10)]),
                  ("focal g=2 a=0.25", make_config(), [(0, "finished", 0.33), (1, "finished", 0.36),
                                                   (2, "finished", 0.39)])])
    spec = make_spec(x="loss.gamma", paper_table=None)
    results = results_table(runs, spec)
    half = T_975_DF2 * 0.1 / math.sqrt(3) / math.sqrt(3)  # std of 0, 0, 0.1 is 0.1 / sqrt(3)
    assert results.loc[0, "AP_ci95"] == pytest.approx(half)  # the table keeps the measured interval
    low, high = 100 * (0.1 / 3 - half), 100 * (0.1 / 3 + half)
    assert display_table(results, spec).loc[0, "AP 95% CI"] == f"[{low:.1f}, {high:.1f}]" == "[-11.0, 17.7]"

    ax = draw_ap(runs, results, spec).axes[0]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    band_y = np.concatenate([path.vertices[:, 1] for c in bands for path in c.get_paths()])
    assert band_y.min() == pytest.approx(0.0)  # cut at 0, where it would reach -11.0
    assert band_y.max() == pytest.approx(36.0 + 100 * T_975_DF2 * 0.03 / math.sqrt(3))  # the other end as measured
    assert ax.get_ylim()[0] == 0.0
    high = make_runs([("focal g=2 a=0.25", make_config(), [(0, "finished", 0.50), (1, "finished", 0.52), (2, "finished", 0.56)])])
    assert draw_ap(high, results_table(high, spec), spec).axes[0].get_ylim()[0] > 40  # no empty axis down to 0
    dots = _seed_dots(ax)
    assert sorted(round(y, 6) for _, y in ax.transData.inverted().transform(dots)) == sorted(
        round(100 * ap, 6) for ap in runs["AP"])
    # Beside the mean: each dot sits SEED_SHIFT_POINTS right of its cell's x.
    shift = plots.SEED_SHIFT_POINTS / 72 * ax.figure.dpi
    cell_x = {ax.transData.transform((x, 0))[0] for x in (0.0, 2.0)}
    assert {round(x - shift, 3) for x, _ in dots} == {round(x, 3) for x in cell_x}


def test_categorical_ap_plot_cuts_its_error_bars_at_zero():
    runs = make_runs([("CE", make_config(loss__cls="ce"), [(0, "finished", 0.0), (1, "finished", 0.0), (2, "finished", 0.1)]),
                  ("FL", make_config(), [(0, "finished", 0.33), (1, "finished", 0.36), (2, "finished", 0.39)])])
    spec = ReportSpec(name="losses", description="", varied=["loss.cls"])
    ax = draw_ap(runs, results_table(runs, spec), spec).axes[0]
    bars = np.concatenate([line.get_ydata() for line in ax.lines if len(line.get_ydata())])
    assert np.nanmin(bars) == pytest.approx(0.0)
    assert len(_seed_dots(ax)) == 6
