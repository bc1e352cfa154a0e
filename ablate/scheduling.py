"""Everything Optuna: the only module that imports it.

A grid's planned runs (cells x seeds) are the trials of a study named after the ablation, each
*enqueued* with its exact values and the whole `PlannedRun` as a user attribute (the grid sampler,
with several workers, runs duplicates and skips points). The queue holds work only: whether a
run is done is the tracking store's answer, not the trial's state. Workers pull the enqueued
trials from a journal-file storage, which is safe for parallel processes where SQLite is not.
`ablate search` runs TPE with a median pruner over a declared space instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from ablate.runs import Outcome, PlannedRun, RunResult

PLANNED_ATTR = "ablate_planned_run"  # user attribute: the PlannedRun (JSON) an enqueued trial stands for
OUTCOME_ATTR = "outcome"  # user attribute: how the trial's run ended, for Optuna's dashboard

optuna.logging.set_verbosity(logging.WARNING)

# Runs one planned run; None when the tracking store said it is done or running elsewhere.
RunPlanned = Callable[[PlannedRun], RunResult | None]


def state_dir() -> Path:
    path = Path.cwd() / ".ablate"
    path.mkdir(exist_ok=True)
    return path


def storage(path: Path | None = None) -> JournalStorage:
    path = path or state_dir() / "optuna.journal"
    return JournalStorage(JournalFileBackend(str(path)))


def grid_study(name: str, store: JournalStorage) -> optuna.Study:
    return optuna.create_study(study_name=name, storage=store, direction="maximize", load_if_exists=True)


def reset_queue(study: optuna.Study) -> int:
    """Fail the trials a previous, interrupted `ablate run` left behind: RUNNING ones (their worker
    is gone: the caller holds the ablation's lock) and WAITING ones (they are enqueued afresh).
    Returns how many were cleared."""
    cleared = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        cleared += 1
    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial = study.ask()  # pops the oldest waiting trial
        trial.set_user_attr(OUTCOME_ATTR, "superseded")
        study.tell(trial, state=TrialState.FAIL)
        cleared += 1
    return cleared


def trial_params(values: dict[str, Any]) -> dict[str, int | float]:
    """The numeric values, as Optuna params (visible in its dashboard). Strings, None and lists
    stay in the trial's user attributes: a categorical param must keep one set of choices for the
    whole study, and a grid's cells each have their own."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def enqueue(study: optuna.Study, runs: list[PlannedRun]) -> None:
    """One waiting trial per planned run; the cell's numeric values become the trial's params."""
    for run in runs:
        study.enqueue_trial(trial_params(run.values), user_attrs={PLANNED_ATTR: run.to_json()})


def work_grid(study: optuna.Study, num_trials: int, run_planned: RunPlanned) -> int:
    """Pull and run up to `num_trials` enqueued trials; returns how many were pulled.

    A finished run completes its trial with its AP; any other outcome, or a run skipped because it
    was done elsewhere, fails the trial, with the outcome kept as a user attribute.
    """
    pulled = 0
    for _ in range(num_trials):
        trial = study.ask()
        text = trial.user_attrs.get(PLANNED_ATTR)
        if text is None:  # no enqueued trial left: the sampler made this one up, so discard it
            trial.set_user_attr(OUTCOME_ATTR, "unused")
            study.tell(trial, state=TrialState.FAIL)
            break
        planned = PlannedRun.from_json(text)
        for key, value in trial_params(planned.values).items():  # fixed by the queue: (value, value)
            if isinstance(value, int):
                trial.suggest_int(key, value, value)
            else:
                trial.suggest_float(key, value, value)
        try:
            result = run_planned(planned)
        except BaseException:
            trial.set_user_attr(OUTCOME_ATTR, str(Outcome.INTERRUPTED))
            study.tell(trial, state=TrialState.FAIL)
            raise
        _tell(study, trial, result)
        pulled += 1
    return pulled


def _tell(study: optuna.Study, trial: optuna.Trial, result: RunResult | None) -> None:
    """Close a trial from its run's result: COMPLETE with the AP, PRUNED, or FAIL."""
    trial.set_user_attr(OUTCOME_ATTR, "skipped" if result is None else str(result.outcome))
    if result is not None and result.value is not None:
        study.tell(trial, result.value)
    elif result is not None and result.outcome is Outcome.PRUNED:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)


def search_study(name: str, store: JournalStorage, direction: str, seed: int,
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
RunSearchTrial = Callable[[int, dict[str, Any], Reporter], RunResult]


def work_search(study: optuna.Study, num_trials: int, space: dict[str, dict[str, Any]],
                run_trial: RunSearchTrial) -> None:
    """Run `num_trials` TPE trials; `run_trial(number, overrides, report)` trains, calling
    `report(step, value)` with each intermediate metric; report returns True when the pruner
    says stop. Returns nothing: results live in the study and in MLflow."""
    for _ in range(num_trials):
        trial = study.ask()
        overrides = suggest(trial, space)

        def report(step: int, value: float, trial=trial) -> bool:
            trial.report(value, step)
            return trial.should_prune()

        try:
            result = run_trial(trial.number, overrides, report)
        except BaseException:
            trial.set_user_attr(OUTCOME_ATTR, str(Outcome.INTERRUPTED))
            study.tell(trial, state=TrialState.FAIL)
            raise
        _tell(study, trial, result)


def best_trial(study: optuna.Study) -> tuple[dict[str, Any], float] | None:
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        return None
    return study.best_trial.params, study.best_value
