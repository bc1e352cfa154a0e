"""Run an experiment: its planned runs as enqueued Optuna trials, each tracked as an MLflow child run.

`run_grid` plans (every cell x seed as a `PlannedRun`; which are done is asked of the tracking
store, by config hash), enqueues what is left and runs it in this process or in `jobs` worker
processes. A worker claims a run in the tracking store before training it, so a run that another
process (another folder sharing the store) finished or is running is skipped, not repeated. A cell
that crashes is recorded as failed and the grid goes on; a diverged cell is a result and is
recorded as such. `run_search` is the same machinery with TPE proposing the configs.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing as mp
import os
import queue as queue_lib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from ablate import builders, scheduling, tracking
from ablate.config import Config
from ablate.data.coco import locate
from ablate.engine import progress_bar
from ablate.errors import AblateError, one_line
from ablate.experiments import Experiment
from ablate.runner import run_training
from ablate.runs import Outcome, PlannedRun, RunResult

# Counted beside the outcomes: a run another process had finished or was running when this
# worker came to it (the tracking store said so), and a worker process that died.
SKIPPED = "skipped (done elsewhere)"
WORKER_CRASHED = "worker crashed"


@dataclass
class Plan:
    experiment: Experiment
    runs: list[PlannedRun]  # every cell x seed, in order
    done: dict[str, str] = field(default_factory=dict)  # config hash -> run id, from the tracking store

    @property
    def todo(self) -> list[PlannedRun]:
        return [run for run in self.runs if run.config_hash not in self.done]


def make_plan(exp: Experiment, seeds: list[int], overrides: dict[str, Any], tracker: tracking.Tracker | None,
              force: bool = False) -> Plan:
    runs = exp.planned_runs(seeds, overrides)
    done = {} if force or tracker is None else tracker.done_runs()
    return Plan(exp, runs, {r.config_hash: done[r.config_hash] for r in runs if r.config_hash in done})


@contextlib.contextmanager
def ablation_lock(name: str):
    """One `ablate run`/`search` per ablation and working folder at a time: the folder's queue
    (scheduling.reset_queue) relies on it. Processes in other folders coordinate through the
    tracking store's claims instead."""
    path = scheduling.state_dir() / f"{name}.lock"
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AblateError(f"{path}: another `ablate run/search {name}` is running in this folder") from None
        yield


def run_tracked(planned: PlannedRun, tracker: tracking.Tracker, parent_id: str, progress: Progress | None,
                *, on_log=None, eval_every: int = 0, on_eval=None, claim: bool = True) -> RunResult | None:
    """Train one planned run as an MLflow child run. Returns None when the tracking store says the
    run is done or running elsewhere (`claim`); never raises for a failing run (it is recorded)."""
    child = tracker.claim(planned, parent_id) if claim else tracker.start_child(planned, parent_id)
    if child is None:
        return None

    def log(step: int, metrics: dict[str, float]) -> None:
        child.log_step(step, metrics)
        if on_log:
            on_log(step, metrics)

    def evaluate(step: int, metrics: dict[str, float]) -> bool:
        child.log_metrics({f"val_{k}": v for k, v in metrics.items() if k in ("AP", "AP50")}, step)
        return bool(on_eval and on_eval(step, metrics))

    try:
        summary = run_training(planned.build_config(), name=planned.name.replace(" ", "_"), console=None,
                               show_progress=progress is not None, progress=progress, on_log=log,
                               eval_every=eval_every, on_eval=evaluate if on_eval else None)
    except KeyboardInterrupt:
        child.end(Outcome.INTERRUPTED)
        raise
    except Exception as e:  # one failing cell must never lose the others: record it and go on
        error = one_line(e)
        child.set_tags({"error": error[:500]})
        child.end(Outcome.FAILED)
        return RunResult(Outcome.FAILED, run_id=child.run_id, error=error)
    result = result_of(summary, child.run_id)
    final = {"train_seconds": summary["train_seconds"], "bg_per_fg": summary["anchors"]["bg_per_fg"],
             "fg_per_image": summary["anchors"]["fg_per_image"], **result.metrics}
    if summary["diverged_at"] is not None:
        final["diverged_at"] = summary["diverged_at"]
    child.log_metrics(final, summary["iterations"])
    child.set_tags({"run_dir": summary["run_dir"]})
    child.log_artifacts(Path(summary["run_dir"]))
    child.end(result.outcome)
    return result


def result_of(summary: dict[str, Any], run_id: str | None = None) -> RunResult:
    """The RunResult of a run_training summary: its outcome, metrics and run folder's files."""
    run_dir = Path(summary["run_dir"])
    files = {p.name: str(p) for p in sorted(run_dir.iterdir()) if p.is_file()} if run_dir.is_dir() else {}
    return RunResult(Outcome(summary["status"]), dict(summary.get("metrics", {})),
                     {"run_dir": str(run_dir), **files}, run_id)


def prepare_data(configs: list[Config], show_progress: bool) -> None:
    """Generate every synth set the runs need, and check that every COCO folder has its splits,
    now: before the grid's display and workers start, and before a missing folder fails each cell."""
    seen = set()
    for cfg in configs:
        key = (cfg.data.source, cfg.data.root, tuple(sorted(vars(cfg.synth).items())))
        if key not in seen:
            seen.add(key)
            root = builders.data_root(cfg, progress=show_progress)
            for split in (cfg.data.train_split, cfg.data.val_split):
                locate(root, split)


def print_plan(plan: Plan, console: Console) -> None:
    table = Table(title=escape(f"{plan.experiment.name}: {len(plan.runs)} runs "
                               f"({len(plan.runs) - len(plan.todo)} done, {len(plan.todo)} to run)"))
    for column in ("#", "cell", "seed", "config hash", "status"):
        table.add_column(column)
    for run in plan.runs:
        status = f"done ({plan.done[run.config_hash][:8]})" if run.config_hash in plan.done else "to run"
        table.add_row(str(run.cell_index), escape(run.cell), str(run.seed), run.config_hash, status)
    console.print(table)


def run_grid(exp: Experiment, seeds: list[int], overrides: dict[str, Any], *, jobs: int = 1, force: bool = False,
             dry_run: bool = False, console: Console, show_progress: bool = True) -> Counter:
    """Run what is left of the grid; returns the count of each outcome (and of skipped runs)."""
    uri = tracking.init_store()
    tracker = tracking.Tracker(exp.name, uri)
    with ablation_lock(exp.name):
        if not dry_run:
            tracker.close_orphans()
        plan = make_plan(exp, seeds, overrides, tracker, force)
        if dry_run:
            print_plan(plan, console)
            return Counter()
        todo = plan.todo
        console.print(escape(f"{exp.name}: {len(plan.runs)} runs ({len(exp.cells())} cells x {len(seeds)} seeds), "
                             f"{len(plan.runs) - len(todo)} already done, {len(todo)} to run; tracking {uri}"))
        if not todo:
            return Counter()
        prepare_data([run.build_config() for run in todo], show_progress)
        study = scheduling.grid_study(exp.name, scheduling.storage())
        scheduling.reset_queue(study)
        scheduling.enqueue(study, todo)
        parent_id = tracker.start_parent(f"run {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                         {f"{tracking.TAG}seeds": str(seeds), f"{tracking.TAG}jobs": str(jobs)})
        try:
            outcomes = (_run_inline(exp.name, study, len(todo), tracker, parent_id, show_progress, force)
                        if jobs <= 1 else
                        _run_workers(exp, len(todo), jobs, uri, parent_id, show_progress, mode="grid", force=force))
        except KeyboardInterrupt:
            tracker.end_run(parent_id, "KILLED")
            raise
        tracker.end_run(parent_id, "FINISHED")
    return outcomes


def _run_inline(name: str, study, total: int, tracker: tracking.Tracker, parent_id: str, show_progress: bool,
                force: bool) -> Counter:
    outcomes: Counter = Counter()
    with progress_bar(show_progress) as progress:
        grid_task = progress.add_task(escape(name), total=total, info="")

        def run(planned: PlannedRun) -> RunResult | None:
            progress.update(grid_task, info=escape(f"{planned.cell} s{planned.seed}"))
            result = run_tracked(planned, tracker, parent_id, progress if show_progress else None, claim=not force)
            outcomes[_count_key(result)] += 1
            progress.update(grid_task, advance=1, info=escape(_counts(outcomes)))
            return result

        scheduling.work_grid(study, total, run)
    return outcomes


def _count_key(result: RunResult | None) -> str:
    return SKIPPED if result is None else str(result.outcome)


def _counts(outcomes: Counter) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()))


# ----------------------------------------------------------------------------- worker processes


def _worker_main(mode: str, exp: Experiment, share: int, uri: str, parent_id: str, cwd: str, threads: int,
                 messages, worker: int, options: dict) -> None:
    """Entry of a worker process: pull `share` trials and report progress on `messages`. The
    experiment comes pickled from the coordinator (the file is not read again); a grid worker
    trains each trial's PlannedRun as planned."""
    import torch

    os.chdir(cwd)
    torch.set_num_threads(threads)
    tracker = tracking.Tracker(exp.name if mode == "grid" else f"{exp.name}-search", uri)

    def on_log(step: int, metrics: dict[str, float]) -> None:
        messages.put((worker, "step", step))

    if mode == "grid":
        study = scheduling.grid_study(exp.name, scheduling.storage())

        def run(planned: PlannedRun) -> RunResult | None:
            # A cell may set its own schedule: the worker's bar takes the cell's iterations.
            messages.put((worker, "start", (f"{planned.cell} s{planned.seed}", planned.config["train.iterations"])))
            result = run_tracked(planned, tracker, parent_id, None, on_log=on_log, claim=not options["force"])
            messages.put((worker, "end", _count_key(result)))
            return result

        scheduling.work_grid(study, share, run)
    else:
        _search_work(exp, share, tracker, parent_id, options, None, messages, worker)


def _run_workers(exp: Experiment, total: int, jobs: int, uri: str, parent_id: str, show_progress: bool,
                 mode: str, **options) -> Counter:
    """`jobs` processes pulling trials; this process only draws the progress. A worker reports
    ("start", (label, iterations)), ("step", iteration) and ("end", outcome) messages."""
    ctx = mp.get_context("spawn")  # fork would copy torch's thread pools and locks
    messages = ctx.Queue()
    shares = [total // jobs + (1 if w < total % jobs else 0) for w in range(jobs)]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    procs = [ctx.Process(target=_worker_main, args=(mode, exp, share, uri, parent_id, os.getcwd(), threads,
                                                    messages, w, options), daemon=False)
             for w, share in enumerate(shares) if share]
    for p in procs:
        p.start()
    outcomes: Counter = Counter()
    try:
        with progress_bar(show_progress) as progress:
            grid_task = progress.add_task(escape(exp.name), total=total, info="")
            tasks = {w: progress.add_task(f"worker {w}", total=None, info="") for w in range(len(procs))}
            while any(p.is_alive() for p in procs) or not messages.empty():
                try:
                    worker, kind, value = messages.get(timeout=0.5)
                except queue_lib.Empty:
                    continue
                if kind == "start":
                    label, iterations = value
                    progress.reset(tasks[worker], total=iterations, info=escape(label))
                elif kind == "step":
                    progress.update(tasks[worker], completed=value)
                elif kind == "end":
                    outcomes[value] += 1
                    progress.update(grid_task, advance=1, info=escape(_counts(outcomes)))
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    for p in procs:
        p.join()
    crashed = sum(1 for p in procs if p.exitcode != 0)
    if crashed:
        outcomes[WORKER_CRASHED] += crashed
    return outcomes


# ----------------------------------------------------------------------------- search


def _search_work(exp: Experiment, trials: int, tracker: tracking.Tracker, parent_id: str, options: dict,
                 progress: Progress | None, messages=None, worker: int = 0) -> None:
    spec = exp.search
    study = scheduling.search_study(f"{exp.name}-search", scheduling.storage(), spec.direction, options["seed"],
                                    warmup_steps=0)

    def run_trial(number: int, values: dict[str, Any], report) -> RunResult:
        overrides = {**options["extra"], **values}
        planned = PlannedRun.from_config(f"{exp.name}-search", f"trial {number}", number,
                                         exp.base_config(overrides), overrides, list(values))
        iterations = planned.config["train.iterations"]
        eval_every = spec.eval_every or max(1, iterations // 4)
        if messages:
            messages.put((worker, "start", (f"trial {number}", iterations)))

        def on_log(step: int, metrics: dict[str, float]) -> None:
            if messages:
                messages.put((worker, "step", step))

        # TPE may propose a config twice: each proposal is its own trial, so no claim by hash.
        result = run_tracked(planned, tracker, parent_id, progress, on_log=on_log, eval_every=eval_every,
                             on_eval=lambda step, m: report(step, m[spec.metric]), claim=False)
        if messages:
            messages.put((worker, "end", str(result.outcome)))
        return result

    scheduling.work_search(study, trials, spec.space, run_trial)


def run_search(exp: Experiment, trials: int, extra: dict[str, Any], *, jobs: int = 1, seed: int = 0,
               console: Console, show_progress: bool = True) -> tuple[dict[str, Any], float] | None:
    """TPE over the experiment's [search] space; returns the best (params, value) so far."""
    if exp.search is None or not exp.search.space:
        raise AblateError(f"{exp.path}: no [search.space] table: nothing to search")
    uri = tracking.init_store()
    name = f"{exp.name}-search"
    tracker = tracking.Tracker(name, uri)
    with ablation_lock(name):
        prepare_data([exp.base_config(extra)], show_progress)
        study = scheduling.search_study(name, scheduling.storage(), exp.search.direction, seed, warmup_steps=0)
        scheduling.reset_queue(study)
        parent_id = tracker.start_parent(f"search {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                         {f"{tracking.TAG}trials": str(trials)})
        options = {"extra": extra, "seed": seed}
        try:
            if jobs <= 1:
                with progress_bar(show_progress) as progress:
                    _search_work(exp, trials, tracker, parent_id, options, progress if show_progress else None)
            else:
                _run_workers(exp, trials, jobs, uri, parent_id, show_progress, mode="search", **options)
        except KeyboardInterrupt:
            tracker.end_run(parent_id, "KILLED")
            raise
        tracker.end_run(parent_id, "FINISHED")
        return scheduling.best_trial(study)
