"""Workers: GPUs per worker, checkpoint cadence, resume bookkeeping (no GPU needed: faked)."""

from __future__ import annotations

import itertools
import json
import queue

import pytest

from ablate import lease, workers
from ablate.errors import AblateError
from ablate.experiments import load_experiment


@pytest.mark.parametrize("jobs, per_cell, visible, expected", [
    (2, 1, ["0", "1"], ["0", "1"]),
    (2, 2, ["0", "1", "2", "3"], ["0,1", "2,3"]),
    (3, 1, ["0", "1", "2", "3"], ["0", "1", "2"]),  # a spare GPU stays idle
    (2, 1, ["4", "6"], ["4", "6"]),  # the ids CUDA_VISIBLE_DEVICES gave this process
    (3, 1, [], [None, None, None]),  # no GPU: every worker on the CPU
])
def test_each_worker_gets_its_own_gpus(jobs, per_cell, visible, expected):
    assert workers.gpu_assignment(jobs, per_cell, visible) == expected


def test_too_few_gpus_is_one_clear_error():
    with pytest.raises(AblateError, match=r"--jobs 3 x --gpus-per-cell 2 needs 6 GPUs; this machine has 4 \(0,1,2,3\)"):
        workers.gpu_assignment(3, 2, ["0", "1", "2", "3"])
    with pytest.raises(AblateError, match="--gpus-per-cell must be >= 1"):
        workers.gpu_assignment(1, 0, ["0"])


def test_visible_gpus_follow_cuda_visible_devices_or_the_device_count(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert workers.visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert workers.visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert workers.visible_gpus() == ["0", "1", "2", "3"]


def fake_processes(monkeypatch, started: list, exits) -> None:
    """Worker processes that run nothing: each one's arguments go to `started`, and its exit code
    is the next of `exits` once started."""

    class FakeProcess:
        def __init__(self, target, args, daemon):
            self.args, self.exitcode = args, None
            started.append(args)

        def start(self):
            self.exitcode = next(exits)

        def is_alive(self):
            return False

        def join(self):
            pass

    class FakeContext:
        Process = FakeProcess

        def Queue(self):  # noqa: N802
            return queue.Queue()

    monkeypatch.setattr(workers.mp, "get_context", lambda kind: FakeContext())


def test_worker_processes_get_disjoint_gpus_and_a_share_of_the_threads(monkeypatch):
    """run_processes hands each process its CUDA_VISIBLE_DEVICES (set before CUDA starts)."""
    started = []
    fake_processes(monkeypatch, started, itertools.repeat(0))
    monkeypatch.setattr(workers, "visible_gpus", lambda: ["0", "1", "2", "3"])
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 8)
    options = workers.WorkerOptions(tracking_uri="sqlite:///x.db")
    workers.run_processes(workers.work, "g", 2, options, show_progress=False, total=4, gpus_per_cell=2)
    assert [(a[2].gpus, a[2].threads) for a in started] == [("0,1", 4), ("2,3", 4)]


def test_a_process_ended_for_a_stalled_run_is_replaced(monkeypatch):
    """A worker process that ends with lease.STALLED_EXIT (its run stalled) gets a fresh one in its
    place, with the same settings; the stall is counted, not as a crash."""
    exits = iter([lease.STALLED_EXIT, 0, 0])  # worker 0 stalls once, then its replacement and worker 1 finish
    started = []
    fake_processes(monkeypatch, started, exits)
    monkeypatch.setattr(workers, "visible_gpus", lambda: [])
    options = workers.WorkerOptions(tracking_uri="sqlite:///x.db")
    outcomes = workers.run_processes(workers.work, "g", 2, options, show_progress=False, total=2)
    assert [a[5] for a in started] == [0, 1, 0]  # worker 0 started again
    assert started[2] == started[0]
    assert outcomes == {"stalled": 1}


GIB = 2**30


@pytest.mark.parametrize("runs, nproc, per_cell, visible, cores, memory, expected", [
    (7, 1, 1, [], 2, 24 * GIB, 2),  # this machine: one 1-thread worker per core
    (1, 1, 1, [], 2, 24 * GIB, 1),  # never more workers than runs
    (100, 1, 1, [], 16, 24 * GIB, 12),  # 16 cores, but memory for 12 workers of 2 GiB
    (100, 2, 1, [], 16, 64 * GIB, 8),  # a run on 2 processes takes 2 cores
    (100, 1, 1, [], 2, GIB, 1),  # too little memory for even one: still one
    (100, 1, 2, ["0", "1", "2", "3", "4"], 64, 256 * GIB, 2),  # GPUs: one worker per group of 2
    (100, 4, 1, ["0", "1", "2", "3"], 64, 256 * GIB, 1),  # DDP on 4 GPUs: the 4 are one worker's
])
def test_default_jobs_follow_cores_gpus_memory_and_runs(monkeypatch, runs, nproc, per_cell, visible, cores,
                                                        memory, expected):
    monkeypatch.delenv("ABLATE_JOBS")
    assert workers.default_jobs(runs, nproc, per_cell, visible=visible, cores=cores,
                                available_memory=memory) == expected


def test_ablate_jobs_replaces_the_machines_count(monkeypatch):
    monkeypatch.setenv("ABLATE_JOBS", "3")
    assert workers.default_jobs(10, visible=[], cores=64, available_memory=256 * GIB) == 3
    assert workers.default_jobs(2, visible=[], cores=64, available_memory=256 * GIB) == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("ABLATE_JOBS", bad)
        with pytest.raises(AblateError, match=r"\$ABLATE_JOBS.*" + bad):
            workers.default_jobs(10, visible=[], cores=2, available_memory=GIB)


def test_auto_checkpoint_cadence():
    assert workers.auto_checkpoint_every(800) == 80  # the tiny preset: ten a run
    assert workers.auto_checkpoint_every(90_000) == 1000  # the paper: ~3.5 min at 0.2 s/iteration
    assert workers.auto_checkpoint_every(12) == 50  # shorter than that: only on a stop


def test_resumable_run_id_reads_the_sidecar(tmp_path):
    (planned, *_) = load_experiment("smoke").planned_runs([0])
    path = workers.resume_path(workers.WorkerOptions("sqlite:///x.db", checkpoint_dir=tmp_path), planned)
    assert path == tmp_path / planned.config_hash / "resume.pt"
    assert workers.resumable_run_id(path) is None
    path.parent.mkdir()
    path.with_suffix(".json").write_text(json.dumps({"iteration": 20, "meta": {"run_id": "abc"}}))
    assert workers.resumable_run_id(path) == "abc"
    path.with_suffix(".json").write_text("{half")
    assert workers.resumable_run_id(path) is None


def test_a_parent_run_left_open_with_an_empty_queue_is_closed_by_the_next_run(tmp_path, monkeypatch,
                                                                             fresh_mlflow_store):
    from ablate import grid, scheduling, tracking

    monkeypatch.chdir(tmp_path)
    tracker = tracking.Tracker("g", fresh_mlflow_store())
    study = scheduling.grid_study("g", scheduling.storage(tmp_path / "q.journal"))
    parent = grid.open_parent(study, tracker, [0], 1)
    assert grid.open_parent(study, tracker, [0], 1) == parent  # a second coordinator joins it
    scheduling.enqueue(study, load_experiment("smoke").planned_runs([0])[:1])
    grid.close_orphan_parent(study, tracker)
    assert tracker.is_running(parent)  # work is still queued: the grid is not over
    study.tell(study.ask(), state=scheduling.TrialState.FAIL)
    grid.close_orphan_parent(study, tracker)
    assert tracker.client.get_run(parent).info.status == "KILLED"
    assert grid.open_parent(study, tracker, [0], 1) != parent  # the next grid gets a parent of its own


def test_exit_code_of_a_grid_says_interrupted_then_failed_then_fine():
    from collections import Counter

    from ablate.runs import Outcome

    assert workers.exit_code(Counter({"finished": 3, "skipped (done elsewhere)": 1})) == 0
    assert workers.exit_code(Counter({"finished": 2, "failed": 1})) == 4
    assert workers.exit_code(Counter({Outcome.WORKER_CRASHED: 1})) == 4
    assert workers.exit_code(Counter({"failed": 1, "interrupted": 1})) == 130
    assert workers.counts_text(Counter({"finished": 2, "failed": 1})) == "1 failed, 2 finished"


def test_resolve_options_checks_each_option_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AblateError, match="--checkpoint-every: must be >= 0, got -2"):
        workers.resolve_options(checkpoint_every=-2)
    with pytest.raises(AblateError, match="--stall-timeout"):
        workers.resolve_options(stall_timeout=-1.0)
    monkeypatch.setenv("ABLATE_CHECKPOINT_DIR", str(tmp_path / "ck"))
    options = workers.resolve_options(checkpoint_every=5)
    assert (options.checkpoint_dir, options.checkpoint_every, options.nproc, options.storage) == (
        tmp_path / "ck", 5, 1, None)
