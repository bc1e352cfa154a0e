"""The run contract: planned runs from an experiment file, their JSON round trip, outcomes."""

from __future__ import annotations

import pytest

from ablate.config import config_hash
from ablate.experiments import load_experiment
from ablate.runs import DONE, Outcome, PlannedRun, RunRecord, runs_frame


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


def test_run_record_value_is_the_ap_of_a_finished_run_only():
    assert RunRecord(Outcome.FINISHED, {"AP": 0.31}).value == 0.31
    assert RunRecord(Outcome.DIVERGED, {"AP": 0.0}).value is None
    assert RunRecord(Outcome.FAILED, error="boom").value is None


def test_summary_json_holds_the_training_side_of_the_record():
    finished = RunRecord(Outcome.FINISHED, {"AP": 0.31}, iterations=12, train_seconds=3.5, run_dir="runs/a",
                         anchors={"bg_per_fg": 900.0}, eval_seconds=0.5, phase_seconds={"train": 3.5},
                         run_id="not-training's", cell="focal")
    summary = finished.summary_json()
    assert list(summary) == ["status", "iterations", "diverged_at", "train_seconds", "resumed_from", "processes",
                             "config_hash", "run_dir", "data", "anchors", "metrics", "eval_seconds", "phase_seconds"]
    assert summary["status"] == "finished" and type(summary["status"]) is str and summary["metrics"] == {"AP": 0.31}
    interrupted = RunRecord(Outcome.INTERRUPTED, iterations=4, resume_checkpoint="ck/resume.pt").summary_json()
    assert interrupted["resume_checkpoint"] == "ck/resume.pt" and "metrics" not in interrupted


def test_runs_frame_has_one_row_per_record_params_then_metrics():
    records = [RunRecord(Outcome.FINISHED, {"AP": 0.3, "loss": 0.9}, run_id="a", cell="focal", seed=0,
                         params={"loss.gamma": 2.0, "loss": "a param the metric overrides"}),
               RunRecord(Outcome.DIVERGED, run_id="b", cell="ce", seed=1, params={"loss.gamma": 0.0})]
    frame = runs_frame(records)
    assert list(frame.columns[:11]) == ["run_id", "run_name", "status", "start_time", "cell", "cell_index", "seed",
                                        "outcome", "config_hash", "run_dir", "parent_run_id"]
    assert frame["outcome"].tolist() == ["finished", "diverged"] and frame["loss.gamma"].tolist() == [2.0, 0.0]
    assert frame.loc[0, "loss"] == 0.9  # a metric wins over a param of its name, as MLflow's run view shows
    assert frame.loc[1, "AP"] != frame.loc[1, "AP"]  # NaN: no AP for the diverged run


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


def test_check_at_least_names_the_option():
    from ablate.errors import AblateError, check_at_least

    check_at_least(None, 1, "--jobs")  # not given
    check_at_least(1, 1, "--jobs")
    with pytest.raises(AblateError, match=r"^--gpus-per-cell: must be >= 1, got 0$"):
        check_at_least(0, 1, "--gpus-per-cell")
