"""Adaptive seeds and budget curves: the experiment file's comparisons and [sequential] table, the
seed-adding loop against a fake tracking store, the budget runs, findings across budgets (the
report's sections: test_report_adaptive.py), and `ablate run --until-settled` / `--budgets` end to end on `smoke`."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ablate import adaptive, rounds
from ablate.errors import AblateError, ConfigError
from ablate.experiments import load_experiment
from ablate.sequential import SequentialRule, State

SMOKE = Path(__file__).resolve().parent.parent / "experiments" / "smoke.toml"


def write_experiment(tmp_path: Path, tail: str, name: str = "pairs") -> Path:
    """smoke.toml's first lines (preset, seeds, baseline) with three loss cells and `tail`."""
    path = tmp_path / f"{name}.toml"
    path.write_text('preset = "tiny"\nseeds = [0]\nbaseline = "focal"\n' + tail
                    + '\n[grid]\n"loss.cls" = ["focal", "alpha_ce", "ce"]\n')
    return path


# ----------------------------------------------------------------------------- the experiment file


def test_comparisons_and_rule_default_to_each_cell_against_the_baseline():
    exp = load_experiment(str(SMOKE))
    assert adaptive.comparisons_of(exp) == [("alpha_ce", "focal")]
    assert adaptive.rule_of(exp) == SequentialRule()
    assert adaptive.rule_of(exp, max_seeds=4).max_seeds == 4


def test_comparisons_and_sequential_table_are_read(tmp_path: Path):
    path = write_experiment(tmp_path, 'comparisons = [["ce", "alpha_ce"]]\n[sequential]\nalpha = 0.1\nmax_seeds = 6\n')
    exp = load_experiment(str(path))
    assert adaptive.comparisons_of(exp) == [("ce", "alpha_ce")]
    assert adaptive.rule_of(exp) == SequentialRule(alpha=0.1, max_seeds=6)


@pytest.mark.parametrize("tail, needles", [
    ('comparisons = [["ce", "nope"]]\n', ["comparisons[0]", "'nope'", "cells: focal, alpha_ce, ce"]),
    ('comparisons = [["ce", "ce"]]\n', ["comparisons[0]", "itself"]),
    ('comparisons = [["ce"]]\n', ["comparisons[0]", "pair"]),
    ('[sequential]\nmin_seeds = 1\n', ["[sequential]", "min_seeds"]),
    ('[sequential]\nalpha = "low"\n', ["sequential.alpha", "a number"]),
    ('[sequential]\nlooks = 3\n', ["sequential.looks"]),
    ('[sequential]\ntest = "wilcoxon"\n', ["[sequential]", "wilcoxon", "signed_rank"]),
    ('[sequential]\nfamily = "bonferroni"\n', ["[sequential]", "bonferroni", "holm"]),
    ('[sequential]\ncurtail = "yes"\n', ["sequential.curtail", "true or false"]),
])
def test_bad_comparisons_or_rule_name_file_and_field(tmp_path: Path, tail: str, needles: list[str]):
    with pytest.raises(ConfigError) as err:
        load_experiment(str(write_experiment(tmp_path, tail)))
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    for needle in needles:
        assert needle in str(err.value)


def test_test_and_family_come_from_the_file_or_the_flags(tmp_path: Path):
    exp = load_experiment(str(write_experiment(tmp_path, '[sequential]\ntest = "signed_rank"\ncurtail = false\n')))
    assert adaptive.rule_of(exp) == SequentialRule(test="signed_rank", curtail=False)
    smoke = load_experiment(str(SMOKE))
    assert adaptive.rule_of(smoke, test="signed-rank", family=True) == SequentialRule(test="signed_rank", family="holm")
    with pytest.raises(AblateError) as err:
        adaptive.rule_of(smoke, test="median")
    assert "test 'median'" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("flag", [["--family"], ["--test", "signed-rank"]])
def test_rule_flags_without_until_settled_are_one_line(flag: list[str]):
    result = invoke("run", "smoke", *flag)
    assert result.exit_code == 1 and "Traceback" not in result.output and f"{flag[0]} goes with --until-settled" in result.output


def test_run_mode_checks_its_flags_together_first_bad_one_named():
    smoke = load_experiment(str(SMOKE))
    assert adaptive.RunMode().check(smoke) is None
    assert list(adaptive.RunMode(budgets="1,2").check(smoke)) == [1.0, 2.0]
    assert adaptive.RunMode(until_settled=True, max_seeds=6, test="signed-rank").check(smoke) is None
    for mode, needle in ((adaptive.RunMode(max_seeds=4), "--max-seeds goes with --until-settled"),
                         (adaptive.RunMode(until_settled=True, force=True), "does not combine with --force"),
                         (adaptive.RunMode(until_settled=True, budgets="1,2"), "does not combine with --budgets"),
                         (adaptive.RunMode(until_settled=True, max_seeds=2), "--max-seeds 2")):
        with pytest.raises(AblateError, match=needle):
            mode.check(smoke)


def test_max_seeds_below_the_first_look_is_one_line():
    with pytest.raises(AblateError) as err:
        adaptive.rule_of(load_experiment(str(SMOKE)), max_seeds=2)
    assert "--max-seeds 2" in str(err.value) and "min_seeds" in str(err.value)


# ----------------------------------------------------------------------------- the loop on a fake store


class FakeStore:
    """A faithful fake of the tracked runs: rows as runs_frame(Tracker.load_runs()) makes them (cell, seed,
    config hash of the planned run, outcome, AP as a fraction), filled by run_round."""

    def __init__(self, exp, means: dict[str, float], sd: float = 1.0, diverge: set | None = None):
        self.exp, self.means, self.sd, self.diverge = exp, means, sd, diverge or set()
        self.rows: list[dict] = []
        self.rounds: list[dict[str, list[int]]] = []

    def ap(self, cell: str, seed: int) -> float:
        """AP in points: the cell's mean plus noise fixed by (cell, seed)."""
        rng = np.random.default_rng([seed, sum(map(ord, cell))])
        return self.means[cell] + self.sd * float(rng.standard_normal())

    def run_round(self, todo: dict[str, list[int]]) -> Counter:
        self.rounds.append(todo)
        outcomes = Counter()
        for cell, seeds in todo.items():
            for planned in self.exp.planned_runs(seeds):
                if planned.cell != cell:
                    continue
                diverged = (cell, planned.seed) in self.diverge
                outcome = "diverged" if diverged else "finished"
                self.rows.append({"run_id": f"r{len(self.rows)}", "cell": cell, "seed": planned.seed,
                                  "config_hash": planned.config_hash, "outcome": outcome,
                                  "start_time": len(self.rows),
                                  "AP": math.nan if diverged else self.ap(cell, planned.seed) / 100})
                outcomes[outcome] += 1
        return outcomes

    def load_runs(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def runs_of(self) -> list[tuple[str, int]]:
        return sorted((r["cell"], r["seed"]) for r in self.rows)


def settle(store: FakeStore, rule: SequentialRule, run_round=None):
    exp = store.exp
    return rounds.settle(exp, {}, rule, adaptive.comparisons_of(exp), adaptive.seed_pool(exp.seeds, rule),
                           run_round or store.run_round, store.load_runs)


@pytest.fixture(scope="module")
def smoke():
    return load_experiment(str(SMOKE))


def test_a_clear_difference_settles_at_the_first_look(smoke):
    store = FakeStore(smoke, {"focal": 30.0, "alpha_ce": 20.0}, sd=0.5)
    result = settle(store, SequentialRule(max_seeds=4))
    verdict = result.verdicts[("alpha_ce", "focal")]
    assert verdict.state is State.AGAINST and verdict.n == 3 and result.stopped == "settled"
    assert store.rounds == [{"alpha_ce": [0, 1, 2], "focal": [0, 1, 2]}]
    assert result.outcomes == Counter(finished=6)


def test_no_difference_adds_one_seed_per_look_up_to_max_seeds(smoke):
    store = FakeStore(smoke, {"focal": 25.0, "alpha_ce": 25.0})
    result = settle(store, SequentialRule(max_seeds=5, curtail=False))
    verdict = result.verdicts[("alpha_ce", "focal")]
    assert verdict.state is State.OPEN and verdict.at_max and verdict.n == 5 and result.stopped == "max seeds"
    assert [sorted(r["focal"]) for r in store.rounds] == [[0, 1, 2], [3], [4]]
    assert store.runs_of() == sorted((c, s) for c in ("focal", "alpha_ce") for s in range(5))


def test_a_comparison_that_cannot_settle_stops_drawing_seeds(smoke):
    store = FakeStore(smoke, {"focal": 25.0, "alpha_ce": 25.0})
    result = settle(store, SequentialRule(max_seeds=5))  # curtailment on (the default)
    verdict = result.verdicts[("alpha_ce", "focal")]
    assert verdict.curtailed and not verdict.needs_seed and result.stopped == "max seeds or cannot settle"
    assert [sorted(r["focal"]) for r in store.rounds] == [[0, 1, 2]][: len(store.rounds)]
    assert len(store.runs_of()) < 10  # fewer than the 5 seeds x 2 cells without curtailment


def test_only_open_comparisons_get_seeds_and_a_shared_baseline_runs_a_seed_once(tmp_path: Path):
    exp = load_experiment(str(write_experiment(tmp_path, "")))  # ce vs focal and alpha_ce vs focal
    store = FakeStore(exp, {"focal": 30.0, "alpha_ce": 30.0, "ce": 10.0})
    result = settle(store, SequentialRule(max_seeds=4, curtail=False))
    assert result.verdicts[("ce", "focal")].state is State.AGAINST
    assert result.verdicts[("alpha_ce", "focal")].at_max
    assert store.rounds[1] == {"alpha_ce": [3], "focal": [3]}  # ce settled at 3: no seed 3 for it
    assert len(store.runs_of()) == len(set(store.runs_of()))


def test_a_diverged_seed_is_replaced_by_the_next(smoke):
    store = FakeStore(smoke, {"focal": 30.0, "alpha_ce": 20.0}, diverge={("alpha_ce", 1)})
    result = settle(store, SequentialRule(max_seeds=4))
    assert result.verdicts[("alpha_ce", "focal")].state is State.AGAINST
    assert store.rounds[1] == {"alpha_ce": [3], "focal": [3]}


def test_stopped_loop_resumes_from_the_store_without_rerunning(smoke):
    uninterrupted = FakeStore(smoke, {"focal": 25.0, "alpha_ce": 25.0})
    settle(uninterrupted, SequentialRule(max_seeds=5, curtail=False))
    store = FakeStore(smoke, {"focal": 25.0, "alpha_ce": 25.0})

    def first_round_then_interrupt(todo):  # the first round's runs, then a Ctrl-C in the second
        return store.run_round(todo) if not store.rounds else Counter(interrupted=1)

    stopped = settle(store, SequentialRule(max_seeds=5, curtail=False), first_round_then_interrupt)
    assert stopped.stopped == "interrupted" and len(store.runs_of()) == 6
    resumed = settle(store, SequentialRule(max_seeds=5, curtail=False))
    assert resumed.stopped == "max seeds" and store.runs_of() == uninterrupted.runs_of()


def test_rule_and_comparisons_round_trip_through_the_parent_tags(smoke):
    rule = SequentialRule(max_seeds=4)
    tags = adaptive.rule_tags(rule, [("alpha_ce", "focal")])
    assert adaptive.recorded_rule(smoke, [{"other": "x"}, tags]) == (rule, [("alpha_ce", "focal")])
    assert adaptive.recorded_rule(smoke, []) is None


# ----------------------------------------------------------------------------- budgets


def test_budget_groups_scale_each_schedule_and_leave_budget_one_alone(tmp_path: Path):
    path = write_experiment(tmp_path, "", name="budgets")
    text = path.read_text().replace('baseline = "focal"', 'baseline = "short focal"')
    path.write_text(text + '\n[[variants]]\nname = "long"\ntrain.iterations = 1600\n\n[[variants]]\nname = "short"\n')
    exp = load_experiment(str(path))
    assert adaptive.budget_groups(exp, {}, 1) == [({}, [c.name for c in exp.cells()])]
    groups = adaptive.budget_groups(exp, {}, 2)
    assert [g[0] for g in groups] == [{"train.iterations": 3200}, {"train.iterations": 1600}]
    assert all(len(cells) == 3 for _, cells in groups)


def test_run_budgets_runs_each_budget_with_its_tags_and_stops_on_a_failure(smoke):
    calls = []

    def run_group(overrides, cells, tags):
        calls.append((overrides, cells, tags))
        return Counter(failed=1) if overrides.get("train.iterations") == 48 else Counter(finished=2)

    outcomes = rounds.run_budgets(smoke, {"loss.gamma": 1.0}, (1.0, 2.0, 4.0, 8.0), run_group)
    assert [c[0] for c in calls] == [{"loss.gamma": 1.0}, {"loss.gamma": 1.0, "train.iterations": 24},
                                     {"loss.gamma": 1.0, "train.iterations": 48}]
    assert calls[1][2] == {adaptive.BUDGETS_TAG: "1,2,4,8", adaptive.BUDGET_TAG: "2"}
    assert outcomes == Counter(finished=4, failed=1)
    assert adaptive.recorded_budgets([c[2] for c in calls] + [{"x": "y"}]) == [1.0, 2.0, 4.0, 8.0]


def test_a_budget_shorter_than_the_warm_up_is_refused_before_any_run(smoke):
    with pytest.raises(ConfigError, match="warm-up"):
        rounds.run_budgets(smoke, {}, (1.0, 0.25), lambda *a: pytest.fail("ran"))


# ----------------------------------------------------------------------------- findings across budgets


def test_findings_hold_at_every_budget_measured(tmp_path: Path):
    from ablate.findings import across_budgets, measured_budgets

    for budget, ap in ((1, 0.30), (2, 0.35), (4, 0.10)):
        folder = tmp_path / "e" / "budgets" / f"x{budget}"
        folder.mkdir(parents=True)
        pd.DataFrame({"cell": ["c"], "AP_mean": [ap], "AP_std": [0.01], "AP_ci95": [0.02], "n": [3]}).to_csv(
            folder / "results.csv", index=False)
    check = ("AP above 20", "", lambda r: ("", r.cells("e")[0].mean > 20))
    unmeasured = ("needs another report", "", lambda r: ("", r.cells("f")[0].mean > 20))
    assert measured_budgets(tmp_path) == [1.0, 2.0, 4.0]
    holds, missing = across_budgets(tmp_path, (check, unmeasured))
    assert holds.holds is False and holds.per_budget == {1.0: True, 2.0: True, 4.0: False}
    assert holds.text() == "no at x4; yes at x1, x2"
    assert missing.holds is None


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    import os

    path = tmp_path_factory.mktemp("adaptive")
    old, uri = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(path)
    yield path
    os.chdir(old)
    # mlflow.set_tracking_uri (in the commands run here) exports the URI: later tests' subprocesses
    # would otherwise write to this module's store.
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if uri is not None:
        os.environ["MLFLOW_TRACKING_URI"] = uri


def invoke(*args: str):
    from cli import app

    saved, sys.argv = sys.argv, ["ablate", *args]
    try:
        return CliRunner().invoke(app, list(args), catch_exceptions=False)
    finally:
        sys.argv = saved


@pytest.mark.slow
def test_until_settled_and_budgets_end_to_end(workdir: Path):
    """One store for both (one report, the slow part, for both sections): the adaptive loop stops
    and is recorded; the budget runs reuse its x1 runs; the report has both sections."""
    settle_args = ("run", "smoke", "--until-settled", "--max-seeds", "4", "--set", "train.iterations=4",
                   "--no-progress")
    result = invoke(*settle_args)
    assert result.exit_code == 0, result.output
    assert "stopped after" in result.output
    again = invoke(*settle_args)  # nothing open needs a seed any more: nothing runs
    assert again.exit_code == 0 and "stopped after 0 round(s)" in again.output, again.output
    budgets = invoke("run", "smoke", "--budgets", "1,2", "--set", "train.iterations=4", "--no-progress")
    assert budgets.exit_code == 0, budgets.output
    assert "2 already done, 0 to run" in budgets.output  # x1 is the runs the loop made
    report = invoke("report", "smoke", "--set", "train.iterations=4")
    assert report.exit_code == 0, report.output
    out = workdir / "reports" / "smoke"
    table = pd.read_csv(out / "sequential.csv")
    assert list(table["cell"]) == ["alpha_ce"] and list(table["comparator"]) == ["focal"]
    verdict = table.iloc[0]
    assert verdict["verdict"] in ("settled for", "settled against", "open at max seeds", "open, cannot settle")
    assert 3 <= verdict["n"] <= verdict["seeds_run"] <= 4
    recorded = json.loads((out / "sequential.json").read_text())
    assert recorded["rule"]["max_seeds"] == 4 and recorded["comparisons"] == [["alpha_ce", "focal"]]
    assert (out / "ap_vs_budget.png").is_file() and (out / "budgets" / "order_changes.csv").is_file()
    by_budget = pd.read_csv(out / "budgets" / "results.csv")
    assert sorted(set(by_budget["budget"])) == [1.0, 2.0]
    assert set(by_budget[by_budget["budget"] == 2.0]["train.iterations"]) == {8}
    readme = (out / "README.md").read_text()
    assert "## Adaptive seeds" in readme and "## Budget curves" in readme and "](ap_vs_budget.png)" in readme
    assert "Error controlled: per comparison, alpha 0.05" in readme and "Collapsed seeds (" in readme
    family = invoke("report", "smoke", "--set", "train.iterations=4", "--family")  # the same runs as a family
    assert family.exit_code == 0, family.output
    assert "family-wise (Holm), alpha 0.05" in (out / "README.md").read_text()


def test_until_settled_with_budgets_is_one_line():
    result = invoke("run", "smoke", "--until-settled", "--budgets", "1,2")
    assert result.exit_code == 1 and "Traceback" not in result.output and "--budgets" in result.output
