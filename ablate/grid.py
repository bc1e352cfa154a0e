"""Run an experiment: plan its runs, enqueue what is not done, and work the queue.

`run_grid` is the coordinator: it plans every cell x seed as a `PlannedRun`, asks the tracking
store which are done (by config hash), and enqueues the rest, idempotently: a second
coordinator, or the same command again, enqueues nothing that is already queued, running or done.
Then it works the queue with `jobs` workers of its own (ablate.workers), or with none
(`--jobs 0`, the default with a shared `--storage`) for `ablate worker` processes on any machine
to drain. ablate.search is the same machinery with TPE proposing the configs.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ablate import builders, scheduling, tracking, workers
from ablate.config import Config
from ablate.errors import mask_url
from ablate.experiments import Experiment
from ablate.paths import check_writable_folder
from ablate.runs import PlannedRun, runs_frame
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


def show(exp: Experiment, seeds: list[int], given: dict[str, Any] | None, say: Callable[[str], None],
         out: Console) -> None:
    """`ablate show`: the plan (each cell x seed, its config hash, done or to run) and each cell's
    overrides, with `given` overrides, else those the tracked runs were made with (said)."""
    from ablate.cell_runs import command_flags, resolve_overrides

    tracker = tracking.Tracker(exp.name, tracking.init_store())
    overrides = resolve_overrides(exp, given, runs_frame(tracker.load_runs()), tracker.override_sets(), "show")
    if overrides and given is None:
        say(f"the tracked runs were made with{command_flags(overrides)}: showing those")
    print_plan(make_plan(exp, seeds, overrides, tracker), out)
    for cell in exp.cells():
        out.print(escape(f"  {cell.name}: {cell.overrides}"), highlight=False)


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
    with contextlib.nullcontext() if shared else scheduling.folder_lock(exp.name):
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
        return workers.run_processes(workers.work, exp.name, jobs, options, show_progress, total=len(todo),
                                     gpus_per_cell=gpus_per_cell)


def open_parent(study, tracker: tracking.Tracker, seeds: list[int], jobs: int,
                overrides: dict[str, Any] | None = None, runs: list[PlannedRun] = (),
                tags: dict[str, str] | None = None) -> str:
    """The grid's MLflow parent run, kept in the study for every worker: the running one when a
    second coordinator joins a grid in progress, else a new one. It remembers the grid's
    overrides (what `ablate report` finds the runs by) and the study its plan (`runs`, done
    ones included: what its summary covers)."""
    parent_id = study.user_attrs.get(scheduling.PARENT_ATTR)
    plan = [[run.cell, run.cell_index, run.config_hash] for run in runs]
    if parent_id and tracker.is_running(parent_id):
        # A second coordinator may plan more seeds: the summary covers both plans.
        known = study.user_attrs.get(scheduling.PLAN_ATTR, [])
        seen = {tuple(entry) for entry in known}
        plan = known + [entry for entry in plan if tuple(entry) not in seen]
    else:
        own = {"seeds": str(seeds), "jobs": str(jobs), "role": tracking.PARENT_ROLE,
               "overrides": json.dumps(overrides or {}, sort_keys=True)}
        parent_id = tracker.start_parent(tracking.parent_run_name(tracker.name),
                                         {**{f"{tracking.TAG}{key}": value for key, value in own.items()},
                                          **(tags or {})})
        study.set_user_attr(scheduling.PARENT_ATTR, parent_id)
    study.set_user_attr(scheduling.PLAN_ATTR, plan)
    return parent_id


def close_orphan_parent(study, tracker: tracking.Tracker) -> None:
    """A parent run left RUNNING by a grid whose queue has nothing waiting or running any more
    (its coordinator or last worker was killed) is closed now, KILLED."""
    parent_id = study.user_attrs.get(scheduling.PARENT_ATTR)
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
    return workers.run_processes(workers.work, name, jobs, options, show_progress, total=None, gpus_per_cell=gpus_per_cell)
