"""The tracking store as the one answer to 'is this cell done': claims, owners, orphans."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import time

from ablate import tracking
from ablate.errors import AblateError
from ablate.experiments import load_experiment
from ablate.runs import Outcome, owner_alive, process_owner

TAG = tracking.TAG


@pytest.fixture
def tracker(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tracking.Tracker("smoke", tracking.init_store(f"sqlite:///{tmp_path / 'mlflow.db'}"))


@pytest.fixture
def planned():
    return load_experiment("smoke").planned_runs([0])[0]


def dead_owner() -> str:
    """The owner string of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = process_owner(proc.pid)
    proc.wait()
    return owner


def test_child_run_holds_the_planned_run(tracker, planned):
    parent = tracker.start_parent("run")
    child = tracker.start_child(planned, parent)
    run = tracker.client.get_run(child.run_id)
    assert run.info.run_name == "focal s0" and run.info.status == "RUNNING"
    assert run.data.tags[f"{TAG}config_hash"] == planned.config_hash
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags[f"{TAG}owner"] == process_owner()
    assert run.data.params["loss.cls"] == "focal" and run.data.params["model.prior"] == "0.01"
    assert len(run.data.params) == len(planned.config)


def test_claim_is_refused_while_a_live_process_runs_the_cell_or_once_it_is_done(tracker, planned):
    parent = tracker.start_parent("run")
    first = tracker.claim(planned, parent)
    assert first is not None
    assert tracker.claim(planned, parent) is None  # running here, by a live process
    first.end(Outcome.FINISHED)
    assert tracker.claim(planned, parent) is None  # done
    assert tracker.done_runs() == {planned.config_hash: first.run_id}


@pytest.mark.parametrize("outcome", [Outcome.FAILED, Outcome.INTERRUPTED])
def test_a_failed_or_interrupted_run_is_claimed_again(tracker, planned, outcome):
    parent = tracker.start_parent("run")
    tracker.claim(planned, parent).end(outcome)
    assert tracker.done_runs() == {}
    assert tracker.claim(planned, parent) is not None


def test_diverged_counts_as_done(tracker, planned):
    parent = tracker.start_parent("run")
    tracker.claim(planned, parent).end(Outcome.DIVERGED)
    assert planned.config_hash in tracker.done_runs()
    assert tracker.claim(planned, parent) is None


def test_of_two_simultaneous_claims_the_older_wins_and_the_other_deletes_its_run(tracker, planned, monkeypatch):
    parent = tracker.start_parent("run")
    older = tracker.start_child(planned, parent)  # the other process's claim, made a moment earlier
    real, looks = tracker._rivals, []

    def rivals(config_hash):  # our first look saw nothing yet: the race
        looks.append(config_hash)
        return [] if len(looks) == 1 else real(config_hash)

    monkeypatch.setattr(tracker, "_rivals", rivals)
    assert tracker.claim(planned, parent) is None
    assert len(looks) == 2  # it did create its run and look again
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`{TAG}config_hash` = '{planned.config_hash}'")
    assert [r.info.run_id for r in runs] == [older.run_id]  # ours was deleted


def test_orphans_of_dead_processes_are_closed_and_their_cells_claimable(tracker, planned):
    parent = tracker.start_parent("run")
    orphan = tracker.start_child(planned, parent)
    tracker.client.set_tag(orphan.run_id, f"{TAG}owner", dead_owner())
    alive = tracker.start_child(load_experiment("smoke").planned_runs([1])[0], parent)
    assert tracker.close_orphans() == 1
    run = tracker.client.get_run(orphan.run_id)
    assert run.info.status == "KILLED" and run.data.tags[f"{TAG}outcome"] == "interrupted"
    assert tracker.client.get_run(alive.run_id).info.status == "RUNNING"
    assert tracker.claim(planned, parent) is not None


def test_owner_liveness():
    assert owner_alive(process_owner())
    assert not owner_alive(dead_owner())
    assert owner_alive("another-machine:12:3.00")  # cannot be checked from here: heartbeats decide
    assert not owner_alive(None)  # written before owners were recorded
    me = process_owner()
    assert not owner_alive(me.rsplit(":", 1)[0] + ":1.00")  # same pid, another start: reused


def test_a_run_whose_heartbeat_stopped_counts_as_gone(tracker, planned, monkeypatch):
    parent = tracker.start_parent("run")
    child = tracker.start_child(planned, parent)
    child.release()  # this process stops beating, as a stopped (SIGSTOP) or hung worker would
    monkeypatch.setenv("ABLATE_HEARTBEAT", "1")
    tracker.client.set_tag(child.run_id, f"{TAG}heartbeat", f"{time.time() - 10:.0f}")
    assert not tracking.run_owner_alive(tracker.client.get_run(child.run_id))
    assert tracker.claim(planned, parent) is not None  # another worker may take the cell


def test_an_interrupted_run_is_taken_over_with_its_run_id(tracker, planned, monkeypatch):
    monkeypatch.setattr(tracking, "TAKEOVER_SETTLE_SECONDS", 0.0)
    parent = tracker.start_parent("run")
    first = tracker.claim(planned, parent)
    first.log_step(10, {"loss": 1.0})
    first.flush()
    first.end(Outcome.INTERRUPTED)
    again = tracker.claim(planned, parent, resume_run_id=first.run_id)
    assert again.run_id == first.run_id
    run = tracker.client.get_run(first.run_id)
    assert run.info.status == "RUNNING" and run.data.tags[f"{TAG}owner"] == process_owner()
    again.log_step(20, {"loss": 0.5})
    again.end(Outcome.FINISHED)
    history = tracker.client.get_metric_history(first.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(10, 1.0), (20, 0.5)]
    assert tracker.done_runs() == {planned.config_hash: first.run_id}
    # A run id that is not this cell's is no run to take over: a new run starts.
    other = load_experiment("smoke").planned_runs([1])[0]
    assert tracker.claim(other, parent, resume_run_id=first.run_id).run_id != first.run_id


def test_a_worker_whose_run_was_taken_over_records_nothing(tracker, planned):
    parent = tracker.start_parent("run")
    slow = tracker.claim(planned, parent)
    tracker.client.set_tag(slow.run_id, f"{TAG}owner", "another-machine:1:1.00")  # the taker
    with pytest.raises(tracking.LostClaim):
        slow.end(Outcome.FINISHED)
    with pytest.raises(tracking.LostClaim):
        slow.log_step(1, {"loss": 1.0})
    run = tracker.client.get_run(slow.run_id)
    assert run.info.status == "RUNNING" and f"{TAG}outcome" not in run.data.tags


def test_end_maps_outcomes_to_mlflow_statuses(tracker):
    parent = tracker.start_parent("run")
    statuses = {}
    for seed, outcome in enumerate(Outcome):
        child = tracker.start_child(load_experiment("smoke").planned_runs([seed])[0], parent)
        child.end(outcome)
        statuses[outcome] = tracker.client.get_run(child.run_id).info.status
    assert statuses == {Outcome.FINISHED: "FINISHED", Outcome.DIVERGED: "FAILED", Outcome.FAILED: "FAILED",
                        Outcome.INTERRUPTED: "KILLED", Outcome.PRUNED: "KILLED"}


def test_experiments_open_as_model_training_and_their_urls_land_on_the_runs_table(tracker):
    kind, view = "mlflow.experimentKind", "mlflow.sharedViewState.ablate"
    tags = tracker.client.get_experiment(tracker.experiment_id).tags
    assert tags[kind] == "custom_model_development"
    # The Runs table's view: grouped by cell, AP, AP50, AP75 and the outcome as columns.
    assert json.loads(tags[view]) == {
        "selectedColumns": ["metrics.`AP`", "metrics.`AP50`", "metrics.`AP75`", "tags.`ablate.outcome`"],
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "ablate.cell"}]}}
    older = tracker.client.create_experiment("older-grid")  # made before ablate tagged its experiments
    assert kind not in tracker.client.get_experiment(older).tags
    base = "http://127.0.0.1:5000"
    runs_table = "runs?workflowType=machine_learning&viewStateShareKey=ablate"
    links = tracking.experiment_links(base, uri=tracker.uri)
    assert links == [("older-grid", f"{base}/#/experiments/{older}/{runs_table}"),
                     ("smoke", f"{base}/#/experiments/{tracker.experiment_id}/{runs_table}")]
    assert {k: tracker.client.get_experiment(older).tags[k] for k in (kind, view)} == {k: tags[k] for k in (kind, view)}
    assert tracking.experiment_links(base, "smoke", tracker.uri) == links[1:]
    assert tracking.ui_url(base + "/", "3", "abc") == f"{base}/#/experiments/3/runs/abc?workflowType=machine_learning"
    with pytest.raises(tracking.AblateError, match="no experiment 'nope'.*run `ablate run nope` first"):
        tracking.experiment_links(base, "nope", tracker.uri)


def test_a_tracking_server_is_asked_once_with_a_10_s_budget(monkeypatch):
    """How long an unreachable server is waited for is the client's settings, not a stopwatch in a
    test (a busy machine stretches that): one attempt, a 10 s request timeout, restored after."""
    seen = {}

    class Client:
        def __init__(self, uri):
            seen["uri"] = uri

        def search_experiments(self, max_results):
            seen.update({k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")})
            raise ConnectionError("refused")

    monkeypatch.setattr(tracking, "MlflowClient", Client)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with pytest.raises(AblateError, match=r"tracking store http://127\.0\.0\.1:9: unreachable"):
        tracking._check_store("http://127.0.0.1:9")
    assert (seen["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], seen["MLFLOW_HTTP_REQUEST_TIMEOUT"]) == ("0", "10")
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
