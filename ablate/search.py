"""`ablate search`: Optuna's TPE over the space an experiment's [search] table declares.

Each trial is a planned run of its own (TPE may propose a config twice: no claim by config hash),
trained and tracked like a grid's cell by ablate.workers, and pruned on its intermediate AP. The
study lives in the same store as the grid queues (ablate.scheduling); `--jobs N` runs trials in
N worker processes.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import Progress

from ablate import scheduling, signals, tracking, workers
from ablate.config import SEED_LIMIT
from ablate.engine import progress_bar
from ablate.errors import AblateError
from ablate.experiments import Experiment
from ablate.grid import prepare_data
from ablate.runs import Outcome, PlannedRun, RunRecord
from ablate.workers import WorkerOptions


def work_trials(name: str, options: WorkerOptions, *, exp: Experiment, trials: int, extra: dict[str, Any],
                seed: int, parent_id: str, stop=None, progress: Progress | None = None, messages=None,
                worker: int = 0) -> None:
    """Run `trials` TPE trials of the experiment's [search] space (in this process)."""
    spec = exp.search
    study = scheduling.search_study(name, scheduling.storage(options.storage), spec.direction, seed, warmup_steps=0)
    tracker = tracking.Tracker(name, options.tracking_uri)

    def run_trial(number: int, values: dict[str, Any], report) -> RunRecord:
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
    with scheduling.folder_lock(name):
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
                    work_trials(name, options, trials=trials, stop=stop,
                                progress=progress if show_progress else None, **args)
                    stopped = stop()
            else:
                shares = [trials // jobs + (1 if w < trials % jobs else 0) for w in range(jobs)]
                outcomes = workers.run_processes(work_trials, name, jobs, options, show_progress, total=trials,
                                                 shares=shares, **args)
                stopped = bool(outcomes.get(str(Outcome.INTERRUPTED)))
        except KeyboardInterrupt:
            tracker.end_parent(parent_id, "KILLED")
            raise
        tracker.end_parent(parent_id, "KILLED" if stopped else "FINISHED")
        if stopped:
            raise KeyboardInterrupt  # the CLI's one line and exit code 130
        return scheduling.best_trial(study)
