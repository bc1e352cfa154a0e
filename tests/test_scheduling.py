"""The queue: planned runs as enqueued Optuna trials, pulled and closed from their results."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from ablate import scheduling
from ablate.experiments import load_experiment
from ablate.runs import Outcome, PlannedRun, RunResult


@pytest.fixture
def study(tmp_path):
    return scheduling.grid_study("smoke", scheduling.storage(tmp_path / "q.journal"))


def test_trial_params_keep_numbers_only():
    assert scheduling.trial_params({"seed": 0, "loss.gamma": 2.0, "loss.cls": "focal", "flag": True,
                                    "model.prior": None, "ratios": [1.0]}) == {"seed": 0, "loss.gamma": 2.0}


def test_enqueued_runs_come_back_in_order_and_trials_close_by_outcome(study):
    runs = load_experiment("gamma-sweep").planned_runs([0])[:3]
    scheduling.enqueue(study, runs)
    results = iter([RunResult(Outcome.FINISHED, {"AP": 0.25}), RunResult(Outcome.DIVERGED), None])
    seen: list[PlannedRun] = []

    def run(planned: PlannedRun):
        seen.append(planned)
        return next(results)

    assert scheduling.work_grid(study, 10, run) == 3  # stops at the first trial nobody enqueued
    assert seen == runs
    trials = study.get_trials()
    assert [t.state for t in trials[:3]] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    assert [t.user_attrs["outcome"] for t in trials] == ["finished", "diverged", "skipped", "unused"]
    assert trials[0].value == 0.25 and trials[0].params == {"seed": 0, "loss.gamma": 0.0, "loss.alpha": 0.75}


def test_an_exception_fails_the_trial_as_interrupted_and_propagates(study):
    scheduling.enqueue(study, load_experiment("smoke").planned_runs([0])[:1])

    def run(planned):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scheduling.work_grid(study, 1, run)
    (trial,) = study.get_trials()
    assert trial.state == TrialState.FAIL and trial.user_attrs["outcome"] == "interrupted"


def test_reset_queue_fails_running_and_drops_waiting_trials(study):
    runs = load_experiment("smoke").planned_runs([0, 1])
    scheduling.enqueue(study, runs)
    study.ask()  # a worker that pulled one and died
    assert scheduling.reset_queue(study) == 4
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))


def test_search_trials_close_as_complete_pruned_or_failed(tmp_path):
    study = scheduling.search_study("s", scheduling.storage(tmp_path / "s.journal"), "maximize", 0, 0)
    results = iter([RunResult(Outcome.FINISHED, {"AP": 0.1}), RunResult(Outcome.PRUNED), RunResult(Outcome.FAILED)])
    drawn = []

    def run_trial(number, overrides, report):
        drawn.append(overrides["loss.gamma"])
        assert report(1, 0.05) is False  # no pruning before the pruner's startup trials
        return next(results)

    scheduling.work_search(study, 3, {"loss.gamma": {"low": 0.0, "high": 5.0}}, run_trial)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert all(0.0 <= g <= 5.0 for g in drawn)
    assert scheduling.best_trial(study) == ({"loss.gamma": drawn[0]}, 0.1)
