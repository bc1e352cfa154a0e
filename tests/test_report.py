"""ablate.report: statistics over seeds by hand, the paper's rows, and the files of a report
(with the paper's Figure 1 from ablate.analysis, passed in as the report's edge does)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import PathCollection, PolyCollection
from PIL import Image
from scipy import stats

from ablate.analysis import figure1_curves
from ablate.report import (ReportSpec, aggregate, baseline_deltas, display_table, latex_table, paper_rows,
                           results_table, summarize, welch, write_report)
from ablate.report import plots
from ablate.report.build import FIGURE1_CAPTION, figure1
from ablate.report.plots import draw_ap

T_975_DF2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2), also in any t table
T_975_DF1 = 12.706204736174707
PNGS = ("ap.png", "deltas.png", "loss_curves.png", "loss_vs_pt.png")  # loss_vs_pt.png: Figure 1, passed in
COMMAND = "ablate sweep gamma-sweep && ablate report gamma-sweep"


def _config(**overrides) -> dict:
    """A cell's flattened config: the paper's defaults, `overrides` given with '__' for '.'."""
    config = {"loss.cls": "focal", "loss.gamma": 2.0, "loss.alpha": 0.25, "model.prior": 0.01,
              "model.num_scales": 3, "model.aspect_ratios": [0.5, 1.0, 2.0], "model.trunk": "resnet50",
              "data.min_size": 600, "loss.ohem_batch": 128, "loss.ohem_nms": 0.7, "loss.ohem_fg_fraction": None}
    config.update({k.replace("__", "."): v for k, v in overrides.items()})
    return config


def _runs(cells: list[tuple[str, dict, list[tuple[int, str, float]]]]) -> pd.DataFrame:
    """runs as the tracking module builds them: cells of (name, config, [(seed, outcome, AP)])."""
    rows = []
    for index, (name, config, seeds) in enumerate(cells):
        for seed, outcome, ap in seeds:
            metrics = {"AP": ap, "AP50": ap + 0.2, "AP75": ap + 0.02, "APs": ap / 2, "APm": ap, "APl": ap + 0.1,
                       "AR1": ap, "AR10": ap, "AR100": ap + 0.15}
            rows.append({"run_id": f"run{index}{seed}", "run_name": f"{name} s{seed}", "cell": name,
                         "cell_index": index, "seed": seed, "outcome": outcome, "config_hash": f"h{index}",
                         **config, **metrics, "infer_ms_per_img": 10.0, "train_seconds": 60.0,
                         "diverged_at": 150.0 if outcome == "diverged" else math.nan})
    return pd.DataFrame(rows)


def _histories(runs: pd.DataFrame) -> pd.DataFrame:
    """loss_cls decaying and loss_box_reg falling for every run, every 10 iterations."""
    rows = []
    for i, run in enumerate(runs.itertuples()):
        for step in range(0, 300, 10):
            blown = run.outcome == "diverged" and step >= 150
            rows.append((run.run_id, "loss_cls", step, math.inf if blown else 1.1 * math.exp(-step / 100) + 0.01 * i))
            rows.append((run.run_id, "loss_box_reg", step, 0.6 - step / 1000 + 0.005 * i))
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def _gamma_sweep() -> pd.DataFrame:
    """3 cells x 3 seeds; the g=5 cell's seed 2 diverged (with a bogus AP of 0 that must not count)."""
    return _runs([
        ("focal g=0 a=0.75", _config(loss__gamma=0.0, loss__alpha=0.75),
         [(0, "finished", 0.30), (1, "finished", 0.32), (2, "finished", 0.34)]),
        ("focal g=2 a=0.25", _config(), [(0, "finished", 0.33), (1, "finished", 0.36), (2, "finished", 0.36)]),
        ("focal g=5 a=0.25", _config(loss__gamma=5.0),
         [(0, "finished", 0.31), (1, "finished", 0.33), (2, "diverged", 0.0)]),
    ])


def _spec(**kw) -> ReportSpec:
    defaults = dict(name="gamma-sweep", description="Focal loss: gamma and alpha.",
                    varied=["loss.gamma", "loss.alpha"], paper_table="b", command=COMMAND)
    return ReportSpec(**{**defaults, **kw})


def _read_table(path: Path) -> list[dict[str, str]]:
    """The rows of a Markdown table file as {header: cell text}."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    return [dict(zip(split[0], row)) for row in split[2:]]


# ----------------------------------------------------------------------------- aggregate


def test_summarize_by_hand():
    mean, std, ci, n = summarize([0.30, 0.32, 0.34, math.nan])
    assert (mean, std, n) == (pytest.approx(0.32), pytest.approx(0.02), 3)
    assert ci == pytest.approx(T_975_DF2 * 0.02 / math.sqrt(3)) == pytest.approx(0.049682, abs=1e-6)
    one = summarize([0.3])
    assert one[0] == 0.3 and math.isnan(one[1]) and math.isnan(one[2])


def test_aggregate_means_stds_cis_equal_hand_computed():
    cells = aggregate(_gamma_sweep(), _spec())
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
    cells = aggregate(_gamma_sweep(), _spec())
    g5 = cells.iloc[2]
    assert (g5["n"], g5["n_runs"], g5["n_diverged"], g5["n_failed"]) == (2, 3, 1, 0)
    # Its bogus AP of 0.0 would give a mean of 0.2133 if it were averaged in.
    assert g5["AP_mean"] == pytest.approx(0.32)
    assert g5["AP_std"] == pytest.approx(0.02 / math.sqrt(2))
    assert g5["AP_ci95"] == pytest.approx(T_975_DF1 * (0.02 / math.sqrt(2)) / math.sqrt(2))
    assert g5["run_ids"] == "run20 run21"


def test_fully_diverged_cell_has_counts_and_no_numbers():
    runs = _runs([("ce", _config(loss__cls="ce"), [(0, "diverged", math.nan), (1, "diverged", math.nan)]),
                  ("focal", _config(), [(0, "finished", 0.3), (1, "failed", math.nan)])])
    cells = aggregate(runs, _spec(varied=["loss.cls"]))
    ce, fl = cells.iloc[0], cells.iloc[1]
    assert (ce["n"], ce["n_diverged"]) == (0, 2) and math.isnan(ce["AP_mean"]) and ce["run_ids"] == ""
    assert (fl["n"], fl["n_failed"]) == (1, 1) and fl["AP_mean"] == 0.3 and math.isnan(fl["AP_std"])


def test_every_outcome_is_counted():
    runs = _runs([("fl", _config(), [(0, "finished", 0.3), (1, "pruned", math.nan), (2, "interrupted", math.nan),
                                     (3, "weird", math.nan), (4, "failed", math.nan)])])
    cell = aggregate(runs, _spec()).iloc[0]
    assert (cell["n"], cell["n_runs"], cell["n_pruned"], cell["n_interrupted"], cell["n_other"],
            cell["n_failed"], cell["n_diverged"]) == (1, 5, 1, 1, 1, 1, 0)


def test_aggregate_names_missing_columns():
    runs = _gamma_sweep().drop(columns=["model.num_scales"])
    with pytest.raises(ValueError, match="model.num_scales"):
        aggregate(runs, _spec(varied=["model.num_scales"]))
    with pytest.raises(ValueError, match="no runs"):
        aggregate(runs.iloc[:0], _spec())


# ----------------------------------------------------------------------------- deltas


def test_deltas_paired_when_seeds_match_else_welch():
    runs = _gamma_sweep()
    cells = aggregate(runs, _spec())
    deltas = baseline_deltas(runs, cells, _spec())
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
    runs = _gamma_sweep()
    spec = _spec(baseline="focal g=2 a=0.25")
    deltas = baseline_deltas(runs, aggregate(runs, spec), spec)
    assert deltas.iloc[0]["AP_delta"] == pytest.approx(-0.03) and deltas.iloc[1]["AP_delta"] == 0.0
    with pytest.raises(ValueError, match="no cell"):
        baseline_deltas(runs, aggregate(runs, spec), _spec(baseline="nope"))


# ----------------------------------------------------------------------------- paper rows


def _cells(configs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"cell": f"c{i}", **c} for i, c in enumerate(configs)])


def test_paper_rows_table_a_alpha():
    cells = _cells([_config(loss__cls="alpha_ce", loss__alpha=0.25, loss__gamma=0.0),
                    _config(loss__cls="alpha_ce", loss__alpha=0.75, loss__gamma=0.0),
                    _config(loss__cls="focal", loss__alpha=0.5, loss__gamma=0.0),  # FL with gamma 0 is alpha-CE
                    _config(loss__cls="alpha_ce", loss__alpha=0.3),  # not in the table
                    _config(loss__cls="ce", loss__alpha=0.5)])  # plain CE: no row in (a)
    rows = paper_rows(_spec(paper_table="a"), cells)
    assert rows["paper_AP"].iloc[:3].tolist() == pytest.approx([0.108, 0.311, 0.302])
    assert rows["paper_AP50"].iloc[1] == pytest.approx(0.494) and rows["paper_AP75"].iloc[1] == pytest.approx(0.330)
    assert rows["paper_AP"].iloc[3:].isna().all()


def test_paper_rows_table_b_gamma_alpha():
    cells = _cells([_config(loss__gamma=2.0, loss__alpha=0.25), _config(loss__gamma=0.5, loss__alpha=0.5),
                    _config(loss__gamma=0.5, loss__alpha=0.25), _config(loss__gamma=0.2 + 1e-9, loss__alpha=0.75)])
    rows = paper_rows(_spec(paper_table="b"), cells)
    assert rows["paper_AP"].iloc[0] == pytest.approx(0.340) and rows["paper_AP50"].iloc[0] == pytest.approx(0.525)
    assert rows["paper_AP"].iloc[1] == pytest.approx(0.329)
    assert math.isnan(rows["paper_AP"].iloc[2])  # gamma 0.5 was run at alpha 0.5 only
    assert rows["paper_AP"].iloc[3] == pytest.approx(0.319)  # within the float tolerance


def test_paper_rows_table_c_scales_and_ratios():
    cells = _cells([_config(model__num_scales=2), _config(model__num_scales=1, model__aspect_ratios=[1.0]),
                    _config(model__num_scales=3, model__aspect_ratios=[0.25, 0.5, 1.0, 2.0])])
    rows = paper_rows(_spec(paper_table="c"), cells)
    assert rows["paper_AP"].iloc[0] == pytest.approx(0.342) and rows["paper_AP75"].iloc[0] == pytest.approx(0.365)
    assert rows["paper_AP"].iloc[1] == pytest.approx(0.303)
    assert math.isnan(rows["paper_AP"].iloc[2])  # 4 ratios: not in the table


def test_paper_rows_table_d_ohem():
    cells = _cells([_config(loss__cls="ohem", loss__ohem_batch=128, loss__ohem_nms=0.5),
                    _config(loss__cls="ohem", loss__ohem_batch=256, loss__ohem_nms=0.5, loss__ohem_fg_fraction=0.25),
                    _config(loss__cls="focal", model__trunk="resnet101"),
                    _config(loss__cls="ohem", loss__ohem_batch=128, loss__ohem_nms=0.7, loss__ohem_fg_fraction=0.25),
                    _config(loss__cls="ohem", loss__ohem_batch=512, loss__ohem_nms=0.7)])
    rows = paper_rows(_spec(paper_table="d"), cells)
    assert rows["paper_AP"].iloc[0] == pytest.approx(0.328)
    assert rows["paper_AP"].iloc[1] == pytest.approx(0.283)  # OHEM 1:3, batch 256, nms 0.5
    assert rows["paper_AP"].iloc[2] == pytest.approx(0.360)  # FL
    assert math.isnan(rows["paper_AP"].iloc[3])  # 1:3 was only run at nms 0.5
    assert rows["paper_AP"].iloc[4] == pytest.approx(0.306)


def test_table_d_shows_no_ohem_settings_on_the_focal_row():
    runs = _runs([("focal", _config(), [(0, "finished", 0.31), (1, "finished", 0.32)]),
                  ("ohem B=256", _config(loss__cls="ohem", loss__ohem_batch=256), [(0, "finished", 0.2), (1, "finished", 0.21)])])
    spec = _spec(name="ohem-vs-focal", varied=["loss.cls", "loss.ohem_batch", "loss.ohem_fg_fraction"],
                 paper_table="d", baseline="focal")
    table = display_table(results_table(runs, spec), spec)
    assert table[["loss", "batch", "fg:bg"]].values.tolist() == [["focal", "—", "—"], ["ohem", "256", "none"]]


def test_paper_rows_table_e_depth_scale_and_no_table():
    cells = _cells([_config(model__trunk="resnet101", data__min_size=800), _config(data__min_size=400),
                    _config(model__trunk="tiny", data__min_size=600)])
    rows = paper_rows(_spec(paper_table="e"), cells)
    assert rows["paper_AP"].iloc[0] == pytest.approx(0.378) and rows["paper_time_ms"].iloc[0] == 198
    assert rows["paper_APs"].iloc[1] == pytest.approx(0.112)
    assert math.isnan(rows["paper_AP"].iloc[2])
    assert paper_rows(_spec(paper_table=None), cells).isna().all().all()
    with pytest.raises(ValueError, match="unknown paper table"):
        paper_rows(_spec(paper_table="f"), cells)


# ----------------------------------------------------------------------------- write_report


def _write(runs: pd.DataFrame, histories: pd.DataFrame, spec: ReportSpec, out: Path) -> dict[str, Path]:
    """write_report with the paper's Figure 1 drawn first and passed in, as build_report does."""
    out.mkdir(parents=True)
    return write_report(runs, histories, spec, out, figure1(out))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict[str, Path], pd.DataFrame]:
    runs = _gamma_sweep()
    paths = _write(runs, _histories(runs), _spec(), tmp_path_factory.mktemp("report") / "gamma-sweep")
    return paths, runs


def _check_png(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert 500 <= width <= 3000 and 300 <= height <= 2000, (path.name, image.size)
        # Not a blank canvas: a drawn plot has many distinct colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20


def test_write_report_writes_every_file(report):
    paths, _ = report
    expected = {"table": "table.md", "table_tex": "table.tex", "results": "results.csv", "runs": "runs.csv",
                "ap": "ap.png", "deltas": "deltas.png", "loss_curves": "loss_curves.png",
                "loss_vs_pt": "loss_vs_pt.png", "readme": "README.md"}
    assert {k: p.name for k, p in paths.items()} == expected
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0
    for name in PNGS:
        _check_png(paths["table"].parent / name)


def test_table_md_numbers_paper_and_divergence(report):
    paths, runs = report
    rows = _read_table(paths["table"])
    assert [r["cell"] for r in rows] == ["focal g=0 a=0.75", "focal g=2 a=0.25", "focal g=5 a=0.25"]
    assert list(rows[0])[:2] == ["gamma", "alpha"]  # varied keys first, with the paper's names
    cells = aggregate(runs, _spec())
    for row, (_, cell) in zip(rows, cells.iterrows()):
        mean, std = (float(v) for v in row["AP"].split(" ± "))
        assert mean == round(100 * cell["AP_mean"], 1) and std == round(100 * cell["AP_std"], 1)
    assert rows[0]["AP"] == "32.0 ± 2.0" and rows[0]["paper AP"] == "31.1"
    assert rows[1]["paper AP"] == "34.0" and rows[1]["paper AP50"] == "52.5"
    assert rows[1]["ΔAP"] == "+3.0" and rows[0]["ΔAP"] == "baseline"
    assert rows[0]["AP 95% CI"] == "[27.0, 37.0]"  # 32 -+ 4.97
    assert "diverged" in rows[2]["n"] and rows[2]["n"].startswith("2/3")


def test_results_and_runs_csv_trace_back_to_runs(report):
    paths, runs = report
    results = pd.read_csv(paths["results"])
    assert results["AP_mean"].tolist() == pytest.approx([0.32, 0.35, 0.32])
    assert results["paper_AP"].tolist() == pytest.approx([0.311, 0.340, 0.322])
    written = pd.read_csv(paths["runs"])
    assert sorted(written["run_id"]) == sorted(runs["run_id"])
    assert written.set_index("run_id").loc["run22", "outcome"] == "diverged"


def test_readme_references_plots_command_and_runs(report):
    paths, runs = report
    readme = paths["readme"].read_text()
    for name in PNGS:
        assert f"]({name})" in readme
    assert COMMAND in readme and "runs.csv" in readme
    assert "1 diverged" in readme and "0 failed" in readme
    for run_id in runs["run_id"]:
        assert run_id in readme
    assert paths["table"].read_text().strip() in readme


def test_latex_escapes_headers():
    table = pd.DataFrame({"#sc": ["3"], "AP": ["32.0 ± 2.0"], "AP 95% CI": ["[27.0, 37.0]"], "cell": ["a_b"]})
    latex = latex_table(table, "caption")
    assert r"\#sc" in latex and r"95\% CI" in latex and r"a\_b" in latex and r"$\pm$" in latex
    assert r"\begin{tabular}" in latex


def test_report_with_a_fully_diverged_cell(tmp_path):
    runs = _runs([("focal g=2", _config(), [(0, "finished", 0.33), (1, "finished", 0.35)]),
                  ("focal g=0.5 a=0.25", _config(loss__gamma=0.5),
                   [(0, "diverged", math.nan), (1, "diverged", math.nan)])])
    paths = _write(runs, _histories(runs), _spec(), tmp_path / "r")
    rows = _read_table(paths["table"])
    assert rows[1]["AP"] == "diverged (2/2)" and rows[1]["AP50"] == "—" and rows[1]["paper AP"] == "—"
    assert rows[0]["paper AP"] == "34.0"
    for name in PNGS:
        _check_png(tmp_path / "r" / name)


def test_report_when_no_run_finished_and_no_metric_was_logged(tmp_path):
    runs = _runs([("a", _config(loss__gamma=0.0), [(0, "diverged", math.nan)]),
                  ("b", _config(), [(0, "failed", math.nan)])])
    runs = runs.drop(columns=["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"])
    paths = _write(runs, _histories(runs), _spec(), tmp_path / "r")
    rows = _read_table(paths["table"])
    assert [r["AP"] for r in rows] == ["diverged (1/1)", "failed (1/1)"]
    assert "0 finished, 1 diverged, 1 failed" in paths["readme"].read_text()
    for name in ("ap.png", "deltas.png", "loss_vs_pt.png"):
        assert (tmp_path / "r" / name).is_file()


def test_single_seed_empty_histories_and_no_numeric_x(tmp_path):
    runs = _runs([("CE", _config(loss__cls="ce"), [(0, "finished", 0.21)]),
                  ("alpha-CE", _config(loss__cls="alpha_ce", loss__alpha=0.75), [(0, "finished", 0.29)]),
                  ("FL", _config(), [(0, "finished", 0.33)])])
    empty = pd.DataFrame(columns=["run_id", "key", "step", "value"])
    spec = ReportSpec(name="losses", description="The loss family.", varied=["loss.cls"], command="ablate report x")
    paths = _write(runs, empty, spec, tmp_path / "r")
    assert "loss_curves" not in paths and not (tmp_path / "r" / "loss_curves.png").exists()
    readme = paths["readme"].read_text()
    assert "`loss_curves.png` was not written" in readme and "](loss_curves.png)" not in readme
    rows = _read_table(paths["table"])
    assert [r["AP"] for r in rows] == ["21.0", "29.0", "33.0"]  # no std from one seed
    assert [r["AP 95% CI"] for r in rows] == ["—"] * 3 and rows[2]["ΔAP"] == "+12.0"
    assert pd.read_csv(paths["results"])["AP_ci95"].isna().all()
    for name in ("ap.png", "deltas.png", "loss_vs_pt.png"):
        _check_png(tmp_path / "r" / name)


def test_categorical_x_with_hue(tmp_path):
    seeds = lambda *aps: [(s, "finished", ap) for s, ap in enumerate(aps)]  # noqa: E731
    runs = _runs([("ce", _config(loss__cls="ce", model__prior=None), seeds(0.10, 0.12)),
                  ("ce pi", _config(loss__cls="ce"), seeds(0.28, 0.30)),
                  ("fl", _config(model__prior=None), seeds(0.20, 0.22)),
                  ("fl pi", _config(), seeds(0.33, 0.34))])
    spec = ReportSpec(name="prior", description="", varied=["loss.cls", "model.prior"], x="loss.cls",
                      hue="model.prior")
    paths = write_report(runs, _histories(runs), spec, tmp_path / "r")
    rows = _read_table(paths["table"])
    assert [r["pi"] for r in rows] == ["none", "0.01", "none", "0.01"]
    _check_png(paths["ap"])


def _seed_dots(ax) -> list[tuple[float, float]]:
    """(x, y) in display pixels of every dot drawn for a single seed (the AP plot's scatter)."""
    dots = [c for c in ax.collections if isinstance(c, PathCollection)]
    return [tuple(xy) for c in dots for xy in c.get_offset_transform().transform(c.get_offsets())]


def test_ap_plot_cuts_the_band_at_zero_and_draws_each_seed_beside_the_mean():
    # gamma 0: AP 0, 0 and 10 -> mean 3.3, std 5.77, t interval [-11.0, 17.7] (no AP is negative).
    runs = _runs([("focal g=0 a=0.75", _config(loss__gamma=0.0, loss__alpha=0.75),
                   [(0, "finished", 0.0), (1, "finished", 0.0), (2, "finished", 0.10)]),
                  ("focal g=2 a=0.25", _config(), [(0, "finished", 0.33), (1, "finished", 0.36),
                                                   (2, "finished", 0.39)])])
    spec = _spec(x="loss.gamma", paper_table=None)
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
    high = _runs([("focal g=2 a=0.25", _config(), [(0, "finished", 0.50), (1, "finished", 0.52), (2, "finished", 0.56)])])
    assert draw_ap(high, results_table(high, spec), spec).axes[0].get_ylim()[0] > 40  # no empty axis down to 0
    dots = _seed_dots(ax)
    assert sorted(round(y, 6) for _, y in ax.transData.inverted().transform(dots)) == sorted(
        round(100 * ap, 6) for ap in runs["AP"])
    # Beside the mean: each dot sits SEED_SHIFT_POINTS right of its cell's x.
    shift = plots.SEED_SHIFT_POINTS / 72 * ax.figure.dpi
    cell_x = {ax.transData.transform((x, 0))[0] for x in (0.0, 2.0)}
    assert {round(x - shift, 3) for x, _ in dots} == {round(x, 3) for x in cell_x}


def test_categorical_ap_plot_cuts_its_error_bars_at_zero():
    runs = _runs([("CE", _config(loss__cls="ce"), [(0, "finished", 0.0), (1, "finished", 0.0), (2, "finished", 0.1)]),
                  ("FL", _config(), [(0, "finished", 0.33), (1, "finished", 0.36), (2, "finished", 0.39)])])
    spec = ReportSpec(name="losses", description="", varied=["loss.cls"])
    ax = draw_ap(runs, results_table(runs, spec), spec).axes[0]
    bars = np.concatenate([line.get_ydata() for line in ax.lines if len(line.get_ydata())])
    assert np.nanmin(bars) == pytest.approx(0.0)
    assert len(_seed_dots(ax)) == 6


def test_figure1_curves_are_the_focal_loss():
    p = np.array([0.5, 0.9])
    curves = {g: c.numpy() for g, c in figure1_curves(torch.tensor(p)).items()}
    assert sorted(curves) == [0.0, 0.5, 1.0, 2.0, 5.0]
    assert curves[0.0] == pytest.approx(-np.log(p))  # CE
    assert curves[2.0] == pytest.approx(-(1 - p) ** 2 * np.log(p))
    assert curves[5.0][1] == pytest.approx(-(0.1**5) * np.log(0.9))


def test_figures_come_in_from_the_caller_in_order_with_their_captions(tmp_path):
    """write_report draws no paper figure itself: Figure 1 and 4 are passed in (or said missing)."""
    runs = _gamma_sweep()
    bare = write_report(runs, _histories(runs), _spec(), tmp_path / "bare")
    assert "loss_vs_pt" not in bare and not (tmp_path / "bare" / "loss_vs_pt.png").exists()
    out = tmp_path / "r"
    out.mkdir()
    (out / "loss_cdf.png").write_bytes((bare["ap"]).read_bytes())  # any PNG stands in for Figure 4
    paths = write_report(runs, _histories(runs), _spec(), out,
                         {**figure1(out), "loss_cdf": (out / "loss_cdf.png", "figure 4, as the caller says")},
                         {"other.png": "no checkpoint"})
    assert list(paths)[-3:] == ["loss_vs_pt", "loss_cdf", "readme"]
    readme = paths["readme"].read_text()
    order = [readme.index(f"]({name}.png)") for name in ("ap", "deltas", "loss_curves", "loss_vs_pt", "loss_cdf")]
    assert order == sorted(order)
    assert f"{FIGURE1_CAPTION[0].upper()}{FIGURE1_CAPTION[1:]}:" in readme and "Figure 4, as the caller says:" in readme
    assert "`other.png` was not written: no checkpoint." in readme
    _check_png(paths["loss_vs_pt"])


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


def test_the_reporter_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, ablate.report; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
