"""The queue: planned runs as enqueued Optuna trials, pulled and closed from their results."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState

from ablate import lease, scheduling
from ablate.errors import AblateError
from ablate.experiments import load_experiment
from ablate.runs import Outcome, PlannedRun, RunRecord


@pytest.fixture
def study(tmp_path):
    return scheduling.grid_study("smoke", scheduling.storage(tmp_path / "q.journal"))


def test_trial_params_keep_numbers_only():
    assert scheduling.trial_params({"seed": 0, "loss.gamma": 2.0, "loss.cls": "focal", "flag": True,
                                    "model.prior": None, "ratios": [1.0]}) == {"seed": 0, "loss.gamma": 2.0}


def test_enqueued_runs_come_back_in_order_and_trials_close_by_outcome(study):
    runs = load_experiment("gamma-sweep").planned_runs([0])[:3]
    scheduling.enqueue(study, runs)
    results = iter([RunRecord(Outcome.FINISHED, {"AP": 0.25}), RunRecord(Outcome.DIVERGED), None])
    seen: list[PlannedRun] = []

    def run(planned: PlannedRun):
        seen.append(planned)
        return next(results)

    assert scheduling.work_grid(study, 10, run) == 3  # stops when nothing waits or runs
    assert seen == runs
    trials = study.get_trials()
    assert [t.state for t in trials[:3]] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    assert [t.user_attrs["outcome"] for t in trials] == ["finished", "diverged", "skipped (done elsewhere)"]
    assert trials[0].value == 0.25 and trials[0].params == {"seed": 0, "loss.gamma": 0.0, "loss.alpha": 0.75}


def test_an_interrupted_run_fails_its_trial_and_goes_back_into_the_queue(study):
    (planned,) = load_experiment("smoke").planned_runs([0])[:1]
    scheduling.enqueue(study, [planned])

    def run(planned):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scheduling.work_grid(study, 1, run)
    trial, again = study.get_trials()
    assert trial.state == TrialState.FAIL and trial.user_attrs["outcome"] == "interrupted"
    assert again.state == TrialState.WAITING and PlannedRun.from_json(again.user_attrs["ablate_planned_run"]) == planned
    # A run that ends interrupted (SIGTERM: checkpoint written) goes back the same way.
    scheduling.work_grid(study, 1, lambda p: RunRecord(Outcome.INTERRUPTED))
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING]


def test_a_stopped_worker_pulls_nothing_more(study):
    scheduling.enqueue(study, load_experiment("smoke").planned_runs([0]))
    assert scheduling.work_grid(study, None, lambda p: RunRecord(Outcome.FINISHED, {"AP": 0.1}), stop=lambda: True) == 0


def test_a_worker_waits_for_running_trials_and_takes_a_dead_worker_s_run(study, monkeypatch):
    """A trial RUNNING under a process that is gone comes back to the queue (the journal checks
    the owner's pid; PostgreSQL, heartbeats) and a waiting worker runs it."""
    (planned,) = load_experiment("smoke").planned_runs([0])[:1]
    scheduling.enqueue(study, [planned])
    dead = study.ask()
    dead.set_user_attr(scheduling.OWNER_ATTR, "this-host-is-gone:1:1.00")
    monkeypatch.setattr(lease, "owner_alive", lambda owner: not owner.startswith("this-host-is-gone"))
    ran = []
    assert scheduling.work_grid(study, None, lambda p: ran.append(p) or RunRecord(Outcome.FINISHED, {"AP": 0.2})) == 1
    assert ran == [planned]
    states = [(t.state, t.user_attrs.get("outcome")) for t in study.get_trials()]
    assert states == [(TrialState.FAIL, "worker gone"), (TrialState.COMPLETE, "finished")]


def test_reset_queue_fails_running_and_drops_waiting_trials(study):
    runs = load_experiment("smoke").planned_runs([0, 1])
    scheduling.enqueue(study, runs)
    study.ask()  # a worker that pulled one and died
    assert scheduling.reset_queue(study) == 4
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))


def test_search_trials_close_as_complete_pruned_or_failed(tmp_path):
    study = scheduling.search_study("s", scheduling.storage(tmp_path / "s.journal"), "maximize", 0, 0)
    results = iter([RunRecord(Outcome.FINISHED, {"AP": 0.1}), RunRecord(Outcome.PRUNED), RunRecord(Outcome.FAILED)])
    drawn = []

    def run_trial(number, overrides, report):
        drawn.append(overrides["loss.gamma"])
        assert report(1, 0.05) is False  # no pruning before the pruner's startup trials
        return next(results)

    scheduling.work_search(study, 3, {"loss.gamma": {"low": 0.0, "high": 5.0}}, run_trial)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert all(0.0 <= g <= 5.0 for g in drawn)
    assert scheduling.best_trial(study) == ({"loss.gamma": drawn[0]}, 0.1)


def test_a_postgresql_queue_is_connected_with_a_10_s_budget(monkeypatch):
    """The queue server's wait is the driver's connect timeout, set in the code (a stopwatch in a
    test would break on a busy machine)."""
    seen = []

    def refuse(url, engine_kwargs, **_):
        seen.append(engine_kwargs)
        raise OSError("connection refused")

    monkeypatch.setattr(scheduling, "RDBStorage", refuse)
    with pytest.raises(AblateError, match=r"--storage postgresql://u:\*\*\*@127\.0\.0\.1:9/q"):
        scheduling.storage("postgresql://u:secret@127.0.0.1:9/q")
    assert seen and all(kw == {"connect_args": {"connect_timeout": 10}} for kw in seen)
