"""One grid on many workers, for real: PostgreSQL as the queue, an MLflow server over PostgreSQL
as the tracking store, `ablate worker` processes, one of them SIGKILLed mid-cell.

The servers come from tests/servers.py (the machine's own PostgreSQL 15 binaries; the server runs
as the `postgres` user when the tests run as root) and are stopped when the module ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

import cli_zygote
import servers
from ablate import tracking
from ablate.experiments import load_experiment

pytestmark = pytest.mark.slow

GRID = servers.THREE_CELL_GRID


@pytest.fixture(scope="module")
def pg():
    with servers.postgres() as server:
        yield server


@pytest.fixture
def env(tmp_path):
    cache = tmp_path / "cache"
    return {**os.environ, "ABLATE_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "ABLATE_HEARTBEAT": "1"}


def ablate(*args: str, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python cli.py *args`, its own process forked from a zygote that did the imports once
    (tests/cli_zygote.py)."""
    return cli_zygote.run(list(args), cwd, env, timeout)


def started(*args: str, cwd: Path, env: dict, **how) -> cli_zygote.Started:
    """`python cli.py *args` started (as subprocess.Popen would, pid and all) from the zygote."""
    return cli_zygote.start(list(args), cwd, env, **how)


def test_bad_storage_urls_fail_fast_in_one_masked_line(tmp_path, env, pg):
    cases = {
        f"postgresql://ablate:hunter2@127.0.0.1:{servers.free_port()}/queue": "cannot open the queue",
        pg.url("postgres", password="hunter2"): "password authentication failed",
        f"sqlite:///{tmp_path}/q.db": "SQLite cannot be shared",
        "mysql://ablate:hunter2@127.0.0.1/queue": "no database driver",
    }
    for url, message in cases.items():
        result = ablate("run", "smoke", "--storage", url, cwd=tmp_path, env=env, timeout=120)
        assert result.returncode == 1, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
        assert "hunter2" not in result.stdout + result.stderr and ("***" in lines[0] or "@" not in url)


def test_an_unreachable_tracking_server_fails_fast_in_one_masked_line(tmp_path, env):
    env = {**env, "MLFLOW_TRACKING_URI": f"http://me:hunter2@127.0.0.1:{servers.free_port()}"}
    result = ablate("run", "smoke", cwd=tmp_path, env=env, timeout=120)  # the 10 s budget: test_tracking.py
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "tracking store http://me:***@127.0.0.1" in lines[0], result.stderr
    assert "hunter2" not in result.stdout + result.stderr


def test_a_grid_on_a_server_prints_its_url_masked_and_no_view_run_lines(tmp_path, env):
    """MLflow prints 'View run ... at: URL' (password included) whenever a run on a server ends;
    ablate switches that off, and its own lines mask the password."""
    (tmp_path / "artifacts").mkdir()
    with servers.mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts") as url:
        env = {**env, "MLFLOW_TRACKING_URI": url.replace("http://", "http://me:hunter2@")}
        result = ablate("run", "smoke", "--no-progress", "--set", "train.iterations=2", cwd=tmp_path, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "2 finished" in output, output
    assert "hunter2" not in output and "View run" not in output, output
    assert "http://me:***@127.0.0.1" in output, output


def test_two_coordinators_at_once_enqueue_each_run_once(tmp_path, env, pg):
    queue = pg.create_database("two_coordinators")
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    from ablate.tracking import init_store

    init_store(env["MLFLOW_TRACKING_URI"])  # create the sqlite store once; the coordinators race otherwise
    procs = [started("run", "smoke", "--seeds", "2", "--storage", queue, cwd=tmp_path, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = optuna.load_study(study_name="smoke", storage=queue)
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    hashes = sorted(json.loads(t.user_attrs["ablate_planned_run"])["config_hash"] for t in waiting)
    assert hashes == sorted(r.config_hash for r in load_experiment("smoke").planned_runs([0, 1]))
    again = ablate("run", "smoke", "--seeds", "2", "--storage", queue, cwd=tmp_path, env=env)
    assert "enqueued 0, 4 were queued already" in " ".join((again.stdout + again.stderr).split())


def _owner_pid(client: MlflowClient, run_id: str) -> int:
    return int(client.get_run(run_id).data.tags["ablate.owner"].rsplit(":", 2)[1])


def test_three_workers_one_killed_mid_cell_every_cell_finishes_once(tmp_path, env, pg):
    queue = pg.create_database("queue")
    backend = pg.create_database("mlflow")
    (tmp_path / "artifacts").mkdir()
    path = tmp_path / "threecells.toml"
    path.write_text(GRID)
    checkpoints = tmp_path / "shared-checkpoints"
    with servers.mlflow_server(backend, tmp_path / "artifacts") as url:
        env = {**env, "MLFLOW_TRACKING_URI": url}
        planned = ablate("run", str(path), "--storage", queue, cwd=tmp_path, env=env)
        assert planned.returncode == 0 and "enqueued 3" in " ".join((planned.stdout + planned.stderr).split()), planned.stderr
        folders = [tmp_path / f"machine{i}" for i in range(3)]  # each worker in a folder of its own
        procs = []
        for folder in folders:
            folder.mkdir()
            procs.append(started("worker", "threecells", "--storage", queue, "--checkpoint-dir", str(checkpoints),
                                 "--checkpoint-every", "20", "--no-progress", cwd=folder, env=env,
                                 log=folder / "worker.log"))
        client = MlflowClient(url)
        killed_run = None
        deadline = time.time() + 600
        while killed_run is None and time.time() < deadline:  # wait for a cell past its first checkpoint
            time.sleep(0.5)
            for sidecar in checkpoints.glob("*/resume.json"):
                with open(sidecar) as f:
                    saved = json.load(f)
                if saved.get("iteration", 0) >= 20 and saved.get("iteration", 0) < 100:
                    killed_run = saved["meta"]["run_id"]
                    victim = _owner_pid(client, killed_run)
                    os.kill(victim, signal.SIGKILL)
                    break
        assert killed_run is not None, "no cell reached its first checkpoint"
        for p in procs:
            p.wait(timeout=600)
        logs = "\n".join((f / "worker.log").read_text()[-1500:] for f in folders)
        assert sorted(p.returncode for p in procs) == [-signal.SIGKILL, 0, 0], logs
        exp = client.get_experiment_by_name("threecells")
        runs = client.search_runs([exp.experiment_id], filter_string="tags.`ablate.cell` != ''")
        # Every cell FINISHED exactly once, and the killed one in the same MLflow run, resumed.
        assert sorted((r.data.tags["ablate.cell"], r.info.status) for r in runs) == [
            ("g=0", "FINISHED"), ("g=1", "FINISHED"), ("g=2", "FINISHED")], logs
        resumed = client.get_run(killed_run)
        assert resumed.info.status == "FINISHED"
        assert int(resumed.data.tags["ablate.resumed_from"]) >= 20
        steps = sorted(m.step for m in client.get_metric_history(killed_run, "loss"))  # the store keeps no order
        assert steps == list(range(5, 101, 5)), steps  # continued, no step logged twice
        # ... and exactly once in Optuna.
        study = optuna.load_study(study_name="threecells", storage=queue)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert sorted(json.loads(t.user_attrs["ablate_planned_run"])["cell"] for t in complete) == ["g=0", "g=1", "g=2"]
        # The resumed cell's AP equals an uninterrupted run's, bit for bit (same threads: one).
        cell = resumed.data.tags["ablate.cell"]
        reference = subprocess.run(
            [sys.executable, "-c", REFERENCE, str(path), cell], cwd=tmp_path, env=env, capture_output=True,
            text=True, timeout=600)
        assert reference.returncode == 0, reference.stderr[-2000:]
        reference_ap = json.loads(reference.stdout.splitlines()[-1])["AP"]
        assert tracking.to_mlflow({"AP": reference_ap})["AP"] == resumed.data.metrics["AP"]  # as MLflow holds it


# An uninterrupted run of one cell, in a fresh process with one thread, printing its metrics.
REFERENCE = """
import json, sys, torch
torch.set_num_threads(1)
from ablate.experiments import load_experiment
from ablate.runner import run_training
exp = load_experiment(sys.argv[1])
(planned,) = [p for p in exp.planned_runs([0]) if p.cell == sys.argv[2]]
summary = run_training(planned.build_config(), name="reference", console=None, show_progress=False)
print(json.dumps(summary.metrics))
"""


def test_a_worker_taken_for_dead_that_wakes_up_records_nothing(tmp_path, env, pg):
    """SIGSTOP a worker mid-cell past its heartbeat grace (3 s here): its trial is failed as stale
    and retried, a second worker takes the run over from its checkpoint and finishes it; SIGCONT
    the first: it finds its run taken and records nothing (no second FINISHED run)."""
    queue = pg.create_database("stale")
    path = tmp_path / "onecell.toml"
    path.write_text(GRID.replace('"loss.gamma" = [0.0, 1.0, 2.0]', '"loss.gamma" = [2.0]'))
    checkpoints = tmp_path / "shared-checkpoints"
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    assert ablate("run", str(path), "--storage", queue, cwd=tmp_path, env=env).returncode == 0
    worker = ["worker", "onecell", "--storage", queue, "--checkpoint-dir", str(checkpoints),
              "--checkpoint-every", "20", "--no-progress"]
    sleeper = started(*worker, cwd=tmp_path, env=env)
    sidecar = None
    deadline = time.time() + 300
    while time.time() < deadline:
        found = list(checkpoints.glob("*/resume.json"))
        if found and json.loads(found[0].read_text()).get("iteration", 0) >= 20:
            sidecar = found[0]
            break
        time.sleep(0.3)
    assert sidecar is not None, "the cell never reached its first checkpoint"
    os.kill(sleeper.pid, signal.SIGSTOP)
    try:
        time.sleep(5)  # > 3 missed heartbeats of 1 s
        taker = ablate(*worker, cwd=tmp_path, env=env)
        assert taker.returncode == 0, taker.stderr[-2000:]
    finally:
        os.kill(sleeper.pid, signal.SIGCONT)
    output = sleeper.communicate(timeout=300)[0]
    assert sleeper.returncode == 0, output[-2000:]
    assert "skipped (done elsewhere)" in " ".join(output.split())
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("onecell").experiment_id])
    children = [r for r in runs if "ablate.cell" in r.data.tags]
    assert [r.info.status for r in children] == ["FINISHED"]
    assert int(children[0].data.tags["ablate.resumed_from"]) >= 20
    study = optuna.load_study(study_name="onecell", storage=queue)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "FAIL"]
