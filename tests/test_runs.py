"""The run contract: planned runs from an experiment file, their JSON round trip, outcomes."""

from __future__ import annotations

import pytest

from ablate.config import config_hash
from ablate.experiments import load_experiment
from ablate.runs import DONE, Outcome, PlannedRun, RunResult


def test_outcome_is_a_string_and_done_means_finished_or_diverged():
    assert Outcome("finished") is Outcome.FINISHED and Outcome.DIVERGED == "diverged"
    assert {o for o in Outcome if o.is_done} == DONE == {Outcome.FINISHED, Outcome.DIVERGED}
    with pytest.raises(ValueError):
        Outcome("finishd")
    # What the queue and the workers count besides a run's end are members too, never free strings.
    assert {str(o) for o in Outcome if o not in DONE} >= {"skipped (done elsewhere)", "worker crashed",
                                                         "worker gone", "superseded", "unused"}


def test_planned_runs_are_every_cell_by_seed_resolved():
    exp = load_experiment("smoke")  # loss.cls in [focal, alpha_ce]
    runs = exp.planned_runs([0, 3], {"train.iterations": 5})
    assert [(r.cell, r.seed) for r in runs] == [("focal", 0), ("focal", 3), ("alpha_ce", 0), ("alpha_ce", 3)]
    first = runs[1]
    assert first.experiment == "smoke" and first.cell_index == 0
    assert first.config["train.seed"] == 3 and first.config["train.iterations"] == 5
    assert first.config["synth.num_train"] == 64  # the file's [config] is resolved in
    assert first.overrides == {"train.iterations": 5}
    assert first.values == {"seed": 3, "loss.cls": "focal"}
    assert first.config_hash == config_hash(first.build_config())
    assert len({r.config_hash for r in runs}) == 4


def test_planned_run_round_trips_through_json_and_rebuilds_the_same_config():
    (run, *_) = load_experiment("gamma-sweep").planned_runs([1])
    again = PlannedRun.from_json(run.to_json())
    assert again == run
    assert config_hash(again.build_config()) == run.config_hash
    assert again.name == "focal g=0 a=0.75 s1"  # the loss leads when the cell name lacks it


def test_planned_run_rejects_unknown_fields_and_bad_config():
    (run, *_) = load_experiment("smoke").planned_runs([0])
    with pytest.raises(ValueError, match="unknown fields"):
        PlannedRun.from_json(run.to_json()[:-1] + ', "extra": 1}')
    broken = PlannedRun(**{**run.__dict__, "config": {**run.config, "loss.gamma": "high"}})
    with pytest.raises(Exception, match="loss.gamma"):
        broken.build_config()


def test_run_result_value_is_the_ap_of_a_finished_run_only():
    assert RunResult(Outcome.FINISHED, {"AP": 0.31}).value == 0.31
    assert RunResult(Outcome.DIVERGED, {"AP": 0.0}).value is None
    assert RunResult(Outcome.FAILED, error="boom").value is None


def test_the_planned_hash_is_the_hash_the_committed_reports_recorded():
    """The experiment files and config defaults still plan the runs behind the committed report."""
    import csv
    from pathlib import Path

    rows = list(csv.DictReader(open(Path(__file__).resolve().parent.parent / "reports/gamma-sweep/runs.csv")))
    planned = {(r.cell, r.seed): r.config_hash for r in load_experiment("gamma-sweep").planned_runs([0, 1, 2])}
    assert {(row["cell"], int(row["seed"])): row["config_hash"] for row in rows} == planned


def test_preset_makes_a_new_experiment_and_leaves_the_file_s_alone():
    exp = load_experiment("smoke")
    other = exp.with_preset("paper")
    assert exp.preset == "tiny" and other.preset == "paper"
    assert other.planned_runs([0])[0].config["model.trunk"] == "resnet50"
    with pytest.raises(Exception, match="unknown preset 'huge'"):
        exp.with_preset("huge")
