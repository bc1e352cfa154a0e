"""Run an experiment: its cells x seeds as enqueued Optuna trials, each tracked as an MLflow child run.

`run_grid` plans (which cells are already done, by config hash), enqueues what is left, and runs it
in this process or in `jobs` worker processes. A cell that crashes is recorded as failed and the
grid goes on; a diverged cell is a result and is recorded as such. `run_search` is the same
machinery with TPE proposing the configs.
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
from rich.progress import Progress
from rich.table import Table

from ablate import builders, scheduling, tracking
from ablate.config import Config, config_hash, flatten
from ablate.data.coco import locate
from ablate.engine import progress_bar
from ablate.errors import AblateError, one_line
from ablate.experiments import Cell, Experiment, load_experiment
from ablate.runner import run_training


@dataclass
class Plan:
    experiment: Experiment
    items: list[dict[str, Any]]  # every cell x seed, in order
    done: dict[str, str] = field(default_factory=dict)  # config hash -> run id

    @property
    def todo(self) -> list[dict[str, Any]]:
        return [item for item in self.items if item["hash"] not in self.done]


def make_plan(exp: Experiment, seeds: list[int], extra: dict[str, Any], tracker: tracking.Tracker | None,
              force: bool = False) -> Plan:
    items = []
    for cell in exp.cells():
        for seed in seeds:
            cfg = exp.cell_config(cell, extra, seed)
            values = flatten(cfg)  # typed as the config coerced them (e.g. gamma 0 -> 0.0)
            items.append({"cell": cell.name, "cell_index": cell.index, "seed": seed, "hash": config_hash(cfg),
                          "extra": extra, "params": {"seed": seed, **{k: values[k] for k in cell.overrides}}})
    done = {} if force or tracker is None else tracker.done_runs()
    return Plan(exp, items, {h: r for h, r in done.items() if h in {i["hash"] for i in items}})


def run_name(cfg: Config, cell: Cell | str, seed: int | None) -> str:
    """'focal g=2 a=0.25 s0': the loss first when the cell's name does not say it."""
    name = cell.name if isinstance(cell, Cell) else cell
    prefix = "" if name.split(" ")[0] in (cfg.loss.cls, "ohem") else f"{cfg.loss.cls} "
    return f"{prefix}{name}" + (f" s{seed}" if seed is not None else "")


@contextlib.contextmanager
def ablation_lock(name: str):
    """One `ablate run`/`search` per ablation at a time: the stale-trial cleanup relies on it."""
    path = scheduling.state_dir() / f"{name}.lock"
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AblateError(f"{path}: another `ablate run/search {name}` is running in this folder") from None
        yield


def run_tracked(cfg: Config, name: str, tags: dict[str, Any], tracker: tracking.Tracker, parent_id: str,
                progress: Progress | None, show_progress: bool, on_log=None, eval_every: int = 0,
                on_eval=None) -> tuple[str, float | None]:
    """Train `cfg` as one MLflow child run; never raises for a failing run (it is recorded)."""
    child = tracker.start_child(parent_id, name, flatten(cfg), {**tags, "config_hash": config_hash(cfg)})

    def log(step: int, metrics: dict[str, float]) -> None:
        child.log_step(step, metrics)
        if on_log:
            on_log(step, metrics)

    def evaluate(step: int, metrics: dict[str, float]) -> bool:
        child.log_metrics({f"val_{k}": v for k, v in metrics.items() if k in ("AP", "AP50")}, step)
        return bool(on_eval and on_eval(step, metrics))

    try:
        summary = run_training(cfg, name=name.replace(" ", "_"), console=None, show_progress=show_progress,
                               progress=progress, on_log=log, eval_every=eval_every,
                               on_eval=evaluate if on_eval else None)
    except KeyboardInterrupt:
        child.end("interrupted")
        raise
    except Exception as e:  # one failing cell must never lose the others: record it and go on
        child.set_tags({"error": one_line(e)[:500]})
        child.end("failed")
        return "failed", None
    final = {"train_seconds": summary["train_seconds"], "bg_per_fg": summary["anchors"]["bg_per_fg"],
             "fg_per_image": summary["anchors"]["fg_per_image"], **summary.get("metrics", {})}
    if summary["diverged_at"] is not None:
        final["diverged_at"] = summary["diverged_at"]
    child.log_metrics(final, summary["iterations"])
    child.set_tags({"run_dir": summary["run_dir"]})
    child.log_artifacts(Path(summary["run_dir"]))
    child.end(summary["status"])
    return summary["status"], summary.get("metrics", {}).get("AP")


def item_config(exp: Experiment, item: dict[str, Any]) -> tuple[Cell, Config]:
    """The cell of a planned item and its full config (the item's seed and extra overrides)."""
    cell = next(c for c in exp.cells() if c.name == item["cell"])
    return cell, exp.cell_config(cell, item["extra"], item["seed"])


def _run_item(exp: Experiment, item: dict[str, Any], tracker: tracking.Tracker, parent_id: str,
              progress: Progress | None, on_log=None) -> tuple[str, float | None]:
    cell, cfg = item_config(exp, item)
    tags = {"cell": cell.name, "cell_index": cell.index, "seed": item["seed"]}
    return run_tracked(cfg, run_name(cfg, cell, item["seed"]), tags, tracker, parent_id, progress,
                       show_progress=progress is not None, on_log=on_log)


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
    table = Table(title=f"{plan.experiment.name}: {len(plan.items)} runs "
                  f"({len(plan.items) - len(plan.todo)} done, {len(plan.todo)} to run)")
    for column in ("#", "cell", "seed", "config hash", "status"):
        table.add_column(column)
    for item in plan.items:
        status = f"done ({plan.done[item['hash']][:8]})" if item["hash"] in plan.done else "to run"
        table.add_row(str(item["cell_index"]), item["cell"], str(item["seed"]), item["hash"], status)
    console.print(table)


def run_grid(exp: Experiment, seeds: list[int], extra: dict[str, Any], *, jobs: int = 1, force: bool = False,
             dry_run: bool = False, console: Console, show_progress: bool = True) -> Counter:
    """Run what is left of the grid; returns the count of each outcome."""
    uri = tracking.init_store()
    tracker = tracking.Tracker(exp.name, uri)
    with ablation_lock(exp.name):
        if not dry_run:
            tracker.close_orphans()
        plan = make_plan(exp, seeds, extra, tracker, force)
        if dry_run:
            print_plan(plan, console)
            return Counter()
        todo = plan.todo
        console.print(f"{exp.name}: {len(plan.items)} runs ({len(exp.cells())} cells x {len(seeds)} seeds), "
                      f"{len(plan.items) - len(todo)} already done, {len(todo)} to run; tracking {uri}")
        if not todo:
            return Counter()
        prepare_data([exp.cell_config(c, extra) for c in exp.cells()], show_progress)
        study = scheduling.grid_study(exp.name, scheduling.storage())
        scheduling.reset_queue(study)
        scheduling.enqueue(study, todo)
        parent_id = tracker.start_parent(f"run {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                         {f"{tracking.TAG}seeds": str(seeds), f"{tracking.TAG}jobs": str(jobs)})
        try:
            outcomes = (_run_inline(exp, study, todo, tracker, parent_id, show_progress) if jobs <= 1 else
                        _run_workers(exp, len(todo), jobs, uri, parent_id, show_progress, mode="grid"))
        except KeyboardInterrupt:
            tracker.end_run(parent_id, "KILLED")
            raise
        tracker.end_run(parent_id, "FINISHED")
    return outcomes


def _run_inline(exp: Experiment, study, todo: list[dict], tracker: tracking.Tracker, parent_id: str,
                show_progress: bool) -> Counter:
    outcomes: Counter = Counter()
    with progress_bar(show_progress) as progress:
        grid_task = progress.add_task(exp.name, total=len(todo), info="")

        def run(item: dict[str, Any]) -> tuple[str, float | None]:
            progress.update(grid_task, info=f"{item['cell']} s{item['seed']}")
            outcome, value = _run_item(exp, item, tracker, parent_id, progress if show_progress else None)
            outcomes[outcome] += 1
            progress.update(grid_task, advance=1, info=_counts(outcomes))
            return outcome, value

        scheduling.work_grid(study, len(todo), run)
    return outcomes


def _counts(outcomes: Counter) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()))


# ----------------------------------------------------------------------------- worker processes


def _worker_main(mode: str, exp_path: str, share: int, uri: str, parent_id: str, cwd: str, threads: int,
                 messages, worker: int, search_args: dict | None = None) -> None:
    """Entry of a worker process: pull `share` trials and report progress on `messages`."""
    import torch

    os.chdir(cwd)
    torch.set_num_threads(threads)
    exp = load_experiment(exp_path)
    tracker = tracking.Tracker(exp.name if mode == "grid" else f"{exp.name}-search", uri)

    def on_log(step: int, metrics: dict[str, float]) -> None:
        messages.put((worker, "step", step))

    if mode == "grid":
        study = scheduling.grid_study(exp.name, scheduling.storage())

        def run(item: dict[str, Any]) -> tuple[str, float | None]:
            # A cell may set its own schedule: the worker's bar takes the cell's iterations.
            iterations = item_config(exp, item)[1].train.iterations
            messages.put((worker, "start", (f"{item['cell']} s{item['seed']}", iterations)))
            outcome, value = _run_item(exp, item, tracker, parent_id, None, on_log=on_log)
            messages.put((worker, "end", outcome))
            return outcome, value

        scheduling.work_grid(study, share, run)
    else:
        _search_work(exp, share, tracker, parent_id, search_args or {}, None, messages, worker)


def _run_workers(exp: Experiment, total: int, jobs: int, uri: str, parent_id: str, show_progress: bool,
                 mode: str, search_args: dict | None = None) -> Counter:
    """`jobs` processes pulling trials; this process only draws the progress. A worker reports
    ("start", (label, iterations)), ("step", iteration) and ("end", outcome) messages."""
    ctx = mp.get_context("spawn")  # fork would copy torch's thread pools and locks
    messages = ctx.Queue()
    shares = [total // jobs + (1 if w < total % jobs else 0) for w in range(jobs)]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    procs = [ctx.Process(target=_worker_main, args=(mode, str(exp.path), share, uri, parent_id, os.getcwd(),
                                                    threads, messages, w, search_args), daemon=False)
             for w, share in enumerate(shares) if share]
    for p in procs:
        p.start()
    outcomes: Counter = Counter()
    try:
        with progress_bar(show_progress) as progress:
            grid_task = progress.add_task(exp.name, total=total, info="")
            tasks = {w: progress.add_task(f"worker {w}", total=None, info="") for w in range(len(procs))}
            while any(p.is_alive() for p in procs) or not messages.empty():
                try:
                    worker, kind, value = messages.get(timeout=0.5)
                except queue_lib.Empty:
                    continue
                if kind == "start":
                    label, iterations = value
                    progress.reset(tasks[worker], total=iterations, info=label)
                elif kind == "step":
                    progress.update(tasks[worker], completed=value)
                elif kind == "end":
                    outcomes[value] += 1
                    progress.update(grid_task, advance=1, info=_counts(outcomes))
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    for p in procs:
        p.join()
    crashed = sum(1 for p in procs if p.exitcode != 0)
    if crashed:
        outcomes["worker crashed"] += crashed
    return outcomes


# ----------------------------------------------------------------------------- search


def _search_work(exp: Experiment, trials: int, tracker: tracking.Tracker, parent_id: str, args: dict,
                 progress: Progress | None, messages=None, worker: int = 0) -> None:
    spec = exp.search
    study = scheduling.search_study(f"{exp.name}-search", scheduling.storage(), spec.direction, args["seed"],
                                    warmup_steps=0)

    def run_trial(number: int, overrides: dict[str, Any], report) -> tuple[str, float | None]:
        cfg = exp.base_config({**args["extra"], **overrides})
        eval_every = spec.eval_every or max(1, cfg.train.iterations // 4)
        if messages:
            messages.put((worker, "start", (f"trial {number}", cfg.train.iterations)))

        def on_log(step: int, metrics: dict[str, float]) -> None:
            if messages:
                messages.put((worker, "step", step))

        outcome, value = run_tracked(cfg, f"trial {number}", {"cell": f"trial {number}", "cell_index": number,
                                                              "seed": cfg.train.seed, "trial": number},
                                     tracker, parent_id, progress, show_progress=progress is not None,
                                     on_log=on_log, eval_every=eval_every,
                                     on_eval=lambda step, m: report(step, m[spec.metric]))
        if messages:
            messages.put((worker, "end", outcome))
        return outcome, value

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
        args = {"extra": extra, "seed": seed}
        try:
            if jobs <= 1:
                with progress_bar(show_progress) as progress:
                    _search_work(exp, trials, tracker, parent_id, args, progress if show_progress else None)
            else:
                _run_workers(exp, trials, jobs, uri, parent_id, show_progress, mode="search", search_args=args)
        except KeyboardInterrupt:
            tracker.end_run(parent_id, "KILLED")
            raise
        tracker.end_run(parent_id, "FINISHED")
        return scheduling.best_trial(study)
