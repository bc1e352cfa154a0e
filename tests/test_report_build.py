"""ablate.report.build, the report's edge: the ReportSpec an experiment file makes, the paper's
Figure 1, which parent run a report goes on, and why Figure 4 is left out (the end to end build
from a tracked grid: test_grid.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ablate.experiments import load_experiment
from ablate.report.build import FIGURE1_CAPTION, figure1, loss_cdf_figure, report_parent, report_spec
from report_cases import check_png

SMOKE = Path(__file__).resolve().parent.parent / "experiments" / "smoke.toml"


def test_report_spec_is_the_experiments_cells_and_report_table(tmp_path):
    spec = report_spec(load_experiment(str(SMOKE)), "ablate report smoke")
    assert (spec.name, spec.varied, spec.x, spec.hue, spec.baseline, spec.paper_table, spec.command) == (
        "smoke", ["loss.cls"], "loss.cls", None, "focal", None, "ablate report smoke")
    path = tmp_path / "g.toml"
    path.write_text('description = "d"\n[report]\npaper_table = "b"\nhue = "loss.alpha"\n'
                    '[grid]\n"loss.gamma" = [0.0, 2.0]\n"loss.alpha" = [0.25]\n')
    spec = report_spec(load_experiment(str(path)))
    assert (spec.description, spec.varied, spec.x, spec.hue, spec.baseline, spec.paper_table) == (
        "d", ["loss.gamma", "loss.alpha"], None, "loss.alpha", None, "b")


def test_figure1_is_drawn_into_the_folder_with_its_caption(tmp_path):
    written = figure1(tmp_path)
    assert written == {"loss_vs_pt": (tmp_path / "loss_vs_pt.png", FIGURE1_CAPTION)}
    check_png(tmp_path / "loss_vs_pt.png")


class _Tracker:
    """The one thing report_parent asks a tracker: whether a run is still there (not deleted)."""

    def __init__(self, active: set[str]):
        self.active = active

    def is_active(self, run_id: str) -> bool:
        return run_id in self.active


def test_the_report_goes_on_the_parent_of_the_newest_run():
    runs = pd.DataFrame({"run_id": ["a", "b", "c"], "parent_run_id": ["p1", "p2", None],
                         "start_time": [3, 1, 9]})
    assert report_parent(_Tracker({"p1", "p2"}), runs) == "p1"  # c is newer, but has no parent
    assert report_parent(_Tracker({"p2"}), runs) is None  # p1 was deleted
    assert report_parent(_Tracker({"p1"}), runs.drop(columns=["parent_run_id"])) is None


def test_figure_4_says_why_it_is_missing(tmp_path):
    exp = load_experiment(str(SMOKE))  # [report.loss_cdf] cell = "focal"
    runs = pd.DataFrame({"run_id": ["r0aaaaaaaa", "r1"], "cell": ["focal", "alpha_ce"], "seed": [0, 0],
                         "outcome": ["diverged", "finished"], "run_dir": [str(tmp_path), str(tmp_path)]})
    assert loss_cdf_figure(exp, runs, tmp_path) == ({}, {"loss_cdf.png": "no finished run of the cell 'focal'"})
    runs.loc[0, "outcome"] = "finished"
    written, missing = loss_cdf_figure(exp, runs, tmp_path)
    assert written == {} and "the checkpoint of run r0aaaaaaaa" in missing["loss_cdf.png"]
    assert str(tmp_path / "checkpoint.pt") in missing["loss_cdf.png"]
    plain = load_experiment(str(SMOKE))
    plain.report.loss_cdf = None
    assert loss_cdf_figure(plain, runs, tmp_path) == ({}, {})
