"""The rounds of runs `ablate run` adds by itself: seeds until the comparisons settle
(`--until-settled`), and the grid again at each budget multiple (`--budgets`).

Each round is a `grid.run_grid` on the cell x seed runs it selects; what to run next is decided
by ablate.adaptive from what the tracking store holds, so stopping the command and running it
again carries on where it stopped. `settle` and `run_budgets` take the round runner as an
argument (the tests give them one that runs nothing).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from rich.markup import escape

from ablate import grid, tracking, workers
from ablate.adaptive import (BUDGET_TAG, BUDGETS_TAG, Pair, RunMode, budget_groups, comparisons_of, judge_all,
                             rule_of, rule_tags, seed_pool, select_pairs, tracked_ap)
from ablate.budgets import budgets_text, parse_budgets
from ablate.errors import AblateError
from ablate.experiments import Experiment
from ablate.runs import Outcome, runs_frame
from ablate.sequential import SequentialRule, State, Verdict, seeds_to_run

# Outcomes after which a round stops the loop: a rerun of the command retries them, and adding
# seeds past a crash or a Ctrl-C would be guessing.
STOPPING = frozenset({Outcome.FAILED, Outcome.INTERRUPTED, Outcome.WORKER_CRASHED})

RoundRunner = Callable[[dict[str, list[int]]], Counter]  # {cell: [seed, ...]} -> outcome counts


@dataclass
class Settled:
    verdicts: dict[Pair, Verdict]
    outcomes: Counter  # over every round
    rounds: int
    stopped: str  # why the loop ended: "settled", "max seeds", "no seeds left", or the stopping outcome


def settle(exp: Experiment, extra: dict[str, Any], rule: SequentialRule, comparisons: Sequence[Pair],
           pool: Sequence[int], run_round: RoundRunner, load_runs: Callable[[], pd.DataFrame],
           say: Callable[[str], None] = lambda text: None) -> Settled:
    """Judge, run the seeds the open comparisons need, judge again, until none needs any.

    run_round runs exactly the (cell, seed) pairs it is given and returns the count of each
    outcome; load_runs reads the tracking store (runs_frame of Tracker.load_runs). A round that
    ends with a failed or interrupted run, or that adds no done run, ends the loop: running the
    command again retries it.
    """
    outcomes: Counter = Counter()
    rounds = 0
    while True:
        tracked = tracked_ap(exp, extra, load_runs())
        verdicts = judge_all(rule, comparisons, tracked.finished)
        todo = seeds_to_run(rule, comparisons, verdicts, tracked.finished, tracked.attempted, pool)
        if not todo:
            return Settled(verdicts, outcomes, rounds, _why_done(verdicts))
        say(f"look {rounds + 1}: " + "; ".join(f"{a} vs {b}: {v.text()}" for (a, b), v in verdicts.items())
            + " -> running " + ", ".join(f"{cell} seeds {seeds}" for cell, seeds in todo.items()))
        round_outcomes = run_round(todo)
        outcomes += round_outcomes
        rounds += 1
        stopping = sorted(k for k in round_outcomes if str(k) in STOPPING)
        if stopping:
            return Settled(verdicts, outcomes, rounds, ", ".join(map(str, stopping)))
        if tracked_ap(exp, extra, load_runs()).num_attempted() <= tracked.num_attempted():
            return Settled(verdicts, outcomes, rounds, "no run was added (are the runs queued for other workers?)")


def _why_done(verdicts: dict[Pair, Verdict]) -> str:
    if all(v.state is not State.OPEN for v in verdicts.values()):
        return "settled"
    if any(v.needs_seed for v in verdicts.values()):
        return "no seeds left"
    return "max seeds or cannot settle" if any(v.curtailed for v in verdicts.values()) else "max seeds"



GroupRunner = Callable[[dict[str, Any], list[str], dict[str, str]], Counter]  # (overrides, cells, parent tags)


def run_budgets(exp: Experiment, extra: dict[str, Any], budgets: Sequence[float], run_group: GroupRunner) -> Counter:
    """Every cell x seed at every budget, lowest first; stops after a failed or interrupted one."""
    for multiple in budgets:
        budget_groups(exp, extra, multiple)  # every budget checked before the first run
    outcomes: Counter = Counter()
    recorded = budgets_text(budgets)
    for multiple in budgets:
        for overrides, cells in budget_groups(exp, extra, multiple):
            outcomes += run_group({**extra, **overrides}, cells, {BUDGETS_TAG: recorded, BUDGET_TAG: f"{multiple:g}"})
            if any(str(k) in STOPPING for k in outcomes):
                return outcomes
    return outcomes


# ----------------------------------------------------------------------------- `ablate run`


def run(exp: Experiment, seeds: Sequence[int], extra: dict[str, Any], mode: RunMode, **common) -> Counter:
    """`ablate run`: the grid as declared, or its rounds (`mode`, checked by the caller with
    mode.check); `common` are run_grid's keyword arguments (options, jobs, console, ...)."""
    if mode.until_settled:
        return run_until_settled(exp, seeds, extra, mode.max_seeds, test=mode.test, family=mode.family, **common)
    if mode.budgets:
        return run_budget_grid(exp, seeds, extra, parse_budgets(mode.budgets), force=mode.force, **common)
    return grid.run_grid(exp, list(seeds), extra, force=mode.force, **common)


def run_until_settled(exp: Experiment, seeds: Sequence[int], extra: dict[str, Any], max_seeds: int | None, *,
                      options, jobs: int | None, gpus_per_cell: int, dry_run: bool, console,
                      show_progress: bool, test: str | None = None, family: bool = False) -> Counter:
    """`ablate run NAME --until-settled`: rounds of run_grid, each on the runs the rule asks for."""
    rule, comparisons = rule_of(exp, max_seeds, test, family), comparisons_of(exp)
    if jobs == 0:
        raise AblateError("--until-settled judges each round's runs before it plans the next: it needs "
                          "workers of its own (--jobs 1 or more)")
    tracker = tracking.Tracker(exp.name, options.tracking_uri)
    say = lambda text: console.print(escape(f"{exp.name}: {text}"), soft_wrap=True)  # noqa: E731
    say(f"until settled: {len(comparisons)} comparison(s), {rule.test} test, error {rule.error_text}, looks at "
        f"{rule.min_seeds}..{rule.max_seeds} seeds (critical |statistic| "
        + ", ".join(f"{c:.2f}" for c in rule.to_dict()["critical"].values()) + ")")

    def run_round(todo: dict[str, list[int]]) -> Counter:
        round_seeds, keep = select_pairs(todo)
        # Workers of its own even on a shared queue (the default there is none): it waits for the round.
        own_jobs = jobs or workers.default_jobs(sum(len(s) for s in todo.values()), options.nproc, gpus_per_cell)
        return grid.run_grid(exp, round_seeds, extra, options=options, jobs=own_jobs, gpus_per_cell=gpus_per_cell,
                             dry_run=dry_run, console=console, show_progress=show_progress, select=keep,
                             parent_tags=rule_tags(rule, comparisons))

    if dry_run:  # the first round's plan only: later rounds depend on its results
        tracked = tracked_ap(exp, extra, runs_frame(tracker.load_runs()))
        verdicts = judge_all(rule, comparisons, tracked.finished)
        todo = seeds_to_run(rule, comparisons, verdicts, tracked.finished, tracked.attempted,
                            seed_pool(seeds, rule))
        return run_round(todo) if todo else Counter()
    result = settle(exp, extra, rule, comparisons, seed_pool(seeds, rule), run_round,
                    lambda: runs_frame(tracker.load_runs()), say)
    for (cell, other), verdict in result.verdicts.items():
        say(f"{cell} vs {other}: {verdict.text()}")
    say(f"stopped after {result.rounds} round(s): {result.stopped}; `ablate report {exp.name}` tabulates the verdicts")
    return result.outcomes


def run_budget_grid(exp: Experiment, seeds: Sequence[int], extra: dict[str, Any], budgets: Sequence[float], *,
                    options, jobs: int | None, gpus_per_cell: int, force: bool, dry_run: bool, console,
                    show_progress: bool) -> Counter:
    """`ablate run NAME --budgets 1,2,4`: the grid at each multiple of its schedule."""

    def run_group(overrides: dict[str, Any], cells: list[str], tags: dict[str, str]) -> Counter:
        return grid.run_grid(exp, list(seeds), overrides, options=options, jobs=jobs, gpus_per_cell=gpus_per_cell,
                             force=force, dry_run=dry_run, console=console, show_progress=show_progress,
                             select=lambda planned: planned.cell in cells, parent_tags=tags)

    return run_budgets(exp, extra, budgets, run_group)
