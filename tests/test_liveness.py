"""No silent hangs, for real: a run stuck mid-cell (its threads alive) is recorded stalled, ended
and resumed on another worker; a stuck or killed rank ends every rank of its run; a tracking
server that goes away for a minute costs no training and no metric twice.

Each test prints the time it measures (run with -s to see it): the figures in docs/liveness.md
come from these lines. Nothing here asserts a time: a loaded machine fails no test (the timeouts
only turn a hang of the test itself into a red test).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow import MlflowClient

import cli_zygote
import servers
from ablate.tracking import STEP_METRICS

pytestmark = pytest.mark.slow

GRID = servers.THREE_CELL_GRID


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "ABLATE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "ABLATE_HEARTBEAT": "1"}


def ablate(*args: str, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python cli.py *args`, its own process forked from a zygote that did the imports once
    (tests/cli_zygote.py)."""
    return cli_zygote.run(list(args), cwd, env, timeout)


def started(*args: str, cwd: Path, env: dict, **how) -> cli_zygote.Started:
    """`python cli.py *args` started (as subprocess.Popen would, pid and all) from the zygote."""
    return cli_zygote.start(list(args), cwd, env, **how)


def wait_for(predicate, timeout: float, poll: float = 0.2):
    """predicate()'s first truthy value, or None after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    return None


def hang_mark(path: Path) -> tuple[int, float] | None:
    """(pid, epoch seconds) that the test hook wrote when its process hung."""
    try:
        pid, at = path.read_text().split()
        return int(pid), float(at)
    except (OSError, ValueError):
        return None


@pytest.mark.timeout(1200)  # several processes training on two shared cores, and servers
def test_a_hung_run_is_recorded_stalled_ended_and_resumed_on_another_worker(tmp_path, env):
    """Three workers on a PostgreSQL queue and an MLflow server, two cells: the first cell to reach
    iteration 40 hangs there (the test hook blocks its main thread; the lease's and tracking's
    threads live on). With --stall-timeout 8 its worker records it stalled in both stores and ends
    its process; the third worker, idle, resumes it from its checkpoint of iteration 20. Every cell
    ends FINISHED once. (With every worker busy the cell waits for the first one free.)"""
    marker = tmp_path / "hung"
    env = {**env, "ABLATE_TEST_HANG": f"40@{marker}"}
    path = tmp_path / "twocells.toml"
    path.write_text(GRID.replace("[0.0, 1.0, 2.0]", "[0.0, 2.0]"))
    checkpoints = tmp_path / "shared-checkpoints"
    (tmp_path / "artifacts").mkdir()
    with servers.postgres() as pg, servers.mlflow_server(pg.create_database("mlflow"), tmp_path / "artifacts") as url:
        queue = pg.create_database("queue")
        env = {**env, "MLFLOW_TRACKING_URI": url}
        planned = ablate("run", str(path), "--storage", queue, cwd=tmp_path, env=env)
        assert planned.returncode == 0, planned.stderr
        folders = [tmp_path / f"machine{i}" for i in range(3)]
        procs = []
        for folder in folders:
            folder.mkdir()
            procs.append(started("worker", "twocells", "--storage", queue, "--checkpoint-dir", str(checkpoints),
                                 "--checkpoint-every", "20", "--stall-timeout", "8", "--jobs", "1", "--no-progress",
                                 cwd=folder, env=env, log=folder / "worker.log"))
        try:
            hung = wait_for(lambda: hang_mark(marker), timeout=600)
            assert hung is not None, "no cell reached iteration 40"
            hung_pid, hung_at = hung
            client = MlflowClient(url)
            experiment = client.get_experiment_by_name("twocells").experiment_id

            def hung_run():
                runs = client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'")
                return next((r for r in runs if r.data.tags.get("ablate.owner", "").split(":")[1:2] == [str(hung_pid)]),
                            None)

            run = wait_for(hung_run, timeout=60)
            assert run is not None
            run_id, hung_owner = run.info.run_id, run.data.tags["ablate.owner"]

            def recorded_stalled():
                return time.time() if client.get_run(run_id).data.tags.get("ablate.outcome") == "stalled" else None

            def taken_over():
                owner = client.get_run(run_id).data.tags.get("ablate.owner")
                return time.time() if owner != hung_owner else None

            stalled_at = wait_for(recorded_stalled, timeout=600, poll=0.1)
            resumed_at = wait_for(taken_over, timeout=600, poll=0.1)
            assert resumed_at is not None, "no worker took the hung cell over"
            print(f"\nstall-to-resume: hang at iteration 40; recorded stalled after "
                  f"{(stalled_at or resumed_at) - hung_at:.1f} s, owned by another worker after {resumed_at - hung_at:.1f} s "
                  f"(--stall-timeout 8, ABLATE_HEARTBEAT=1, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
            for p in procs:
                p.wait(timeout=600)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        logs = {f.name: (f / "worker.log").read_text() for f in folders}
        codes = [p.returncode for p in procs]
        assert sorted(codes) == [0, 0, 75], logs
        stalled_log = logs[folders[codes.index(75)].name]
        assert "made no progress for" in stalled_log and "stall timeout 8 s" in stalled_log, stalled_log
        assert "Traceback" not in stalled_log, stalled_log
        assert not psutil.pid_exists(hung_pid) or psutil.Process(hung_pid).status() == psutil.STATUS_ZOMBIE
        # MLflow: every cell FINISHED once; the hung one in the same run, resumed from iteration 20.
        runs = client.search_runs([experiment], filter_string="tags.`ablate.cell` != ''")
        assert sorted((r.data.tags["ablate.cell"], r.info.status) for r in runs) == [
            ("g=0", "FINISHED"), ("g=2", "FINISHED")], logs
        resumed = client.get_run(run_id)
        assert resumed.data.tags["ablate.resumed_from"] == "20" and resumed.data.tags["ablate.outcome"] == "finished"
        assert resumed.data.tags["ablate.stalled_after_seconds"]  # it was recorded stalled on the way
        for key in ("loss", "lr"):
            steps = sorted(m.step for m in client.get_metric_history(run_id, key))
            assert steps == list(range(5, 101, 5)), (key, steps)  # each step once
        # Optuna: three COMPLETE trials, one per cell, and the stalled attempt failed as such.
        study = optuna.load_study(study_name="twocells", storage=queue)
        # Two idle workers may pull the same waiting trial at once: the loser's trial is one the
        # sampler made up, with no run in it, failed as unused (scheduling.work_grid).
        made_up = [t for t in study.trials if t.user_attrs.get("outcome") == "unused"]
        assert all("ablate_planned_run" not in t.user_attrs for t in made_up)
        states = sorted((t.state.name, t.user_attrs.get("outcome")) for t in study.trials if t not in made_up)
        assert states == [("COMPLETE", "finished")] * 2 + [("FAIL", "stalled")], states
        complete = [json.loads(t.user_attrs["ablate_planned_run"])["cell"] for t in study.trials
                    if t.state == optuna.trial.TrialState.COMPLETE]
        assert sorted(complete) == ["g=0", "g=2"]


def test_a_stuck_rank_ends_every_rank_within_the_collective_timeout(tmp_path):
    """`ablate train --nproc 2` (gloo) with rank 1 stuck at iteration 10: rank 0 waits in its next
    collective for ABLATE_COLLECTIVE_TIMEOUT (5 s here), then the run ends in one line naming the
    ranks; rank 1 is ended by its watchdog (same bound) or with rank 0. No process is left."""
    marker = tmp_path / "hung"
    env = {**os.environ, "ABLATE_CACHE": str(tmp_path / "cache"), "ABLATE_TEST_HANG": f"10:1@{marker}",
           "ABLATE_COLLECTIVE_TIMEOUT": "5"}
    done = ablate("train", "smoke", "--no-progress", "--out", str(tmp_path / "out"), "--nproc", "2",
                  "--set", "train.iterations=400", cwd=tmp_path, env=env, timeout=300)
    ended = time.time()
    hung = hang_mark(marker)
    assert hung is not None, done.stderr
    pid, hung_at = hung
    assert done.returncode in (1, 75), done.stderr
    assert "rank 0 of 2" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    print(f"\nrank-failure exit (stuck rank 1): every rank gone {ended - hung_at:.1f} s after the hang "
          f"(ABLATE_COLLECTIVE_TIMEOUT=5, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


def _rank_one(parent: psutil.Process) -> psutil.Process | None:
    """The rank that `parent` (rank 0) started: its spawned child that is not multiprocessing's
    resource tracker."""
    for child in parent.children():
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                return child
        except psutil.Error:  # gone meanwhile
            continue
    return None


@pytest.mark.timeout(900)  # several processes training on two shared cores, and servers
def test_a_killed_rank_fails_the_attempt_and_the_grid_cell_resumes(tmp_path, env):
    """A grid cell on 2 processes, rank 1 SIGKILLed after the first checkpoint: rank 0 leaves its
    collective at once, the attempt is recorded failed (error naming the ranks), the cell goes back
    to the queue and resumes from its checkpoint; the grid ends with the cell FINISHED once."""
    path = tmp_path / "onecell.toml"
    path.write_text(GRID.replace("[0.0, 1.0, 2.0]", "[2.0]"))
    env = {**env, "OMP_NUM_THREADS": "1"}
    proc = started("run", str(path), "--nproc", "2", "--jobs", "1", "--checkpoint-every", "20", "--no-progress",
                   cwd=tmp_path, env=env)
    try:
        sidecar = wait_for(lambda: next((p for p in (tmp_path / ".ablate" / "checkpoints").glob("*/resume.json")
                                         if json.loads(p.read_text()).get("iteration", 0) >= 20), None), timeout=600)
        assert sidecar is not None, "the cell never reached its first checkpoint"
        rank_one = wait_for(lambda: _rank_one(psutil.Process(proc.pid)), timeout=60)
        assert rank_one is not None
        rank_one.kill()
        killed_at = time.time()
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        run_id = json.loads(sidecar.read_text())["meta"]["run_id"]
        failed_at = wait_for(lambda: time.time() if client.get_run(run_id).data.tags.get("ablate.error") else None,
                             timeout=600, poll=0.1)
        output = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 4, output  # a failed attempt is counted, as any failure
    assert failed_at is not None, output
    print(f"\nrank-failure exit (killed rank 1): attempt recorded failed {failed_at - killed_at:.1f} s after the kill "
          f"(load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    run = client.get_run(run_id)
    assert "another rank died or stopped answering" in run.data.tags["ablate.error"]
    assert run.info.status == "FINISHED" and run.data.tags["ablate.outcome"] == "finished"
    assert int(run.data.tags["ablate.resumed_from"]) >= 20
    steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert steps == list(range(5, 101, 5)), steps
    children = client.search_runs([client.get_experiment_by_name("onecell").experiment_id],
                                  filter_string="tags.`ablate.cell` != ''")
    assert [r.info.run_id for r in children] == [run_id]


@pytest.mark.timeout(1200)  # several processes training on two shared cores, and servers
def test_a_tracking_server_away_for_a_minute_costs_no_training_and_no_metric_twice(tmp_path, env):
    """One worker trains a cell while its MLflow server is stopped for 60 s and started again on
    the same port: training goes on (metrics logged during the outage carry its timestamps), the
    step metrics arrive when the server is back, each step once, and the run ends FINISHED without
    a resume."""
    path = tmp_path / "onecell.toml"
    path.write_text(GRID.replace("[0.0, 1.0, 2.0]", "[2.0]").replace("train.iterations = 100",
                                                                     "train.iterations = 400"))
    (tmp_path / "artifacts").mkdir()
    outage = float(os.environ.get("ABLATE_TEST_OUTAGE", "60"))  # the minute; shorter only to try it out
    with servers.restartable_mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts") as server:
        env = {**env, "MLFLOW_TRACKING_URI": server.url}
        assert ablate("run", str(path), "--jobs", "0", cwd=tmp_path, env=env).returncode == 0
        worker = started("worker", "onecell", "--jobs", "1", "--checkpoint-every", "100", "--no-progress",
                         cwd=tmp_path, env=env, log=tmp_path / "worker.log")
        try:
            client = MlflowClient(server.url)

            def logged_steps():
                experiment = client.get_experiment_by_name("onecell")
                runs = client.search_runs([experiment.experiment_id], filter_string="tags.`ablate.cell` != ''")
                return runs and client.get_metric_history(runs[0].info.run_id, "loss") and runs[0].info.run_id

            run_id = wait_for(logged_steps, timeout=600, poll=0.5)
            assert run_id is not None, (tmp_path / "worker.log").read_text()
            server.stop()
            stopped_at = time.time()
            time.sleep(outage)
            server.start()
            started_at = time.time()
            worker.wait(timeout=900)
        finally:
            if worker.poll() is None:
                worker.kill()
        output = (tmp_path / "worker.log").read_text()
        assert worker.returncode == 0, output
        assert "Traceback" not in output, output
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and "ablate.resumed_from" not in run.data.tags, output
        for key in STEP_METRICS:
            steps = sorted(m.step for m in client.get_metric_history(run_id, key))
            assert steps == list(range(5, 401, 5)), (key, steps)  # every step once
        stamps = [m.timestamp / 1000 for m in client.get_metric_history(run_id, "loss")]
        during = [t for t in stamps if stopped_at < t < started_at]
        assert during, "no step was trained while the server was away"
        print(f"\ntracking outage: server away {started_at - stopped_at:.0f} s; {len(during)} of {len(stamps)} logged "
              f"steps trained meanwhile; every step once (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


@pytest.mark.timeout(1200)  # several processes training on two shared cores, and servers
def test_a_tracking_server_away_longer_than_the_patience_leaves_the_cell_to_resume(tmp_path, env):
    """The server stops mid-cell and stays away past ABLATE_TRACKING_PATIENCE (5 s here): the worker
    says so in one line and stops (exit 130), its cell back in the queue with its checkpoint; once
    the server is back, the next worker resumes the same run and every step metric is there once."""
    path = tmp_path / "onecell.toml"
    path.write_text(GRID.replace("[0.0, 1.0, 2.0]", "[2.0]"))
    (tmp_path / "artifacts").mkdir()
    worker_args = ["worker", "onecell", "--jobs", "1", "--checkpoint-every", "20", "--no-progress"]
    with servers.restartable_mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts") as server:
        env = {**env, "MLFLOW_TRACKING_URI": server.url, "ABLATE_TRACKING_PATIENCE": "5"}
        assert ablate("run", str(path), "--jobs", "0", cwd=tmp_path, env=env).returncode == 0
        worker = started(*worker_args, cwd=tmp_path, env=env)
        try:
            client = MlflowClient(server.url)
            sidecar = wait_for(lambda: next((p for p in (tmp_path / ".ablate" / "checkpoints").glob("*/resume.json")
                                             if json.loads(p.read_text()).get("iteration", 0) >= 20), None),
                               timeout=600)
            assert sidecar is not None, "the cell never reached its first checkpoint"
            server.stop()
            output = worker.communicate(timeout=600)[0]
        finally:
            if worker.poll() is None:
                worker.kill()
        assert worker.returncode == 130, output
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "left to resume" in errors[0] and "unreachable" in errors[0], output
        assert "Traceback" not in output, output
        assert sidecar.is_file()  # the checkpoint stays for the next attempt
        server.start()
        again = ablate(*worker_args, cwd=tmp_path, env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        experiment = client.get_experiment_by_name("onecell").experiment_id
        [run] = client.search_runs([experiment], filter_string="tags.`ablate.cell` != ''")
        assert run.info.status == "FINISHED" and int(run.data.tags["ablate.resumed_from"]) >= 20
        for key in STEP_METRICS:
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(5, 101, 5)), (key, steps)  # every step once
