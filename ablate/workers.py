"""Workers: processes that pull planned runs from the queue and train them, tracked.

A worker (`ablate worker NAME`, on any machine, or each process of `ablate run --jobs N`) loops
until the queue is empty: pull a waiting trial, claim its run in the tracking store (skipped when
the store says it is done or owned by a live process), train it, record the result. A run whose
earlier attempt was interrupted (SIGTERM, a dead machine) resumes from that attempt's checkpoint
and continues the same MLflow run. SIGTERM is handled like SIGINT: the current run writes a
checkpoint, ends "interrupted" and goes back to the queue; a second signal stops at once.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import queue as queue_lib
import signal
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from rich.markup import escape
from rich.progress import Progress

from ablate import lease, scheduling, signals, tracking
from ablate.analysis import draw_loss_curve
from ablate.checkpoint import ResumeSpec, discard_resume, sidecar_path
from ablate.distributed import RankLost
from ablate.engine import progress_bar
from ablate.errors import AblateError, check_at_least, mask_urls, one_line
from ablate.runner import WorldSizeMismatch, run_training
from ablate.runs import Outcome, PlannedRun, RunRecord



@dataclass(frozen=True)
class WorkerOptions:
    """What every worker of a grid needs besides the queue's name."""

    tracking_uri: str
    storage: str | None = None  # the queue's URL; None: this folder's journal
    checkpoint_dir: Path = Path(".ablate/checkpoints")  # shared by every worker that may resume a run
    checkpoint_every: int | None = None  # iterations between resume checkpoints; None: auto, 0: never
    threads: int | None = None  # torch threads of this worker (None: torch's default)
    gpus: str | None = None  # CUDA_VISIBLE_DEVICES of this worker (None: leave it)
    nproc: int = 1  # processes training each run together (DDP; train.nproc)
    stall_timeout: float | None = None  # seconds without progress before a run counts as stalled (lease)


def resolve_options(storage: str | None = None, checkpoint_dir: Path | None = None,
                    checkpoint_every: int | None = None, nproc: int | None = None,
                    stall_timeout: float | None = None) -> WorkerOptions:
    """The settings every worker of a grid shares, from the command's options and the environment,
    each checked now in one line (a bad one would otherwise fail in every worker): the tracking
    store, the queue (reached within seconds, or an error), the checkpoint folder, the processes
    per run and the stall timeout."""
    from ablate import builders, distributed
    from ablate.paths import check_writable_folder

    check_at_least(checkpoint_every, 0, "--checkpoint-every")
    lease.configured_stall_timeout(stall_timeout)
    if distributed.from_env() is not None:
        raise AblateError("a grid's workers start each run's processes themselves: run `ablate run/worker "
                          "--nproc N` without torchrun (torchrun is for `ablate train`)")
    if nproc is not None and nproc != 1:
        distributed.check_nproc(nproc, builders.resolve_device("auto"))
    given = checkpoint_dir or os.environ.get("ABLATE_CHECKPOINT_DIR")
    if given:  # the default, under ./.ablate, is the queue folder's, checked with it
        check_writable_folder(given, "--checkpoint-dir" if checkpoint_dir else "ABLATE_CHECKPOINT_DIR")
    folder = given or Path.cwd() / ".ablate" / "checkpoints"
    url = scheduling.storage_url(storage)
    if url:
        scheduling.storage(url)  # the queue first: one line within seconds if it cannot be reached
    return WorkerOptions(tracking_uri=tracking.init_store(), storage=url,
                         checkpoint_dir=Path(folder).expanduser().resolve(), checkpoint_every=checkpoint_every,
                         nproc=nproc or 1, stall_timeout=stall_timeout)


def auto_checkpoint_every(iterations: int) -> int:
    """A tenth of the run, at least 50 and at most 1,000 iterations: ~10 checkpoints a run, and at
    the paper's 0.2 s/iteration one every ~3.5 minutes (a preempted run loses less than that)."""
    return min(1000, max(50, iterations // 10))


def resume_path(options: WorkerOptions, planned: PlannedRun) -> Path:
    return Path(options.checkpoint_dir) / planned.config_hash / "resume.pt"


def resumable_run_id(path: Path) -> str | None:
    """The tracking run id an interrupted attempt saved beside its checkpoint (the sidecar JSON)."""
    sidecar = sidecar_path(path)
    try:
        return json.loads(sidecar.read_text()).get("meta", {}).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def run_tracked(planned: PlannedRun, tracker: tracking.Tracker, parent_id: str, progress: Progress | None,
                *, options: WorkerOptions | None = None, stop: Callable[[], bool] | None = None, on_log=None,
                eval_every: int = 0, on_eval=None, claim: bool = True) -> RunRecord | None:
    """Train one planned run as an MLflow child run. Returns None when the tracking store says the
    run is done or running elsewhere (`claim`), or when another worker took it over meanwhile;
    never raises for a failing run (it is recorded)."""
    cfg = planned.build_config()
    if options is not None and options.nproc != 1:  # how many processes train it, not what it computes
        cfg = replace(cfg, train=replace(cfg.train, nproc=options.nproc))
    resume = None
    if options is not None and options.checkpoint_every != 0:
        path = resume_path(options, planned)
        every = options.checkpoint_every or auto_checkpoint_every(cfg.train.iterations)
        resume = ResumeSpec(path=path, every=every, meta={})
    previous = resumable_run_id(resume.path) if resume else None
    child = tracker.patiently(lambda: tracker.claim(planned, parent_id, resume_run_id=previous) if claim
                              else tracker.start_child(planned, parent_id), "claiming the run")
    if child is None:
        return None
    try:
        return _train_claimed(planned, cfg, child, progress, resume, previous, stop=stop, on_log=on_log,
                              eval_every=eval_every, on_eval=on_eval)
    finally:
        child.release()  # the heartbeat stops however the run ended


def _train_claimed(planned: PlannedRun, cfg, child: tracking.ChildRun, progress: Progress | None,
                   resume: ResumeSpec | None, previous: str | None, *, stop, on_log, eval_every: int,
                   on_eval) -> RunRecord | None:
    """run_tracked's part once the run is this worker's: train, record, and record failures."""
    if resume is not None:
        if previous and previous != child.run_id:  # the checkpoint belongs to a run we did not take over
            discard_resume(resume.path)
        child.flush_on_checkpoint = True
        resume = replace(resume, meta={"run_id": child.run_id}, on_saved=lambda iteration: child.flush())

    def log(step: int, metrics: dict[str, float]) -> None:
        child.log_step(step, metrics)
        if on_log:
            on_log(step, metrics)

    def evaluate(step: int, metrics: dict[str, float]) -> bool:
        child.log_metrics({f"val_{k}": v for k, v in metrics.items() if k in ("AP", "AP50")}, step)
        return bool(on_eval and on_eval(step, metrics))

    try:
        run = run_training(cfg, name=planned.name.replace(" ", "_"), console=None,
                           show_progress=progress is not None, progress=progress, on_log=log,
                           eval_every=eval_every, on_eval=evaluate if on_eval else None, resume=resume, stop=stop)
        draw_loss_curve(run.run_dir, planned.name.replace(" ", "_"))  # before record() logs the folder's files
        return record(child, run, resume)
    except tracking.LostClaim:  # taken for dead and taken over: the other worker records the run
        return None
    except tracking.TrackingUnreachable as e:  # the checkpoint stays; the cell goes back to the queue
        print(f"error: {planned.experiment}: run '{planned.name}' left to resume: {one_line(e)}", file=sys.stderr,
              flush=True)
        return RunRecord(Outcome.INTERRUPTED, run_id=child.run_id, error=one_line(e))
    except KeyboardInterrupt:
        with contextlib.suppress(tracking.LostClaim):
            child.end(Outcome.INTERRUPTED)
        raise
    except Exception as e:  # one failing cell must never lose the others: record it and go on
        error = mask_urls(one_line(e))
        # The rerun starts afresh: a checkpoint that cannot be read must not block it. One written by
        # another number of processes is good: it waits for a worker with as many (--nproc), and so
        # is the checkpoint of a run whose rank died: it goes back to the queue to resume from it.
        retry = isinstance(e, RankLost)
        if resume is not None and not isinstance(e, (WorldSizeMismatch, RankLost)):
            discard_resume(resume.path)
        try:
            child.set_tags({"error": error[:500]})
            child.end(Outcome.FAILED)
        except tracking.LostClaim:
            return None
        except tracking.TrackingUnreachable:
            pass  # the failure is said on the console; the cell is rerun
        return RunRecord(Outcome.FAILED, run_id=child.run_id, error=error, retry=retry)


def record(child: tracking.ChildRun, run: RunRecord, resume: ResumeSpec | None) -> RunRecord:
    """Log a run's final metrics and files and close it; the resume checkpoint of a run that is
    over goes (an interrupted run keeps it for the next attempt). Returns the record with its
    run id and files."""
    run.run_id, run.artifacts = child.run_id, folder_files(Path(run.run_dir))
    if run.resumed_from is not None:
        child.set_tags({"resumed_from": run.resumed_from})
    if run.processes > 1:  # trained by several processes (DDP); one run all the same
        child.set_tags({"processes": run.processes})
    if run.outcome is not Outcome.INTERRUPTED:
        final = {"train_seconds": run.train_seconds, "bg_per_fg": run.anchors["bg_per_fg"],
                 "fg_per_image": run.anchors["fg_per_image"], **run.metrics}
        if run.diverged_at is not None:
            final["diverged_at"] = run.diverged_at
        child.log_metrics(final, run.iterations)
        child.set_tags({"run_dir": run.run_dir})
        child.log_artifacts(Path(run.run_dir))
    child.end(run.outcome, history=read_history(Path(run.run_dir) / "metrics.jsonl"))
    if resume is not None and run.outcome is not Outcome.INTERRUPTED:
        discard_resume(resume.path)
    return run


def read_history(path: Path) -> list[dict[str, float]]:
    """The logged lines of a run (metrics.jsonl; a resumed run's hold the whole run, each once)."""
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def folder_files(run_dir: Path) -> dict[str, str]:
    """{"run_dir": the folder, file name: path for each file in it}."""
    files = {p.name: str(p) for p in sorted(run_dir.iterdir()) if p.is_file()} if run_dir.is_dir() else {}
    return {"run_dir": str(run_dir), **files}


def count_key(result: RunRecord | None) -> str:
    return str(Outcome.SKIPPED if result is None else result.outcome)


def counts_text(outcomes: Counter) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()))


def exit_code(outcomes: Counter) -> int:
    """What `ablate run/worker` exits with: 130 when a run was interrupted, 4 when one failed or a
    worker process crashed (the others' results are kept), else 0."""
    if outcomes.get(Outcome.INTERRUPTED):
        return 130
    return 4 if outcomes.get(Outcome.FAILED) or outcomes.get(Outcome.WORKER_CRASHED) else 0


# ----------------------------------------------------------------------------- the worker loop


def open_queue(name: str, storage: str | None) -> tuple[scheduling.optuna.Study, str]:
    """The grid's study and its parent run id, as the coordinator left them."""
    study = scheduling.load_grid_study(name, scheduling.storage(storage))
    parent_id = study.user_attrs.get(scheduling.PARENT_ATTR)
    if not parent_id:
        raise AblateError(f"queue '{name}': no grid was planned into it; run `ablate run {name}` first")
    return study, parent_id


def work(name: str, options: WorkerOptions, *, stop: Callable[[], bool], progress: Progress | None = None,
         on_start=None, on_step=None, on_end=None) -> Counter:
    """Pull and train runs of grid `name` until its queue is empty or `stop()`; returns the count
    of outcomes. `on_start(planned)`, `on_step(iteration)`, `on_end(key)` report progress."""
    study, parent_id = open_queue(name, options.storage)
    tracking.bound_client_retries()
    tracker = tracking.Tracker(name, options.tracking_uri)
    lease.LEASE.stall_timeout = lease.configured_stall_timeout(options.stall_timeout)
    outcomes: Counter = Counter()
    unreachable = False

    def run(planned: PlannedRun) -> RunRecord | None:
        nonlocal unreachable
        lease.LEASE.label = f"{planned.experiment}: run '{planned.name}' ({planned.config_hash})"
        if on_start:
            on_start(planned)
        try:
            result = run_tracked(planned, tracker, parent_id, progress, options=options, stop=stop,
                                 on_log=(lambda step, _m: on_step(step)) if on_step else None,
                                 claim=not planned.force)
        except tracking.TrackingUnreachable as e:  # before the run was claimed: it waits in the queue
            print(f"error: {planned.experiment}: run '{planned.name}' left in the queue: {one_line(e)}",
                  file=sys.stderr, flush=True)
            result = RunRecord(Outcome.INTERRUPTED, error=one_line(e))
        if result is not None and result.outcome is Outcome.INTERRUPTED and result.error:
            unreachable = True  # this worker stops: the next cell would wait for the server as long
        if result is not None and result.outcome is Outcome.FAILED:
            report_failure(planned, result)
        outcomes[count_key(result)] += 1
        if on_end:
            on_end(count_key(result))
        return result

    scheduling.work_grid(study, None, run, stop=lambda: stop() or unreachable)
    if not unreachable:
        close_parent_if_over(study, tracker, parent_id, name)
    return outcomes


def report_failure(planned: PlannedRun, result: RunRecord) -> None:
    """A failed cell's reason on the console, not only in its run's error tag: the grid goes on, so
    this line is all the user sees of it before the summary (stderr: a worker process's is the
    terminal's, and a live progress display prints it above the bars)."""
    print(f"error: {planned.experiment}: run '{planned.name}' ({planned.config_hash}) failed: {result.error}",
          file=sys.stderr, flush=True)


def close_parent_if_over(study, tracker: tracking.Tracker, parent_id: str, name: str) -> None:
    """The grid's parent run ends FINISHED, its summary written on it, when nothing waits or runs
    in its queue any more."""
    if scheduling.pending(study) != 0:
        return
    try:
        if tracker.is_running(parent_id):
            plan = [tuple(entry) for entry in study.user_attrs.get(scheduling.PLAN_ATTR, [])]
            # Imported here: the report's statistics (scipy, pandas) cost every worker ~1.5 s of
            # start-up, and only the worker that closes the grid needs them.
            from ablate.grid_summary import write_grid_summary

            write_grid_summary(tracker, parent_id, plan, name)
    finally:
        tracker.end_parent(parent_id, "FINISHED")


def work_in_this_process(name: str, options: WorkerOptions, show_progress: bool) -> Counter:
    """One worker in this process, with a bar for the grid and one for the current run."""
    with signals.graceful_stop() as stop, progress_bar(show_progress) as progress:
        task = progress.add_task(escape(name), total=None, info="")
        seen: Counter = Counter()

        def on_start(planned: PlannedRun) -> None:
            progress.update(task, info=escape(f"{planned.cell} s{planned.seed}"))

        def on_end(key: str) -> None:
            seen[key] += 1
            progress.update(task, advance=1, info=escape(counts_text(seen)))

        return work(name, options, stop=stop, progress=progress if show_progress else None,
                    on_start=on_start, on_end=on_end)


# ----------------------------------------------------------------------------- worker processes


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out: CUDA_VISIBLE_DEVICES's entries, else every device."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


# What one CPU worker of the tiny preset holds at its peak, with room to spare (measured: see
# docs/speed.md "Grid throughput" and benchmarks/grid_time.py); caps the default number of workers on small machines.
WORKER_MEMORY = 2 * 2**30


def default_jobs(runs: int, nproc: int = 1, gpus_per_cell: int = 1, visible: list[str] | None = None,
                 cores: int | None = None, available_memory: int | None = None) -> int:
    """Workers for `runs` runs when --jobs is not given: one per group of `gpus_per_cell` GPUs
    where there are GPUs; on CPU one per `nproc` cores, as many as memory allows. Never more than
    the runs, never fewer than 1.

    One worker per core, each with one thread, because small models scale across processes better
    than across threads: on 2 cores two 1-thread workers did 1.3x the runs per hour of one 2-thread
    worker (tiny preset; docs/speed.md). $ABLATE_JOBS, when set, replaces the machine's count."""
    configured = os.environ.get("ABLATE_JOBS", "").strip()
    if configured:
        if not configured.isdigit() or int(configured) < 1:
            raise AblateError(f"$ABLATE_JOBS: expected a number of workers >= 1, got {configured!r}")
        return max(1, min(runs, int(configured)))
    visible = visible_gpus() if visible is None else visible
    if visible:
        slots = len(visible) // max(1, gpus_per_cell, nproc)
    else:
        import psutil

        cores = cores or os.cpu_count() or 1
        memory = psutil.virtual_memory().available if available_memory is None else available_memory
        slots = min(cores // max(1, nproc), memory // WORKER_MEMORY)
    return max(1, min(runs, slots))


def gpu_assignment(jobs: int, gpus_per_cell: int, visible: list[str]) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each of `jobs` workers: disjoint groups of `gpus_per_cell` GPUs.
    No GPU at all: None for every worker (they train on the CPU)."""
    if not visible:
        return [None] * jobs
    if gpus_per_cell < 1:
        raise AblateError(f"--gpus-per-cell must be >= 1, got {gpus_per_cell}")
    if jobs * gpus_per_cell > len(visible):
        raise AblateError(f"--jobs {jobs} x --gpus-per-cell {gpus_per_cell} needs {jobs * gpus_per_cell} GPUs; "
                          f"this machine has {len(visible)} ({','.join(visible)})")
    return [",".join(visible[w * gpus_per_cell:(w + 1) * gpus_per_cell]) for w in range(jobs)]


def _process_main(target: Callable[..., object], name: str, options: WorkerOptions, cwd: str, messages,
                  worker: int, extra: dict) -> None:
    """Entry of a worker process: its GPUs, threads and folder, then the loop `target` (`work`, or
    ablate.search's `work`), with progress sent to the parent as ("start", (label, iterations)),
    ("step", i), ("end", key)."""
    if options.gpus is not None:  # before anything touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = options.gpus
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the parent passes a hangup on as SIGTERM (signals.forward_to)
    import torch

    os.chdir(cwd)
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        with signals.graceful_stop() as stop:
            if target is work:
                work(name, options, stop=stop,
                     on_start=lambda p: messages.put((worker, "start", (f"{p.cell} s{p.seed}", p.config["train.iterations"]))),
                     on_step=lambda step: messages.put((worker, "step", step)),
                     on_end=lambda key: messages.put((worker, "end", key)))
            else:  # a search: its trials report themselves, `shares[worker]` of them
                shares = extra.pop("shares")
                target(name, options, stop=stop, messages=messages, worker=worker, trials=shares[worker], **extra)
    except AblateError as e:  # a user error: one line, as the CLI would print it, never a traceback
        print(f"error: worker {worker}: {mask_urls(one_line(e))}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a second signal: stopped at once, runs closed as interrupted
        sys.exit(130)


def run_processes(target: Callable[..., object], name: str, jobs: int, options: WorkerOptions, show_progress: bool,
                  total: int | None, gpus_per_cell: int = 1, **extra) -> Counter:
    """`jobs` worker processes, each with its own GPUs (when there are any) and an equal share of
    the CPU threads; this process only draws the progress and forwards a stop."""
    gpus = gpu_assignment(jobs, gpus_per_cell, visible_gpus())
    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = mp.get_context("spawn")  # fork would copy torch's thread pools and locks
    messages = ctx.Queue()
    args = [(target, name, replace(options, threads=threads, gpus=gpus[w]), os.getcwd(), messages, w, dict(extra))
            for w in range(jobs)]
    procs = [ctx.Process(target=_process_main, daemon=False, args=args[w]) for w in range(jobs)]
    for p in procs:
        p.start()
    outcomes: Counter = Counter()
    with signals.forward_to(procs) as stop, progress_bar(show_progress) as progress:
        grid_task = progress.add_task(escape(name), total=total, info="")
        tasks = {w: progress.add_task(f"worker {w}", total=None, info="") for w in range(jobs)}
        while True:
            for w, p in enumerate(procs):  # a process ended for a stalled run: a fresh one takes its place
                if p.exitcode == lease.STALLED_EXIT and not stop():
                    outcomes[str(Outcome.STALLED)] += 1
                    procs[w] = ctx.Process(target=_process_main, daemon=False, args=args[w])
                    procs[w].start()
            if not any(p.is_alive() for p in procs) and messages.empty():
                break
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
                progress.update(grid_task, advance=1, info=escape(counts_text(outcomes)))
    for p in procs:
        p.join()
    crashed = sum(1 for p in procs if p.exitcode not in (0, 130, -signal.SIGTERM, lease.STALLED_EXIT))
    if crashed:
        outcomes[str(Outcome.WORKER_CRASHED)] += crashed
    return outcomes
