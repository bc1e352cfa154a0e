"""What the queue and the claims cost: per-cell overhead, and how long a dead worker's cell waits.

    .venv/bin/python benchmarks/queue_overhead.py              # PostgreSQL + MLflow server, and the journal + sqlite
    .venv/bin/python benchmarks/queue_overhead.py --cells 40 --heartbeat 10

1. Overhead per cell: a grid of N cells run with a training that does nothing, so every second
   measured is the machinery's: pulling a trial (stale-trial check, ask, owner), claiming the run
   in the tracking store (two searches, create, params), closing it and the trial. Two setups:
   the many-machine one (PostgreSQL queue, an MLflow server over PostgreSQL; both started here
   from the machine's binaries, as the tests do) and the one-machine default (journal + sqlite).
2. Pick-up time of a dead worker's cell: a worker process takes a cell and is SIGKILLed; another
   worker is waiting. Measured from the kill to the moment the waiting worker starts the cell,
   at the given heartbeat interval (`ABLATE_HEARTBEAT`; a trial is stale after 3 missed beats).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import servers  # noqa: E402

from ablate import scheduling, tracking  # noqa: E402
from ablate.config import build_config  # noqa: E402
from ablate.runs import Outcome, PlannedRun, RunRecord  # noqa: E402


def planned_runs(n: int, name: str) -> list[PlannedRun]:
    return [PlannedRun.from_config(name, f"cell {i}", i, build_config("tiny", {"train.seed": i}), {}, [])
            for i in range(n)]


def overhead_per_cell(storage: str | Path, tracking_uri: str, cells: int, name: str) -> float:
    """Seconds of machinery per cell, over a grid of `cells` no-op cells."""
    study = scheduling.grid_study(name, scheduling.storage(storage))
    tracker = tracking.Tracker(name, tracking.init_store(tracking_uri))
    parent = tracker.start_parent("bench")
    scheduling.enqueue(study, planned_runs(cells, name))

    def run(planned: PlannedRun) -> RunRecord | None:
        child = tracker.claim(planned, parent)
        if child is None:
            return None
        child.end(Outcome.FINISHED)
        return RunRecord(Outcome.FINISHED, {"AP": 0.0}, run_id=child.run_id)

    t0 = time.perf_counter()
    assert scheduling.work_grid(study, None, run) == cells
    return (time.perf_counter() - t0) / cells


VICTIM = """
import sys, time
from ablate import scheduling
study = scheduling.load_grid_study(sys.argv[2], scheduling.storage(sys.argv[1]))
scheduling.work_grid(study, 1, lambda planned: (print("took", flush=True), time.sleep(3600)))
"""


def pickup_seconds(storage: str, name: str, heartbeat: int) -> float:
    """From SIGKILL of the worker holding a cell to another worker starting that cell."""
    study = scheduling.grid_study(name, scheduling.storage(storage))
    scheduling.enqueue(study, planned_runs(1, name))
    env = {**os.environ, "ABLATE_HEARTBEAT": str(heartbeat), "PYTHONPATH": str(ROOT)}
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, storage, name], env=env, stdout=subprocess.PIPE, text=True)
    assert victim.stdout.readline().strip() == "took"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = time.perf_counter()
    started: list[float] = []
    scheduling.work_grid(study, None, lambda planned: started.append(time.perf_counter())
                         or RunRecord(Outcome.FINISHED, {"AP": 0.0}))
    return started[0] - killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20)
    parser.add_argument("--heartbeat", type=int, default=10, help="ABLATE_HEARTBEAT for the pick-up case")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.chdir(tmp)
        local = overhead_per_cell(tmp / "q.journal", f"sqlite:///{tmp / 'mlflow.db'}", args.cells, "local")
        print(f"overhead per cell, journal queue + sqlite tracking:           {local * 1000:7.0f} ms")
        with servers.postgres() as pg:
            queue = pg.create_database("queue")
            (tmp / "artifacts").mkdir()
            with servers.mlflow_server(pg.create_database("mlflow"), tmp / "artifacts") as url:
                shared = overhead_per_cell(queue, url, args.cells, "shared")
                print(f"overhead per cell, PostgreSQL queue + MLflow server (PG):     {shared * 1000:7.0f} ms")
            os.environ["ABLATE_HEARTBEAT"] = str(args.heartbeat)
            waits = [pickup_seconds(pg.create_database(f"pickup{i}"), f"pickup{i}", args.heartbeat)
                     for i in range(args.repeats)]
            print(f"dead worker's cell picked up after (heartbeat {args.heartbeat} s, stale after "
                  f"{3 * args.heartbeat} s): median {statistics.median(waits):.1f} s "
                  f"(min {min(waits):.1f}, max {max(waits):.1f}, {args.repeats} kills)")


if __name__ == "__main__":
    main()
