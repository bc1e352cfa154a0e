"""Run an experiment: plan its runs, enqueue what is not done, and work the queue.

`run_grid` is the coordinator: it plans every cell x seed as a `PlannedRun`, asks the tracking
store which are done (by config hash), and enqueues the rest, idempotently: a second
coordinator, or the same command again, enqueues nothing that is already queued, running or done.
Then it works the queue with `jobs` workers of its own (ablate.workers), or with none
(`--jobs 0`, the default with a shared `--storage`) for `ablate worker` processes on any machine
to drain. `run_search` is the same machinery with TPE proposing the configs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from ablate import builders, scheduling, signals, tracking, workers
from ablate.config import SEED_LIMIT, Config
from ablate.engine import progress_bar
from ablate.errors import AblateError, mask_url
from ablate.experiments import Experiment
from ablate.paths import check_writable_folder
from ablate.runs import Outcome, PlannedRun, RunResult
from ablate.workers import WorkerOptions


@dataclass
class Plan:
    experiment: Experiment
    runs: list[PlannedRun]  # every cell x seed, in order
    done: dict[str, str] = field(default_factory=dict)  # config hash -> run id, from the tracking store

    @property
    def todo(self) -> list[PlannedRun]:
        return [run for run in self.runs if run.config_hash not in self.done]


def make_plan(exp: Experiment, seeds: list[int], overrides: dict[str, Any], tracker: tracking.Tracker | None,
              force: bool = False, select: Callable[[PlannedRun], bool] | None = None) -> Plan:
    """Every cell x seed (only those `select` keeps, e.g. the runs an adaptive round asks for)."""
    runs = [run for run in exp.planned_runs(seeds, overrides) if select is None or select(run)]
    if force:
        return Plan(exp, [replace(run, force=True) for run in runs])
    done = {} if tracker is None else tracker.done_runs()
    return Plan(exp, runs, {r.config_hash: done[r.config_hash] for r in runs if r.config_hash in done})


@contextlib.contextmanager
def folder_lock(name: str):
    """One coordinator per ablation and working folder at a time: the folder's private queue (the
    journal, reset by each `ablate run`) relies on it. A shared queue needs none: its enqueueing
    is idempotent under the queue's own lock."""
    path = scheduling.state_dir() / f"{name}.lock"
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AblateError(f"{path}: another `ablate run/search {name}` is running in this folder") from None
        yield


def prepare_data(configs: list[Config], show_progress: bool) -> None:
    """Generate every synth set the runs need, check that every COCO or VOC source has its splits,
    fetch the trunks' named weights and check that every run folder can be written, now: before the
    grid's display and workers start, and before a missing or unwritable folder (or an offline
    download) fails each cell."""
    seen = set()
    for cfg in configs:
        check_writable_folder(cfg.train.out_dir, "train.out_dir")
        key = json.dumps([vars(cfg.data), vars(cfg.synth), cfg.model.trunk, cfg.model.weights], sort_keys=True)
        if key not in seen:
            seen.add(key)
            root = builders.data_root(cfg, progress=show_progress)
            for split in (cfg.data.train_split, cfg.data.val_split):
                builders.check_split(cfg.data, root, split)
            builders.fetch_weights(cfg)


def print_plan(plan: Plan, console: Console) -> None:
    table = Table(title=escape(f"{plan.experiment.name}: {len(plan.runs)} runs "
                               f"({len(plan.runs) - len(plan.todo)} done, {len(plan.todo)} to run)"))
    for column in ("#", "cell", "seed", "config hash", "status"):
        table.add_column(column)
    for run in plan.runs:
        status = f"done ({plan.done[run.config_hash][:8]})" if run.config_hash in plan.done else "to run"
        table.add_row(str(run.cell_index), escape(run.cell), str(run.seed), run.config_hash, status)
    console.print(table)


def run_grid(exp: Experiment, seeds: list[int], overrides: dict[str, Any], *, options: WorkerOptions,
             jobs: int | None = None, gpus_per_cell: int = 1, force: bool = False, dry_run: bool = False,
             console: Console, show_progress: bool = True, select: Callable[[PlannedRun], bool] | None = None,
             parent_tags: dict[str, str] | None = None) -> Counter:
    """Plan, enqueue what is left, and work the queue with `jobs` workers (None: as many as the
    machine runs at once, `workers.default_jobs`, on this folder's journal; 0 on a shared queue).
    Returns the count of each outcome.

    `select` keeps a subset of the cell x seed runs (ablate.adaptive plans its rounds with it);
    `parent_tags` go on a new parent run (e.g. the stopping rule the runs are judged by)."""
    tracker = tracking.Tracker(exp.name, options.tracking_uri)
    store = scheduling.storage(options.storage)
    shared = scheduling.is_shared(store)
    auto_jobs = jobs is None
    jobs = 0 if shared and auto_jobs else jobs
    with contextlib.nullcontext() if shared else folder_lock(exp.name):
        if not dry_run:
            tracker.close_orphans()
        plan = make_plan(exp, seeds, overrides, tracker, force, select)
        if dry_run:
            print_plan(plan, console)
            return Counter()
        todo = plan.todo
        shape = f"{len(exp.cells())} cells x {len(seeds)} seeds" if select is None else "selected cells x seeds"
        console.print(escape(f"{exp.name}: {len(plan.runs)} runs ({shape}), "
                             f"{len(plan.runs) - len(todo)} already done, {len(todo)} to run; tracking "
                             f"{mask_url(options.tracking_uri)}"), soft_wrap=True)
        tracker.describe(exp.description)
        study = scheduling.grid_study(exp.name, store)
        if not shared:
            scheduling.reset_queue(study)
        # A parent left open by a killed grid: carried on when this folder's grid has work left
        # (its runs resume under it), closed when there is none.
        if shared or not todo:
            close_orphan_parent(study, tracker)
        if not todo:
            return Counter()
        if auto_jobs and not shared:
            jobs = workers.default_jobs(len(todo), options.nproc, gpus_per_cell)
        if jobs:
            prepare_data([run.build_config() for run in todo], show_progress)
        with scheduling.queue_lock(study):  # two coordinators at once: one parent, each run queued once
            fresh = scheduling.enqueue_missing(study, todo)
            open_parent(study, tracker, seeds, jobs, overrides, plan.runs, parent_tags)
        if shared:
            console.print(escape(f"queue {mask_url(options.storage or '')}: enqueued {len(fresh)}, "
                                 f"{len(todo) - len(fresh)} were queued already"), soft_wrap=True)
        if jobs == 0:
            console.print(escape(f"start workers with: ablate worker {exp.name} --storage URL"), soft_wrap=True)
            return Counter()
        if jobs == 1:
            return workers.work_in_this_process(exp.name, options, show_progress)
        return workers.run_processes("grid", exp.name, jobs, options, show_progress, total=len(todo),
                                     gpus_per_cell=gpus_per_cell)


def open_parent(study, tracker: tracking.Tracker, seeds: list[int], jobs: int,
                overrides: dict[str, Any] | None = None, runs: list[PlannedRun] = (),
                tags: dict[str, str] | None = None) -> str:
    """The grid's MLflow parent run, kept in the study for every worker: the running one when a
    second coordinator joins a grid in progress, else a new one. It remembers the grid's
    overrides (what `ablate report` finds the runs by) and the study its plan (`runs`, done
    ones included: what its summary covers)."""
    parent_id = study.user_attrs.get(workers.PARENT_ATTR)
    plan = [[run.cell, run.cell_index, run.config_hash] for run in runs]
    if parent_id and tracker.is_running(parent_id):
        # A second coordinator may plan more seeds: the summary covers both plans.
        known = study.user_attrs.get(workers.PLAN_ATTR, [])
        seen = {tuple(entry) for entry in known}
        plan = known + [entry for entry in plan if tuple(entry) not in seen]
    else:
        own = {"seeds": str(seeds), "jobs": str(jobs), "role": tracking.PARENT_ROLE,
               "overrides": json.dumps(overrides or {}, sort_keys=True)}
        parent_id = tracker.start_parent(tracking.parent_run_name(tracker.name),
                                         {**{f"{tracking.TAG}{key}": value for key, value in own.items()},
                                          **(tags or {})})
        study.set_user_attr(workers.PARENT_ATTR, parent_id)
    study.set_user_attr(workers.PLAN_ATTR, plan)
    return parent_id


def close_orphan_parent(study, tracker: tracking.Tracker) -> None:
    """A parent run left RUNNING by a grid whose queue has nothing waiting or running any more
    (its coordinator or last worker was killed) is closed now, KILLED."""
    parent_id = study.user_attrs.get(workers.PARENT_ATTR)
    if parent_id and tracker.is_running(parent_id) and scheduling.pending(study) == 0:
        tracker.end_parent(parent_id, "KILLED")


def run_worker(name: str, options: WorkerOptions, *, jobs: int | None = None, gpus_per_cell: int = 1,
               show_progress: bool = True) -> Counter:
    """`ablate worker`: pull runs of grid `name` from the queue until it is empty, with `jobs`
    processes (None: as many as this machine runs at once, at most one per run in the queue)."""
    study, _ = workers.open_queue(name, options.storage)  # fails now, in one line, if there is no such grid
    if jobs is None:
        jobs = workers.default_jobs(max(1, scheduling.pending(study)), options.nproc, gpus_per_cell)
    if jobs <= 1:
        gpus = workers.gpu_assignment(1, gpus_per_cell, workers.visible_gpus())[0]
        if gpus is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpus
        return workers.work_in_this_process(name, options, show_progress)
    return workers.run_processes("grid", name, jobs, options, show_progress, total=None, gpus_per_cell=gpus_per_cell)


# ----------------------------------------------------------------------------- search


def search_work(name: str, options: WorkerOptions, *, exp: Experiment, trials: int, extra: dict[str, Any],
                seed: int, parent_id: str, stop=None, progress: Progress | None = None, messages=None,
                worker: int = 0) -> None:
    """Run `trials` TPE trials of the experiment's [search] space (in this process)."""
    spec = exp.search
    study = scheduling.search_study(name, scheduling.storage(options.storage), spec.direction, seed, warmup_steps=0)
    tracker = tracking.Tracker(name, options.tracking_uri)

    def run_trial(number: int, values: dict[str, Any], report) -> RunResult:
        overrides = {**extra, **values}
        planned = PlannedRun.from_config(name, f"trial {number}", number, exp.base_config(overrides), overrides,
                                         list(values))
        iterations = planned.config["train.iterations"]
        eval_every = spec.eval_every or max(1, iterations // 4)
        if messages:
            messages.put((worker, "start", (f"trial {number}", iterations)))

        def on_log(step: int, metrics: dict[str, float]) -> None:
            if messages:
                messages.put((worker, "step", step))

        # TPE may propose a config twice: each proposal is its own trial, so no claim by hash.
        result = workers.run_tracked(planned, tracker, parent_id, progress, stop=stop, on_log=on_log,
                                     eval_every=eval_every, on_eval=lambda step, m: report(step, m[spec.metric]),
                                     claim=False)
        if messages:
            messages.put((worker, "end", str(result.outcome)))
        return result

    scheduling.work_search(study, trials, spec.space, run_trial, stop=stop or (lambda: False))


def check_search(exp: Experiment, trials: int, jobs: int, seed: int) -> None:
    """The arguments of a search, checked before any store opens: one AblateError naming the first bad one."""
    if exp.search is None or not exp.search.space:
        raise AblateError(f"{exp.path}: no [search.space] table: nothing to search")
    if not 0 <= seed < SEED_LIMIT:
        raise AblateError(f"--seed: the sampler's seed must be in [0, 2**32), got {seed}")
    for option, value in (("--trials", trials), ("--jobs", jobs)):
        if value < 1:  # --trials -1 ran nothing and exited 0; --jobs -3 ran on one process
            raise AblateError(f"{option}: must be >= 1, got {value}")


def run_search(exp: Experiment, trials: int, extra: dict[str, Any], *, options: WorkerOptions, jobs: int = 1,
               seed: int = 0, console: Console, show_progress: bool = True) -> tuple[dict[str, Any], float] | None:
    """TPE over the experiment's [search] space; returns the best (params, value) so far."""
    check_search(exp, trials, jobs, seed)
    name = f"{exp.name}-search"
    tracker = tracking.Tracker(name, options.tracking_uri)
    with folder_lock(name):
        prepare_data([exp.base_config(extra)], show_progress)
        store = scheduling.storage(options.storage)
        study = scheduling.search_study(name, store, exp.search.direction, seed, warmup_steps=0)
        if not scheduling.is_shared(store):  # a shared study's running trials are other machines'
            scheduling.reset_queue(study)
        parent_id = tracker.start_parent(tracking.parent_run_name(exp.name, "search"),
                                         {f"{tracking.TAG}trials": str(trials)})
        args = {"exp": exp, "extra": extra, "seed": seed, "parent_id": parent_id}
        try:
            if jobs <= 1:
                with signals.graceful_stop() as stop, progress_bar(show_progress) as progress:
                    search_work(name, options, trials=trials, stop=stop,
                                progress=progress if show_progress else None, **args)
                    stopped = stop()
            else:
                shares = [trials // jobs + (1 if w < trials % jobs else 0) for w in range(jobs)]
                outcomes = workers.run_processes("search", name, jobs, options, show_progress, total=trials,
                                                 shares=shares, **args)
                stopped = bool(outcomes.get(str(Outcome.INTERRUPTED)))
        except KeyboardInterrupt:
            tracker.end_parent(parent_id, "KILLED")
            raise
        tracker.end_parent(parent_id, "KILLED" if stopped else "FINISHED")
        if stopped:
            raise KeyboardInterrupt  # the CLI's one line and exit code 130
        return scheduling.best_trial(study)
