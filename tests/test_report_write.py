"""ablate.report.write: the files of a report, its table, README and provenance (with the paper's
Figure 1 from ablate.report.build, passed in as the report's edge does)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from ablate.report import ReportSpec, aggregate, write_report
from ablate.report.build import FIGURE1_CAPTION, figure1
from report_cases import COMMAND, PNGS, check_png, gamma_sweep, histories, make_config, make_runs, make_spec, read_table


# ----------------------------------------------------------------------------- write_report


def _write(runs: pd.DataFrame, curves: pd.DataFrame, spec: ReportSpec, out: Path) -> dict[str, Path]:
    """write_report with the paper's Figure 1 drawn first and passed in, as build_report does."""
    out.mkdir(parents=True)
    return write_report(runs, curves, spec, out, figure1(out))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict[str, Path], pd.DataFrame]:
    runs = gamma_sweep()
    paths = _write(runs, histories(runs), make_spec(), tmp_path_factory.mktemp("report") / "gamma-sweep")
    return paths, runs


def test_write_report_writes_every_file(report):
    paths, _ = report
    expected = {"table": "table.md", "table_tex": "table.tex", "results": "results.csv", "runs": "runs.csv",
                "ap": "ap.png", "deltas": "deltas.png", "loss_curves": "loss_curves.png",
                "loss_vs_pt": "loss_vs_pt.png", "readme": "README.md"}
    assert {k: p.name for k, p in paths.items()} == expected
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0
    for name in PNGS:
        check_png(paths["table"].parent / name)


def test_table_md_numbers_paper_and_divergence(report):
    paths, runs = report
    rows = read_table(paths["table"])
    assert [r["cell"] for r in rows] == ["focal g=0 a=0.75", "focal g=2 a=0.25", "focal g=5 a=0.25"]
    assert list(rows[0])[:2] == ["gamma", "alpha"]  # varied keys first, with the paper's names
    cells = aggregate(runs, make_spec())
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


def test_report_with_a_fully_diverged_cell(tmp_path):
    runs = make_runs([("focal g=2", make_config(), [(0, "finished", 0.33), (1, "finished", 0.35)]),
                  ("focal g=0.5 a=0.25", make_config(loss__gamma=0.5),
                   [(0, "diverged", math.nan), (1, "diverged", math.nan)])])
    paths = _write(runs, histories(runs), make_spec(), tmp_path / "r")
    rows = read_table(paths["table"])
    assert rows[1]["AP"] == "diverged (2/2)" and rows[1]["AP50"] == "—" and rows[1]["paper AP"] == "—"
    assert rows[0]["paper AP"] == "34.0"
    for name in PNGS:
        check_png(tmp_path / "r" / name)


def test_report_when_no_run_finished_and_no_metric_was_logged(tmp_path):
    runs = make_runs([("a", make_config(loss__gamma=0.0), [(0, "diverged", math.nan)]),
                  ("b", make_config(), [(0, "failed", math.nan)])])
    runs = runs.drop(columns=["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"])
    paths = _write(runs, histories(runs), make_spec(), tmp_path / "r")
    rows = read_table(paths["table"])
    assert [r["AP"] for r in rows] == ["diverged (1/1)", "failed (1/1)"]
    assert "0 finished, 1 diverged, 1 failed" in paths["readme"].read_text()
    for name in ("ap.png", "deltas.png", "loss_vs_pt.png"):
        assert (tmp_path / "r" / name).is_file()


def test_single_seed_empty_histories_and_no_numeric_x(tmp_path):
    runs = make_runs([("CE", make_config(loss__cls="ce"), [(0, "finished", 0.21)]),
                  ("alpha-CE", make_config(loss__cls="alpha_ce", loss__alpha=0.75), [(0, "finished", 0.29)]),
                  ("FL", make_config(), [(0, "finished", 0.33)])])
    empty = pd.DataFrame(columns=["run_id", "key", "step", "value"])
    spec = ReportSpec(name="losses", description="The loss family.", varied=["loss.cls"], command="ablate report x")
    paths = _write(runs, empty, spec, tmp_path / "r")
    assert "loss_curves" not in paths and not (tmp_path / "r" / "loss_curves.png").exists()
    readme = paths["readme"].read_text()
    assert "`loss_curves.png` was not written" in readme and "](loss_curves.png)" not in readme
    rows = read_table(paths["table"])
    assert [r["AP"] for r in rows] == ["21.0", "29.0", "33.0"]  # no std from one seed
    assert [r["AP 95% CI"] for r in rows] == ["—"] * 3 and rows[2]["ΔAP"] == "+12.0"
    assert pd.read_csv(paths["results"])["AP_ci95"].isna().all()
    for name in ("ap.png", "deltas.png", "loss_vs_pt.png"):
        check_png(tmp_path / "r" / name)


def test_categorical_x_with_hue(tmp_path):
    seeds = lambda *aps: [(s, "finished", ap) for s, ap in enumerate(aps)]  # noqa: E731
    runs = make_runs([("ce", make_config(loss__cls="ce", model__prior=None), seeds(0.10, 0.12)),
                  ("ce pi", make_config(loss__cls="ce"), seeds(0.28, 0.30)),
                  ("fl", make_config(model__prior=None), seeds(0.20, 0.22)),
                  ("fl pi", make_config(), seeds(0.33, 0.34))])
    spec = ReportSpec(name="prior", description="", varied=["loss.cls", "model.prior"], x="loss.cls",
                      hue="model.prior")
    paths = write_report(runs, histories(runs), spec, tmp_path / "r")
    rows = read_table(paths["table"])
    assert [r["pi"] for r in rows] == ["none", "0.01", "none", "0.01"]
    check_png(paths["ap"])


def test_figures_come_in_from_the_caller_in_order_with_their_captions(tmp_path):
    """write_report draws no paper figure itself: Figure 1 and 4 are passed in (or said missing)."""
    runs = gamma_sweep()
    bare = write_report(runs, histories(runs), make_spec(), tmp_path / "bare")
    assert "loss_vs_pt" not in bare and not (tmp_path / "bare" / "loss_vs_pt.png").exists()
    out = tmp_path / "r"
    out.mkdir()
    (out / "loss_cdf.png").write_bytes((bare["ap"]).read_bytes())  # any PNG stands in for Figure 4
    paths = write_report(runs, histories(runs), make_spec(), out,
                         {**figure1(out), "loss_cdf": (out / "loss_cdf.png", "figure 4, as the caller says")},
                         {"other.png": "no checkpoint"})
    assert list(paths)[-3:] == ["loss_vs_pt", "loss_cdf", "readme"]
    readme = paths["readme"].read_text()
    order = [readme.index(f"]({name}.png)") for name in ("ap", "deltas", "loss_curves", "loss_vs_pt", "loss_cdf")]
    assert order == sorted(order)
    assert f"{FIGURE1_CAPTION[0].upper()}{FIGURE1_CAPTION[1:]}:" in readme and "Figure 4, as the caller says:" in readme
    assert "`other.png` was not written: no checkpoint." in readme
    check_png(paths["loss_vs_pt"])


