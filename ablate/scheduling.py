"""Everything Optuna: the only module that imports it.

A grid's planned runs (cells x seeds) are the trials of a study named after the ablation, each
*enqueued* with its exact values and the whole `PlannedRun` as a user attribute (the grid sampler,
with several workers, runs duplicates and skips points). The queue holds work only: whether a
run is done is the tracking store's answer, not the trial's state.

Two storages: by default a journal file in the working folder (one machine, nothing to start;
safe for parallel processes where SQLite is not), or an RDB URL (`--storage postgresql://...`,
`ABLATE_STORAGE`) that workers on many machines share. On PostgreSQL a waiting trial is popped
with SELECT ... FOR UPDATE, so two workers never take the same one; a running trial records a
heartbeat while its run advances (ablate.lease), and one whose heartbeat stops is failed and
enqueued again (Optuna's stale-trial retry) for another worker. `ablate search` runs TPE with a median pruner over a declared space.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from ablate.errors import AblateError, mask_url
from ablate.paths import check_writable_folder
from ablate import lease
from ablate.lease import heartbeat_seconds, process_owner
from ablate.runs import Outcome, PlannedRun, RunRecord

PLANNED_ATTR = "ablate_planned_run"  # user attribute: the PlannedRun (JSON) an enqueued trial stands for
OUTCOME_ATTR = "outcome"  # user attribute: how the trial's run ended, for Optuna's dashboard
OWNER_ATTR = "owner"  # user attribute: the worker process that pulled the trial (host:pid:start)
RETRIES_ATTR = "retries"  # user attribute: failed attempts of its run before this trial (a lost rank)
# A stale trial, or a run whose rank died, is enqueued again at most this often: a cell that kills
# every worker that takes it (out of memory, say) must not circle forever.
MAX_RETRIES = 3
PARENT_ATTR = "ablate_parent_run"  # study user attribute: the MLflow parent run of the grid
# Study user attribute: the grid's whole plan, done cells included, as [cell, cell index, config
# hash] triples, so that whichever worker closes the parent run can summarise the grid on it
# (the queue itself only holds what was left to run).
PLAN_ATTR = "ablate_grid_plan"
# Outcomes whose run goes back into the queue at once, to resume from its checkpoint.
REQUEUED = frozenset({Outcome.INTERRUPTED, Outcome.STALLED})

optuna.logging.set_verbosity(logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# Our workers pull with ask/tell and beat the heartbeat themselves (`TrialClaim` below).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

# Runs one planned run; None when the tracking store said it is done or running elsewhere.
RunPlanned = Callable[[PlannedRun], RunRecord | None]


def state_dir() -> Path:
    """./.ablate: the folder's queue journal and locks (made on first use)."""
    check_writable_folder(".ablate", "queue folder")  # relative: the message names it as the user knows it
    path = Path.cwd() / ".ablate"
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def folder_lock(name: str) -> Iterator[None]:
    """One coordinator per ablation and working folder at a time: the folder's private queue (the
    journal, reset by each `ablate run`) relies on it. A shared queue needs none: its enqueueing
    is idempotent under the queue's own lock."""
    path = state_dir() / f"{name}.lock"
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AblateError(f"{path}: another `ablate run/search {name}` is running in this folder") from None
        yield


def storage_url(option: str | None = None) -> str | None:
    """The queue's URL: `--storage`, else $ABLATE_STORAGE, else None (the working folder's journal).

    A database URL only: anything else was taken as a journal file's path, so a typo created a file
    of that name and `/dev/full` was read without end (18 GB until the kernel killed it)."""
    url = option or os.environ.get("ABLATE_STORAGE") or None
    if url is not None and "://" not in url:
        source = "--storage" if option else "ABLATE_STORAGE"
        raise AblateError(f"{source}: expected a database URL (postgresql://HOST:PORT/DB, with USER:PASSWORD@ "
                          f"before HOST), got {url!r}; leave it out for the local queue in ./.ablate")
    return url


def storage(url_or_path: str | Path | None = None) -> BaseStorage:
    """The queue: a journal file (a path, or None for .ablate/optuna.journal) or an RDB URL.

    An RDB URL is checked now, with a 10 s connection timeout: an unreachable server, a wrong
    password or a missing driver is one line naming the URL (password masked).
    """
    if url_or_path is None or isinstance(url_or_path, Path) or "://" not in str(url_or_path):
        path = Path(url_or_path) if url_or_path else state_dir() / "optuna.journal"
        return JournalStorage(JournalFileBackend(str(path)))
    url = str(url_or_path)
    shown = mask_url(url)
    if url.startswith("sqlite"):
        raise AblateError(f"--storage {shown}: SQLite cannot be shared by parallel workers; use PostgreSQL "
                          "(postgresql://USER:PASSWORD@HOST:PORT/DB) or leave --storage out for the local journal")
    beat = heartbeat_seconds()
    engine_kwargs = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
    for attempt in range(3):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=beat, grace_period=lease.grace_seconds(),
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES))
        except ImportError:
            raise AblateError(f"--storage {shown}: no database driver for this URL is installed "
                              "(PostgreSQL: pip install 'psycopg[binary]')") from None
        except Exception as e:  # sqlalchemy's OperationalError & co: unreachable, refused, bad password
            cause = e.__cause__ or e
            reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            # Two processes creating Optuna's tables in a fresh database at once: one of them
            # loses the race on a unique key; the tables exist now, so it opens them on retry.
            if attempt < 2 and ("duplicate key" in reason or "already exists" in reason):
                time.sleep(1.0)
                continue
            raise AblateError(f"--storage {shown}: cannot open the queue: {mask_url(reason)}") from None
    raise AssertionError("unreachable")


def _rdb(store: BaseStorage) -> RDBStorage | None:
    """The RDB storage behind `store` (a study wraps it in Optuna's cache), or None."""
    store = getattr(store, "_backend", store)
    return store if isinstance(store, RDBStorage) else None


def is_shared(store: BaseStorage) -> bool:
    """Whether workers on other machines can share this queue (an RDB storage, not the journal)."""
    return _rdb(store) is not None


def grid_study(name: str, store: BaseStorage) -> optuna.Study:
    return optuna.create_study(study_name=name, storage=store, direction="maximize", load_if_exists=True)


def load_grid_study(name: str, store: BaseStorage) -> optuna.Study:
    """The study a coordinator made for grid `name`; one line when there is none."""
    try:
        return optuna.load_study(study_name=name, storage=store)
    except KeyError:
        raise AblateError(f"no queue named '{name}' in this storage: plan it first with `ablate run {name}`") from None


@contextlib.contextmanager
def queue_lock(study: optuna.Study) -> Iterator[None]:
    """Exclusive access to one study's queue while a coordinator reads and extends it, so that two
    coordinators started at once enqueue each planned run once: a PostgreSQL advisory lock keyed
    by the study name, or a file lock beside the journal."""
    store = _rdb(study._storage)
    key = int.from_bytes(hashlib.sha1(study.study_name.encode()).digest()[:8], "big", signed=True)
    if store is not None and store.engine.dialect.name == "postgresql":
        from sqlalchemy import text

        with store.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                conn.commit()
        return
    with open(state_dir() / f"{study.study_name}.queue.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def queued_hashes(study: optuna.Study) -> set[str]:
    """The config hashes of the planned runs waiting in or running from the queue."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    return {PlannedRun.from_json(t.user_attrs[PLANNED_ATTR]).config_hash for t in trials if PLANNED_ATTR in t.user_attrs}


def enqueue_missing(study: optuna.Study, runs: list[PlannedRun]) -> list[PlannedRun]:
    """Enqueue the planned runs that are neither waiting nor running in the queue; returns them.
    The caller holds `queue_lock(study)`. (Runs already done are the caller's to leave out: that
    is the tracking store's answer.)"""
    queued = queued_hashes(study)
    fresh = [run for run in runs if run.config_hash not in queued]
    enqueue(study, fresh)
    return fresh


def fail_dead_trials(study: optuna.Study) -> int:
    """Fail the running trials whose worker is gone, and enqueue their planned runs again.

    On an RDB storage, Optuna's heartbeats decide (`fail_stale_trials` with the retry callback);
    on the journal, a trial's worker is a process on this machine, checked by its owner attribute
    (lease.is_alive: one rule for both stores).
    Returns how many were failed.
    """
    if is_shared(study._storage):
        before = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        optuna.storages.fail_stale_trials(study)
        return before - len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    # A trial is RUNNING a moment before its worker writes its owner: no owner is no verdict.
    dead = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if OWNER_ATTR in t.user_attrs and not lease.is_alive(t.user_attrs[OWNER_ATTR])]
    failed = 0
    for trial in dead:
        try:  # another worker may fail it first
            study._storage.set_trial_user_attr(trial._trial_id, OUTCOME_ATTR, str(Outcome.WORKER_GONE))
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError):
            continue
        failed += 1
        if PLANNED_ATTR in trial.user_attrs:
            enqueue(study, [PlannedRun.from_json(trial.user_attrs[PLANNED_ATTR])])
    return failed


def pending(study: optuna.Study) -> int:
    """How many trials wait or run: the grid is over when this is 0."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)))


class TrialClaim:
    """A running trial's claim in this process's lease (ablate.lease): beaten while its run
    advances (RDB storages: Optuna's heartbeat table; the journal has none, its trials' owners are
    checked as processes), failed and enqueued again when its run stalls."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, planned: PlannedRun):
        self.study, self.trial, self.planned = study, trial, planned
        self._store = _rdb(study._storage)
        self.renew()  # the first beat, as the trial is taken

    def renew(self) -> None:
        if self._store is not None and self._store.get_heartbeat_interval():
            self._store.record_heartbeat(self.trial._trial_id)

    def give_back_stalled(self, idle: float) -> None:
        retries = self.trial.user_attrs.get(RETRIES_ATTR, 0)
        if _tell(self.study, self.trial, RunRecord(Outcome.STALLED)) and retries < MAX_RETRIES:
            enqueue(self.study, [self.planned], retries=retries + 1)


def reset_queue(study: optuna.Study) -> int:
    """Clear what a previous, interrupted `ablate run` left in this folder's private queue (the
    journal; the caller holds the folder's lock): RUNNING trials whose worker is gone, and WAITING
    ones (the new plan enqueues afresh). Never for a shared queue, whose work belongs to others.
    Returns how many were cleared."""
    cleared = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if lease.is_alive(trial.user_attrs.get(OWNER_ATTR)):
            continue
        study.tell(trial.number, state=TrialState.FAIL)
        cleared += 1
    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial = study.ask()  # pops the oldest waiting trial
        trial.set_user_attr(OUTCOME_ATTR, str(Outcome.SUPERSEDED))
        study.tell(trial, state=TrialState.FAIL)
        cleared += 1
    return cleared


def trial_params(values: dict[str, Any]) -> dict[str, int | float]:
    """The numeric values, as Optuna params (visible in its dashboard). Strings, None and lists
    stay in the trial's user attributes: a categorical param must keep one set of choices for the
    whole study, and a grid's cells each have their own."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def enqueue(study: optuna.Study, runs: list[PlannedRun], retries: int = 0) -> None:
    """One waiting trial per planned run; the cell's numeric values become the trial's params.
    `retries`: how many failed attempts came before (kept on the trial, bounded by MAX_RETRIES)."""
    attrs = {RETRIES_ATTR: retries} if retries else {}
    for run in runs:
        study.enqueue_trial(trial_params(run.values), user_attrs={PLANNED_ATTR: run.to_json(), **attrs})


def work_grid(study: optuna.Study, num_trials: int | None, run_planned: RunPlanned,
              stop: Callable[[], bool] = lambda: False) -> int:
    """Pull and run enqueued trials until nothing waits or runs, `num_trials` were pulled or
    `stop()`; returns how many were pulled.

    While other workers' trials run, a worker with nothing to pull stays and looks again every
    few seconds: if one of them dies, its trial comes back to the queue and is picked up.
    A finished run completes its trial with its AP; any other outcome, or a run skipped because it
    was done elsewhere, fails the trial, with the outcome kept as a user attribute. An interrupted
    run (SIGTERM, Ctrl-C) goes back into the queue, where the next worker resumes it.
    """
    pulled = 0
    while (num_trials is None or pulled < num_trials) and not stop():
        fail_dead_trials(study)
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                break
            time.sleep(min(2.0, heartbeat_seconds()))
            continue
        trial = study.ask()
        text = trial.user_attrs.get(PLANNED_ATTR)
        if text is None:  # another worker took the last waiting one: the sampler made this one up
            trial.set_user_attr(OUTCOME_ATTR, str(Outcome.UNUSED))
            study.tell(trial, state=TrialState.FAIL)
            continue
        planned = PlannedRun.from_json(text)
        trial.set_user_attr(OWNER_ATTR, process_owner())
        for key, value in trial_params(planned.values).items():  # fixed by the queue: (value, value)
            if isinstance(value, int):
                trial.suggest_int(key, value, value)
            else:
                trial.suggest_float(key, value, value)
        try:
            with lease.LEASE.hold(TrialClaim(study, trial, planned)):
                result = run_planned(planned)
        except BaseException:
            if _tell(study, trial, RunRecord(Outcome.INTERRUPTED)):
                enqueue(study, [planned])
            raise
        # An interrupted or stalled run goes back into the queue, unless its trial was failed as
        # stale meanwhile: the stale-trial retry has enqueued it already.
        # A run whose rank died goes back too, at most MAX_RETRIES times.
        told = _tell(study, trial, result)
        retries = trial.user_attrs.get(RETRIES_ATTR, 0)
        if told and result is not None and result.outcome in REQUEUED:
            enqueue(study, [planned], retries=retries)
        elif told and result is not None and result.retry and retries < MAX_RETRIES:
            enqueue(study, [planned], retries=retries + 1)
        pulled += 1
    return pulled


def _tell(study: optuna.Study, trial: optuna.Trial, result: RunRecord | None) -> bool:
    """Close a trial from its run's result: COMPLETE with the AP, PRUNED, or FAIL. Returns False,
    changing nothing, when the trial was failed as stale meanwhile (its worker was too slow to
    beat): its retry carries the run on, and the tracking store, not this trial, holds the result."""
    try:
        trial.set_user_attr(OUTCOME_ATTR, str(Outcome.SKIPPED if result is None else result.outcome))
        if result is not None and result.value is not None:
            study.tell(trial, result.value)
        elif result is not None and result.outcome is Outcome.PRUNED:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, state=TrialState.FAIL)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError):  # "Cannot tell a FAIL trial"
        return False
    return True


def search_study(name: str, store: BaseStorage, direction: str, seed: int,
                 warmup_steps: int) -> optuna.Study:
    """TPE (settings pinned: Optuna's defaults change between releases) with a median pruner."""
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=4)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=warmup_steps)
    return optuna.create_study(study_name=name, storage=store, direction=direction, sampler=sampler,
                               pruner=pruner, load_if_exists=True)


def suggest(trial: optuna.Trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Config overrides drawn from a declared space: {low, high[, log, step]} or {choices}."""
    values = {}
    for key, dist in space.items():
        if "choices" in dist:
            values[key] = trial.suggest_categorical(key, dist["choices"])
        elif isinstance(dist["low"], int) and isinstance(dist["high"], int) and not dist.get("log"):
            values[key] = trial.suggest_int(key, dist["low"], dist["high"], step=dist.get("step", 1))
        else:
            values[key] = trial.suggest_float(key, float(dist["low"]), float(dist["high"]),
                                              log=bool(dist.get("log", False)), step=dist.get("step"))
    return values


Reporter = Callable[[int, float], bool]
RunSearchTrial = Callable[[int, dict[str, Any], Reporter], RunRecord]


def work_search(study: optuna.Study, num_trials: int, space: dict[str, dict[str, Any]],
                run_trial: RunSearchTrial, stop: Callable[[], bool] = lambda: False) -> None:
    """Run `num_trials` TPE trials, fewer once `stop()`; `run_trial(number, overrides, report)`
    trains, calling `report(step, value)` with each intermediate metric; report returns True when
    the pruner says stop. Returns nothing: results live in the study and in MLflow."""
    for _ in range(num_trials):
        if stop():
            break
        trial = study.ask()
        trial.set_user_attr(OWNER_ATTR, process_owner())
        overrides = suggest(trial, space)

        def report(step: int, value: float, trial=trial) -> bool:
            trial.report(value, step)
            return trial.should_prune()

        try:
            result = run_trial(trial.number, overrides, report)
        except BaseException:
            _tell(study, trial, RunRecord(Outcome.INTERRUPTED))
            raise
        _tell(study, trial, result)


def best_trial(study: optuna.Study) -> tuple[dict[str, Any], float] | None:
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        return None
    return study.best_trial.params, study.best_value
