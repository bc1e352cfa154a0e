"""The Table 1 findings checks, over small hand-written results.csv files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from ablate import findings
from ablate.errors import AblateError
from cli import app


def write(root: Path, experiment: str, rows: list[dict]) -> None:
    """rows: cell, AP (points), ci (points, None for one seed), n, plus config columns (dotted keys;
    a list is written as the report writes it, "[0.5, 1.0, 2.0]", None as an empty field)."""
    frame = pd.DataFrame([{"cell": r["cell"], "AP_mean": r["AP"] / 100,
                           "AP_ci95": (r.get("ci") if r.get("ci") is not None else float("nan")) / 100,
                           "AP_std": 1.0 / 100, "AP50_mean": r["AP"] / 50, "AP50_std": 0.0, "AP75_mean": r["AP"] / 100,
                           "AP75_std": 0.0, "n": r.get("n", 3), "n_runs": r.get("n_runs", 3), "n_diverged": r.get("n_diverged", 0),
                           "n_collapsed": r.get("n_collapsed", 0), "paper_AP": float("nan"),
                           **{k: v for k, v in r.items() if "." in k}} for r in rows])
    (root / experiment).mkdir(parents=True, exist_ok=True)
    frame.to_csv(root / experiment / "results.csv", index=False)


def alpha_ce(a: float, ap: float, **kw) -> dict:
    return {"cell": f"a={a:g}", "loss.cls": "alpha_ce", "loss.alpha": a, "AP": ap, **kw}


def gamma(g: float, ap: float, alpha: float = 0.25, **kw) -> dict:
    return {"cell": f"g={g:g} a={alpha:g}", "loss.cls": "focal", "loss.gamma": g, "loss.alpha": alpha, "AP": ap, **kw}


def prior(loss: str, pi: float | None, ap: float, iterations: int = 800, **kw) -> dict:
    return {"cell": f"{loss} pi={'none' if pi is None else f'{pi:g}'}", "loss.cls": loss, "model.prior": pi,
            "train.iterations": iterations, "AP": ap, **kw}


@pytest.fixture
def reports(tmp_path: Path) -> Path:
    write(tmp_path, "alpha-ce", [alpha_ce(a, ap, ci=1.0) for a, ap in ((0.25, 3.0), (0.5, 20.0), (0.75, 27.0),
                                                                       (0.99, 15.0))])
    write(tmp_path, "gamma-sweep", [gamma(g, ap, ci=1.0) for g, ap in ((0.0, 27.0), (1.0, 29.0), (2.0, 31.0),
                                                                      (5.0, 20.0))])
    write(tmp_path, "ohem-vs-focal", [{"cell": "focal", "loss.cls": "focal", "AP": 31.0, "ci": 1.0},
                                      {"cell": "ohem B=128 nms=0.5", "loss.cls": "ohem", "AP": 29.5, "ci": 1.0},
                                      {"cell": "ohem B=256 nms=0.5", "loss.cls": "ohem", "AP": 25.0, "ci": 1.0}])
    write(tmp_path, "anchors", [{"cell": "scales=3 ratios=[0.5,1,2]", "model.num_scales": 3,
                                 "model.aspect_ratios": [0.5, 1.0, 2.0], "AP": 31.0, "ci": 1.0},
                                {"cell": "scales=3 ratios=[1]", "model.num_scales": 3, "model.aspect_ratios": [1.0],
                                 "AP": 35.0, "ci": 1.0},
                                {"cell": "scales=1 ratios=[1]", "model.num_scales": 1, "model.aspect_ratios": [1.0],
                                 "AP": 24.0, "ci": 1.0}])
    write(tmp_path, "prior-init", [prior("ce", None, 0.2, ci=0.1), prior("ce", 0.01, 8.0, ci=2.0),
                                   prior("focal", None, 0.5, ci=0.1), prior("focal", 0.01, 31.0, ci=1.0)])
    return tmp_path


def test_every_finding_is_judged_from_the_reports(reports):
    verdicts = findings.judge_reports(reports)
    assert len(verdicts) == len(findings.CHECKS)
    by_rule = {v.finding: v for v in verdicts}
    assert all(v.holds is not None for v in verdicts)
    focal_vs_ce = next(v for f, v in by_rule.items() if "best alpha-CE" in f)
    assert focal_vs_ce.holds is True and "+4.0" in focal_vs_ce.ours  # 31.0 - 27.0
    # std 1 and 3 seeds each: t = 4 / sqrt(2 / 3) = 4.90 on 4 degrees of freedom
    assert "Welch t-test p = 0.008" in focal_vs_ce.ours
    ohem = next(v for f, v in by_rule.items() if "OHEM" in f)
    assert ohem.holds is False and "+1.5" in ohem.ours  # 31.0 - 29.5 < 2
    assert all(v.holds for f, v in by_rule.items() if "OHEM" not in f)


def test_overlapping_cis_or_a_wrong_peak_fail(reports):
    write(reports, "alpha-ce", [alpha_ce(0.25, 3.0, ci=1.0), alpha_ce(0.99, 29.5, ci=1.0)])
    write(reports, "gamma-sweep", [gamma(g, ap, ci=1.5) for g, ap in ((0.0, 27.0), (0.5, 32.0), (2.0, 31.0),
                                                                     (5.0, 20.0))])
    by_rule = {v.finding: v for v in findings.judge_reports(reports)}
    assert next(v for f, v in by_rule.items() if "lies in [0.5, 0.9]" in f).holds is False  # best alpha 0.99
    # 31.0 - 29.5 < 2, and [29.5, 32.5] overlaps [28.5, 30.5]
    assert next(v for f, v in by_rule.items() if "best alpha-CE" in f).holds is False
    assert next(v for f, v in by_rule.items() if "peak at gamma" in f).holds is False  # peak at 0.5


def test_one_seed_or_a_missing_report_is_not_measured(reports):
    write(reports, "alpha-ce", [alpha_ce(0.25, 3.0, ci=None, n=1), alpha_ce(0.75, 27.0, ci=None, n=1)])
    (reports / "anchors" / "results.csv").unlink()
    by_rule = {v.finding: v for v in findings.judge_reports(reports)}
    assert next(v for f, v in by_rule.items() if "clearly worse" in f).holds is None  # no CI from one seed
    anchors = next(v for f, v in by_rule.items() if "3 scales" in f)
    assert anchors.holds is None and "anchors/results.csv" in anchors.ours


def test_prior_rules_count_unfinished_seeds(reports):
    write(reports, "prior-init", [prior("ce", None, float("nan"), n=0, n_diverged=3),
                                  prior("ce", 0.01, 8.0, ci=2.0, n=2, n_runs=3), prior("focal", 0.01, 31.0, ci=1.0)])
    by_rule = {v.finding: v for v in findings.judge_reports(reports)}
    collapse = next(v for f, v in by_rule.items() if "without the prior" in f)
    assert collapse.holds is True and "3 diverged" in collapse.ours
    assert next(v for f, v in by_rule.items() if "both CE and FL train" in f).holds is False  # a seed did not finish


def test_cli_writes_findings_md_and_the_readme_block(reports, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{findings.MARK_START}\nold table\n{findings.MARK_END}\nafter\n")
    result = CliRunner().invoke(app, ["findings", "--reports", str(reports), "--readme", str(readme)])
    assert result.exit_code == 0, result.output
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert "| 1d: FL beats the best OHEM variant by >= 2 AP |" in text
    assert "| finding (pass rule) |" in (reports / "findings.md").read_text()
    # the every-cell table links each cell to its report, relative to the README
    assert "| 1b | [g=2 a=0.25](" in text and "/gamma-sweep/README.md) | 31.0 ± 1.0 | 62.0 ± 0.0 |" in text


def test_cli_names_a_readme_without_markers(reports, tmp_path):
    readme = tmp_path / "NOTES.md"
    readme.write_text("no markers here\n")
    result = CliRunner().invoke(app, ["findings", "--reports", str(reports), "--readme", str(readme)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert str(readme) in result.output and "markers" in result.output


def _prior_schedule(reports: Path, ce: tuple[float, float], n_runs: int = 3) -> None:
    """prior-schedule with CE at 1600 and 3200 iterations scoring ce (points); FL fixed."""
    write(reports, "prior-schedule",
          [prior("ce", 0.01, ap, iterations=it, ci=2.0, n_runs=n_runs, cell=f"ce iterations={it}")
           for it, ap in zip((1600, 3200), ce)]
          + [prior("focal", 0.01, 33.0, iterations=it, ci=1.0, cell=f"focal iterations={it}") for it in (1600, 3200)])


def test_follow_up_ce_prior_schedule_rule(reports):
    # prior-init's CE at 800 iterations scores 8.0 (the fixture)
    _prior_schedule(reports, (12.0, 20.0))
    slow = findings.judge_reports(reports, findings.FOLLOW_UPS)[0]
    assert slow.holds is True and "800 it: CE 8.0" in slow.ours and "3200 it: CE 20.0 ± 1.0, FL 33.0" in slow.ours
    _prior_schedule(reports, (12.0, 11.0))  # falls at 3200: not a matter of schedule length
    assert findings.judge_reports(reports, findings.FOLLOW_UPS)[0].holds is False
    _prior_schedule(reports, (12.0, 20.0), n_runs=4)  # a seed at 3200 did not finish
    assert findings.judge_reports(reports, findings.FOLLOW_UPS)[0].holds is False
    (reports / "prior-schedule" / "results.csv").unlink()
    assert findings.judge_reports(reports, findings.FOLLOW_UPS)[0].holds is None


def test_cli_writes_the_follow_ups(reports, tmp_path):
    _prior_schedule(reports, (12.0, 20.0))
    result = CliRunner().invoke(app, ["findings", "--reports", str(reports)])
    assert result.exit_code == 0, result.output
    text = (reports / "findings.md").read_text()
    assert findings.FOLLOW_UP_HEADER in text and "| CE at pi = 0.01 is only slow" in text
    assert "| pi, longer | [ce iterations=3200](prior-schedule/README.md) | 20.0 ± 1.0 |" in text


def test_follow_up_focal_lead_over_five_seeds(reports):
    def five_seeds(focal: float, ci: float) -> None:
        write(reports, "focal-vs-alpha-ce", [gamma(2.0, focal, ci=ci, n=5, n_runs=5),
                                             alpha_ce(0.9, 27.0, ci=ci, n=5, n_runs=5)])

    five_seeds(31.0, 1.0)
    lead = next(v for v in findings.judge_reports(reports, findings.FOLLOW_UPS) if "5 seeds" in v.finding)
    assert lead.holds is True and "+4.0" in lead.ours and "(n=5)" in lead.ours
    five_seeds(31.0, 2.5)  # [28.5, 33.5] overlaps [24.5, 29.5]
    assert next(v for v in findings.judge_reports(reports, findings.FOLLOW_UPS) if "5 seeds" in v.finding).holds is False
    five_seeds(28.5, 0.1)  # disjoint, but +1.5 < 2
    assert next(v for v in findings.judge_reports(reports, findings.FOLLOW_UPS) if "5 seeds" in v.finding).holds is False
    write(reports, "focal-vs-alpha-ce", [gamma(2.0, 31.0, ci=1.0, n=3, n_runs=3), alpha_ce(0.9, 27.0, ci=1.0, n=3, n_runs=3)])
    three = next(v for v in findings.judge_reports(reports, findings.FOLLOW_UPS) if "5 seeds" in v.finding)
    assert three.holds is None and "(n=3)" in three.ours  # 3 seeds do not test a 5-seed hypothesis


def test_follow_up_budget_curves_judged_at_every_budget(reports):
    def budget(root: Path, name: str, focal: float, ce: float, alpha_ce_ap: float) -> None:
        rows = [gamma(2.0, focal, ci=1.0, **{"model.prior": 0.01}),
                {"cell": "ce", "loss.cls": "ce", "model.prior": 0.01, "AP": ce, "ci": 1.0},
                alpha_ce(0.9, alpha_ce_ap, ci=1.0, **{"model.prior": 0.01})]
        write(root, name, rows)  # root/name/results.csv

    budget(reports, "budget-curves", 31.0, 3.0, 28.5)  # x1 as the report's own results.csv
    for multiple, (focal, ce, a) in {1: (31.0, 3.0, 28.5), 2: (50.0, 48.0, 45.0), 4: (66.0, 70.0, 60.0)}.items():
        budget(reports / "budget-curves" / "budgets", f"x{multiple}", focal, ce, a)
    verdicts = findings.judge_reports(reports, findings.FOLLOW_UPS)
    over_budgets = findings.across_budgets(reports, findings.FOLLOW_UPS)
    over_ce, over_alpha = [v for v in verdicts if "Budget curves" in v.finding]
    assert "beats CE" in over_ce.finding and over_ce.holds is True and "; CE ce: 3.0" in over_ce.ours
    assert over_alpha.holds is True and "+2.5" in over_alpha.ours  # 31 vs 28.5, CIs [30, 32] and [27.5, 29.5]
    across = {v.finding: a for v, a in zip(verdicts, over_budgets)}
    # x2: FL +2.0 over CE, but the CIs [49, 51] and [47, 49] touch; x4: CE ahead
    assert across[over_ce.finding].text() == "no at x2, x4; yes at x1"
    assert across[over_alpha.finding].text() == "yes at x1, x2, x4"
    # the other follow-ups have no budget reports
    assert all(a.holds is None for f, a in across.items() if "Budget curves" not in f)
    # the Markdown table gets the column, its separator row one cell per column
    table = findings.markdown(verdicts, findings.FOLLOW_UP_HEADER, over_budgets).splitlines()
    assert table[0].endswith("| at every budget |") and table[1] == "|:---|:---|:---|:---|:---|"
    assert all(line.count("|") == 6 for line in table if line.startswith("|"))
    assert table[2].endswith("| no budget measured |")
    assert next(line for line in table if "beats CE" in line).endswith("| yes | no at x2, x4; yes at x1 |")


# ----------------------------------------------------------------------------- cells by config values


def test_a_renamed_cell_keeps_its_verdict(reports):
    """Checks find cells by config values: relabelling every cell changes no verdict, only the names shown."""
    before = findings.judge_reports(reports)
    for results in reports.glob("*/results.csv"):
        frame = pd.read_csv(results)
        frame["cell"] = [f"renamed {i}" for i in range(len(frame))]
        frame.to_csv(results, index=False)
    after = findings.judge_reports(reports)
    assert [v.holds for v in after] == [v.holds for v in before]
    assert all(v.holds is not None for v in after) and "renamed" in after[0].ours


def test_a_cell_no_row_has_is_not_measured_with_the_values(reports):
    write(reports, "gamma-sweep", [gamma(g, ap, ci=1.0) for g, ap in ((0.0, 27.0), (1.0, 29.0), (5.0, 20.0))])
    write(reports, "anchors", [{"cell": "nine", "model.num_scales": 3, "AP": 31.0, "ci": 1.0}])  # no ratios column
    by_rule = {v.finding: v for v in findings.judge_reports(reports)}
    fl = next(v for f, v in by_rule.items() if "best alpha-CE" in f)
    assert fl.holds is None
    assert fl.ours.startswith("not measured: no cell with loss.cls=focal, loss.gamma=2, loss.alpha=0.25 in ")
    assert "gamma-sweep/results.csv" in fl.ours
    anchors = next(v for f, v in by_rule.items() if "3 scales" in f)
    assert anchors.holds is None and "no column 'model.aspect_ratios'" in anchors.ours


def test_a_cell_several_rows_have_is_an_error(reports):
    write(reports, "gamma-sweep", [gamma(2.0, 31.0, ci=1.0), gamma(2.0, 30.0, ci=1.0, cell="g=2 again"),
                                   gamma(0.0, 27.0, ci=1.0), gamma(5.0, 20.0, ci=1.0)])
    with pytest.raises(AblateError, match=r"gamma-sweep: 2 cells have loss.cls=focal, loss.gamma=2, loss.alpha=0.25"):
        findings.judge_reports(reports)
    result = CliRunner().invoke(app, ["findings", "--reports", str(reports)])
    assert result.exit_code == 1 and "Traceback" not in result.output and "g=2 again" in result.output


def test_config_equal_reads_fields_as_results_csv_writes_them():
    nan = float("nan")
    assert findings.config_equal(nan, None) and not findings.config_equal(0.01, None)
    assert findings.config_equal(0.01, 0.01) and not findings.config_equal(nan, 0.01)
    assert findings.config_equal(3, 3) and findings.config_equal(3.0, 3) and not findings.config_equal(3, 1)
    assert findings.config_equal(0.1 + 0.2, 0.3)  # the text round trip of a float
    assert findings.config_equal("[0.5, 1.0, 2.0]", [0.5, 1.0, 2.0]) and findings.config_equal("[1.0]", [1])
    assert not findings.config_equal("[1.0]", [0.5, 1.0, 2.0]) and not findings.config_equal(nan, [1.0])
    assert findings.config_equal("['person', 'car']", ["person", "car"])
    assert findings.config_equal("focal", "focal") and not findings.config_equal("focal_star", "focal")
    assert findings.config_equal(True, True) and not findings.config_equal(False, True)
    assert not findings.config_equal("tiny", 50)


# ----------------------------------------------------------------------------- one verdict per finding


def test_the_largest_experiment_supersedes_the_others_and_links_them(reports, tmp_path):
    """FL vs alpha-CE (0.9) in the 3-seed sweep (yes), a 5-seed follow-up (yes) and an 8-seed
    until-settled run (no): `ablate findings` states the 8-seed verdict and marks the others
    superseded, each linking the other."""
    write(reports, "focal-vs-alpha-ce", [gamma(2.0, 31.0, ci=1.0, n=5, n_runs=5), alpha_ce(0.9, 27.0, ci=1.0, n=5, n_runs=5)])
    write(reports, "until-settled/focal-vs-alpha-ce", [gamma(2.0, 30.0, ci=1.5, n=8, n_runs=8, n_collapsed=0),
                                                       alpha_ce(0.9, 24.0, ci=6.5, n=8, n_runs=8, n_collapsed=1)])
    write(reports, "alpha-ce", [alpha_ce(0.9, 27.0, ci=1.0)])  # the sweep's best alpha-CE is 0.9 here
    verdicts, follow_ups = findings.judge_reports(reports), findings.judge_reports(reports, findings.FOLLOW_UPS)
    standing = findings.supersede(verdicts + follow_ups)
    group = [v for v in verdicts + follow_ups if v.comparison == findings.FL_VS_ALPHA_CE]
    current = [v for v in group if v.superseded_by is None and v.holds is not None]
    assert len(current) == 1 and current[0].seeds == 8 and current[0].holds is False  # CIs overlap
    assert "mean-based, resting on collapsed seeds: a=0.9 1" in current[0].ours
    three = next(v for v in verdicts if "beats the best alpha-CE" in v.finding)
    assert three.holds is True and three.superseded_by is current[0] and three not in standing
    text = findings.holds_text(three)
    assert text.startswith("superseded by 8 seeds, [until-settled/focal-vs-alpha-ce]") and "(was yes)" in text
    assert "supersedes 3 seeds, [gamma-sweep](gamma-sweep/README.md): yes" in findings.holds_text(current[0])
    # The CLI writes the same into findings.md.
    result = CliRunner().invoke(app, ["findings", "--reports", str(reports)])
    assert result.exit_code == 0, result.output
    written = (reports / "findings.md").read_text()
    assert written.count("superseded by 8 seeds") == 2 and "| **no** (8 seeds," in written


def test_a_tie_in_seeds_goes_to_the_later_experiment():
    a = findings.FindingVerdict("a", "", "", True, "c", 3, "x")
    b = findings.FindingVerdict("b", "", "", False, "c", 3, "y")
    unmeasured = findings.FindingVerdict("u", "", "", None, "c", 0, "")
    assert findings.supersede([a, unmeasured, b]) == [unmeasured, b] and a.superseded_by is b
