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
from ablate.lease import owner_alive, process_owner
from ablate.runs import RUN_ENDS, Outcome, runs_frame

TAG = tracking.TAG


@pytest.fixture
def tracker(tmp_path, monkeypatch, fresh_mlflow_store):
    monkeypatch.chdir(tmp_path)
    return tracking.Tracker("smoke", fresh_mlflow_store())


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
    assert sorted((m.step, m.value) for m in history) == [(10, 1.0), (20, 0.5)]
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
    for seed, outcome in enumerate(sorted(RUN_ENDS)):
        child = tracker.start_child(load_experiment("smoke").planned_runs([seed])[0], parent)
        child.end(outcome)
        statuses[outcome] = tracker.client.get_run(child.run_id).info.status
    assert statuses == {Outcome.FINISHED: "FINISHED", Outcome.DIVERGED: "FAILED", Outcome.FAILED: "FAILED",
                        Outcome.INTERRUPTED: "KILLED", Outcome.PRUNED: "KILLED", Outcome.STALLED: "KILLED"}


def test_experiments_open_as_model_training_and_their_urls_land_on_the_runs_table(tracker):
    kind, view = "mlflow.experimentKind", "mlflow.sharedViewState.ablate"
    tags = tracker.client.get_experiment(tracker.experiment_id).tags
    assert tags[kind] == "custom_model_development"
    # The Runs table's view, a saved view the Runs tab's menu lists by name: grouped by cell, AP,
    # AP50, AP75 and the outcome as columns.
    saved = json.loads(tags[view])
    assert saved["name"] == "ablate: cells (AP %)" and isinstance(saved["createdAt"], int)
    state = {"selectedColumns": ["metrics.`AP`", "metrics.`AP50`", "metrics.`AP75`", "tags.`ablate.outcome`"],
             "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "ablate.cell"}]}}
    assert json.loads(saved["state"]) == state
    older = tracker.client.create_experiment("older-grid")  # made before ablate tagged its experiments
    assert kind not in tracker.client.get_experiment(older).tags
    base = "http://127.0.0.1:5000"
    runs_table = "runs?workflowType=machine_learning&viewStateShareKey=ablate"
    links = tracking.experiment_links(base, uri=tracker.uri)
    assert links == [("older-grid", f"{base}/#/experiments/{older}/{runs_table}"),
                     ("smoke", f"{base}/#/experiments/{tracker.experiment_id}/{runs_table}")]
    older_tags = tracker.client.get_experiment(older).tags
    assert older_tags[kind] == tags[kind] and tracking.view_state(older_tags[view]) == state
    assert tracking.experiment_links(base, "smoke", tracker.uri) == links[1:]
    assert tracking.ui_url(base + "/", "3", "abc") == f"{base}/#/experiments/3/runs/abc?workflowType=machine_learning"
    with pytest.raises(tracking.AblateError, match="no experiment 'nope'.*run `ablate run nope` first"):
        tracking.experiment_links(base, "nope", tracker.uri)


def test_the_view_shows_the_ablated_keys_and_child_runs_show_them_first(tracker, planned):
    parent = tracker.start_parent("run")
    child = tracker.start_child(planned, parent)
    state = tracking.view_state(tracker.client.get_experiment(tracker.experiment_id).tags["mlflow.sharedViewState.ablate"])
    assert state["selectedColumns"][-1] == "tags.`ablated.loss.cls`"  # smoke varies loss.cls
    run = tracker.client.get_run(child.run_id)
    assert run.data.tags["ablated.loss.cls"] == "focal"
    # The description at the top of the run's page opens with the cell and its ablated values.
    assert run.data.tags["mlflow.note.content"].startswith("Cell **focal**, seed 0: `loss.cls` = focal.")
    # An older view (the bare state ablate wrote before) is rewritten as a saved view, keeping the keys.
    tracker.client.set_experiment_tag(tracker.experiment_id, "mlflow.sharedViewState.ablate", json.dumps(state))
    tracking.tag_for_the_ui(tracker.client, tracker.client.get_experiment(tracker.experiment_id))
    saved = json.loads(tracker.client.get_experiment(tracker.experiment_id).tags["mlflow.sharedViewState.ablate"])
    assert json.loads(saved["state"]) == state


def test_coco_metrics_go_to_mlflow_in_percent_without_sentinels_and_come_back_as_fractions(tracker, planned):
    parent = tracker.start_parent("run")
    child = tracker.start_child(planned, parent)
    child.log_metrics({"AP": 0.0254188601, "APm": -1.0, "APl": -1.0, "train_seconds": 3.5}, step=12)
    child.log_metrics({"val_AP": 0.5}, step=6)
    child.end(Outcome.FINISHED)
    logged = tracker.client.get_run(child.run_id).data.metrics
    assert logged == {"AP": 2.5419, "train_seconds": 3.5, "val_AP": 50.0}  # no -1, AP in percent (4 decimals)
    [row] = runs_frame(tracker.load_runs()).to_dict("records")
    assert row["AP"] == pytest.approx(0.025419, abs=1e-12) and row["val_AP"] == pytest.approx(0.5)
    assert row["train_seconds"] == 3.5 and "APm" not in row
    # Runs logged before (no unit tag) hold fractions, read as they are.
    assert tracking.from_mlflow({"AP": 0.3}, None) == {"AP": 0.3}


def test_parent_runs_are_named_after_the_experiment_and_links_lead_to_the_ui_pages(monkeypatch):
    monkeypatch.setattr(tracking.time, "strftime", lambda fmt: "2026-12-05 07:28")
    assert tracking.parent_run_name("gamma-sweep") == "gamma-sweep 2026-12-05 07:28"
    assert tracking.parent_run_name("gamma-sweep", "search") == "gamma-sweep search 2026-12-05 07:28"
    assert tracking.ui_base("https://ablate:s3cret@mlflow.example.org:8443/") == "https://mlflow.example.org:8443"
    assert tracking.ui_base("sqlite:////tmp/mlflow.db") == "http://127.0.0.1:5000"
    assert tracking.cell_route("3", "g=2 a=0.25") == (
        "#/experiments/3/runs?workflowType=machine_learning&searchFilter=tags.%60ablate.cell%60%20%3D%20%27g%3D2%20a%3D0.25%27")
    note = tracking.experiment_note("3", "Focal loss.", "abc")
    assert note.splitlines()[0] == ("**Results:** [report page](#/experiments/3/runs/abc/artifactPath/report/report.html"
                                    "?workflowType=machine_learning) · [cells: the Runs table grouped by cell]"
                                    "(#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=ablate)")
    assert note.endswith("\n\nFocal loss.\n")


def test_the_experiment_description_keeps_its_report_link(tracker):
    tracker.describe("A grid.", report_run_id="abc123")
    tracker.describe("A grid, described again.")  # a later `ablate run`: the report link stays
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert "report/report.html" in exp.tags["mlflow.note.content"]
    assert tracking.report_links("http://h:1", exp) == [
        ("report", f"http://h:1/#/experiments/{tracker.experiment_id}/runs/abc123/artifactPath/report/report.html"
                   "?workflowType=machine_learning")]


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


# ----------------------------------------------------------------------------- a server that goes away


class FlakyClient:
    """An MLflow client whose server is unreachable for its first `failures` writes."""

    def __init__(self, owner: str, failures: int):
        self.owner, self.failures, self.batches, self.calls = owner, failures, [], 0

    def log_batch(self, run_id, metrics=(), tags=()):
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise tracking.MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow/runs/log-batch "
                                           "failed with exception HTTPConnectionPool: Max retries exceeded")
        self.batches.append([(m.key, m.step, m.timestamp) for m in metrics])

    def get_run(self, run_id):
        class Run:
            class data:
                tags = {f"{TAG}owner": self.owner}
        return Run

    def set_tag(self, run_id, key, value):
        self.log_batch(run_id)


def test_step_metrics_wait_for_a_server_that_went_away_and_arrive_once_in_order(monkeypatch):
    """Training never waits: flush() returns at once while the server is away; each batch is tried
    again with the same timestamps until the server takes it, in the order logged."""
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 0.01)
    client = FlakyClient(process_owner(), failures=5)
    run = tracking.ChildRun(client, "r1", process_owner(), "http://me:pw@127.0.0.1:9",
                            holder=tracking.lease.Lease(on_stalled=pytest.fail))
    sent = []
    for step in (5, 10, 15):
        run.log_step(step, {"loss": 1.0 / step, "lr": 0.01})
        sent.append([(key, step, m.timestamp) for key, m in zip(("loss", "lr"), run._buffer)])
        run.flush()
    assert run._outbox.drain(patience=30)
    assert client.batches == sent  # each batch once, in order, its timestamps as logged
    assert client.calls == 3 + 5  # the five failed tries were tries of the first batch
    run.release()


def test_closing_a_run_waits_for_the_server_then_says_so_in_one_error(monkeypatch):
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 0.01)
    monkeypatch.setenv("ABLATE_TRACKING_PATIENCE", "0.2")
    client = FlakyClient(process_owner(), failures=10**9)
    run = tracking.ChildRun(client, "r1", process_owner(), "http://me:pw@127.0.0.1:9",
                            holder=tracking.lease.Lease(on_stalled=pytest.fail))
    run.log_step(5, {"loss": 1.0})
    with pytest.raises(tracking.TrackingUnreachable, match=r"tracking server http://me:\*\*\*@127.0.0.1:9 unreachable"):
        run.end(Outcome.FINISHED)


def test_tracking_patience_is_checked(monkeypatch):
    monkeypatch.setenv("ABLATE_TRACKING_PATIENCE", "-3")
    with pytest.raises(tracking.AblateError, match="ABLATE_TRACKING_PATIENCE: expected seconds >= 0, got '-3'"):
        tracking.tracking_patience()


def test_a_refusal_is_not_waited_for():
    assert tracking.is_unreachable(tracking.MlflowException("API request to http://h/api failed with exception x"))
    assert not tracking.is_unreachable(tracking.MlflowException("Invalid value for param 'x'"))


def test_closing_a_run_sends_the_steps_the_store_lacks_by_step(tracker, planned):
    """What a killed attempt logged but never sent arrives once, by step; nothing arrives twice."""
    parent = tracker.start_parent("run")
    child = tracker.claim(planned, parent)
    child.log_step(5, {"loss": 1.0, "lr": 0.1})
    child.flush()
    history = [{"iteration": 5, "loss": 1.0, "lr": 0.1}, {"iteration": 10, "loss": 0.5, "lr": 0.1}]
    child.end(Outcome.FINISHED, history=history)
    for key, values in {"loss": [(5, 1.0), (10, 0.5)], "lr": [(5, 0.1), (10, 0.1)]}.items():
        assert sorted((m.step, m.value) for m in tracker.client.get_metric_history(child.run_id, key)) == values
