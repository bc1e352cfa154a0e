"""ablate.report.paper: which row of the paper's Table 1 (a..e) is a cell's."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ablate.report import paper_rows
from report_cases import make_config, make_spec


def _cells(configs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"cell": f"c{i}", **c} for i, c in enumerate(configs)])


def test_paper_rows_table_a_alpha():
    cells = _cells([make_config(loss__cls="alpha_ce", loss__alpha=0.25, loss__gamma=0.0),
                    make_config(loss__cls="alpha_ce", loss__alpha=0.75, loss__gamma=0.0),
                    make_config(loss__cls="focal", loss__alpha=0.5, loss__gamma=0.0),  # FL with gamma 0 is alpha-CE
                    make_config(loss__cls="alpha_ce", loss__alpha=0.3),  # not in the table
                    make_config(loss__cls="ce", loss__alpha=0.5)])  # plain CE: no row in (a)
    rows = paper_rows(make_spec(paper_table="a"), cells)
    assert rows["paper_AP"].iloc[:3].tolist() == pytest.approx([0.108, 0.311, 0.302])
    assert rows["paper_AP50"].iloc[1] == pytest.approx(0.494) and rows["paper_AP75"].iloc[1] == pytest.approx(0.330)
    assert rows["paper_AP"].iloc[3:].isna().all()


def test_paper_rows_table_b_gamma_alpha():
    cells = _cells([make_config(loss__gamma=2.0, loss__alpha=0.25), make_config(loss__gamma=0.5, loss__alpha=0.5),
                    make_config(loss__gamma=0.5, loss__alpha=0.25), make_config(loss__gamma=0.2 + 1e-9, loss__alpha=0.75)])
    rows = paper_rows(make_spec(paper_table="b"), cells)
    assert rows["paper_AP"].iloc[0] == pytest.approx(0.340) and rows["paper_AP50"].iloc[0] == pytest.approx(0.525)
    assert rows["paper_AP"].iloc[1] == pytest.approx(0.329)
    assert math.isnan(rows["paper_AP"].iloc[2])  # gamma 0.5 was run at alpha 0.5 only
    assert rows["paper_AP"].iloc[3] == pytest.approx(0.319)  # within the float tolerance


def test_paper_rows_table_c_scales_and_ratios():
    cells = _cells([make_config(model__num_scales=2), make_config(model__num_scales=1, model__aspect_ratios=[1.0]),
                    make_config(model__num_scales=3, model__aspect_ratios=[0.25, 0.5, 1.0, 2.0])])
    rows = paper_rows(make_spec(paper_table="c"), cells)
    assert rows["paper_AP"].iloc[0] == pytest.approx(0.342) and rows["paper_AP75"].iloc[0] == pytest.approx(0.365)
    assert rows["paper_AP"].iloc[1] == pytest.approx(0.303)
    assert math.isnan(rows["paper_AP"].iloc[2])  # 4 ratios: not in the table


def test_paper_rows_table_d_ohem():
    cells = _cells([make_config(loss__cls="ohem", loss__ohem_batch=128, loss__ohem_nms=0.5),
                    make_config(loss__cls="ohem", loss__ohem_batch=256, loss__ohem_nms=0.5, loss__ohem_fg_fraction=0.25),
                    make_config(loss__cls="focal", model__trunk="resnet101"),
                    make_config(loss__cls="ohem", loss__ohem_batch=128, loss__ohem_nms=0.7, loss__ohem_fg_fraction=0.25),
                    make_config(loss__cls="ohem", loss__ohem_batch=512, loss__ohem_nms=0.7)])
    rows = paper_rows(make_spec(paper_table="d"), cells)
    assert rows["paper_AP"].iloc[0] == pytest.approx(0.328)
    assert rows["paper_AP"].iloc[1] == pytest.approx(0.283)  # OHEM 1:3, batch 256, nms 0.5
    assert rows["paper_AP"].iloc[2] == pytest.approx(0.360)  # FL
    assert math.isnan(rows["paper_AP"].iloc[3])  # 1:3 was only run at nms 0.5
    assert rows["paper_AP"].iloc[4] == pytest.approx(0.306)


def test_paper_rows_table_e_depth_scale_and_no_table():
    cells = _cells([make_config(model__trunk="resnet101", data__min_size=800), make_config(data__min_size=400),
                    make_config(model__trunk="tiny", data__min_size=600)])
    rows = paper_rows(make_spec(paper_table="e"), cells)
    assert rows["paper_AP"].iloc[0] == pytest.approx(0.378) and rows["paper_time_ms"].iloc[0] == 198
    assert rows["paper_APs"].iloc[1] == pytest.approx(0.112)
    assert math.isnan(rows["paper_AP"].iloc[2])
    assert paper_rows(make_spec(paper_table=None), cells).isna().all().all()
    with pytest.raises(ValueError, match="unknown paper table"):
        paper_rows(make_spec(paper_table="f"), cells)
