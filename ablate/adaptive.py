"""The runs `ablate run` adds by itself: seeds until comparisons settle, and budget multiples.

`--until-settled` (adaptive seeds): the experiment's comparisons (its `comparisons` pairs, or
every cell against the baseline) are judged by the group-sequential rule of ablate.sequential
after every round of runs; only the cells of a still-open comparison get another seed, until
nothing is open or the rule's max_seeds. The rule is fixed before the first round, from the
file's [sequential] table and --max-seeds, and goes with every round onto the grid's parent run
(tags RULE_TAG, COMPARISONS_TAG), where `ablate report` reads it back.

`--budgets 1,2,4` (budget curves): every cell x seed again at each multiple of its schedule
(ablate.budgets.budget_overrides); multiple 1 is the cell as declared (its existing runs
count). The multiples go onto the parent run (BUDGETS_TAG) for the report to find.

State lives in the tracking store only: each round reads back which runs finished there (by
config hash, as `ablate report` does), so stopping the command and running it again carries on
where it stopped.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ablate.budgets import budget_overrides, budgets_text
from ablate.errors import AblateError
from ablate.experiments import Experiment
from ablate.results import select_runs
from ablate.runs import DONE, Outcome
from ablate.family import judge_comparisons
from ablate.sequential import SequentialRule, State, Verdict, default_comparisons, seeds_to_run

TAG = "ablate."  # tracking.TAG: tracking (MLflow) is imported by the edge functions at the end only
RULE_TAG = f"{TAG}sequential_rule"
COMPARISONS_TAG = f"{TAG}comparisons"
BUDGETS_TAG = f"{TAG}budgets"
BUDGET_TAG = f"{TAG}budget"

Pair = tuple[str, str]
# Outcomes after which a round stops the loop: a rerun of the command retries them, and adding
# seeds past a crash or a Ctrl-C would be guessing.
STOPPING = frozenset({str(Outcome.FAILED), str(Outcome.INTERRUPTED),
                      "worker crashed"})  # workers.WORKER_CRASHED; workers imports torch, this module does not


# ----------------------------------------------------------------------------- what is compared, by which rule


def comparisons_of(exp: Experiment) -> list[Pair]:
    """The file's `comparisons`, else every cell against the baseline (default: the first cell)."""
    if exp.comparisons:
        return list(exp.comparisons)
    names = [cell.name for cell in exp.cells()]
    return default_comparisons(names, exp.baseline or names[0])


def rule_of(exp: Experiment, max_seeds: int | None = None, test: str | None = None,
            family: bool = False) -> SequentialRule:
    """The rule from the file's [sequential] table, max_seeds replaced by --max-seeds, test by
    --test and family by --family (Holm) when given."""
    fields = dict(exp.sequential)
    if max_seeds is not None:
        fields["max_seeds"] = max_seeds
    if test is not None:
        fields["test"] = test.replace("-", "_")
    if family:
        fields["family"] = "holm"
    try:
        return SequentialRule(**fields)
    except AblateError as e:
        raise AblateError(f"--max-seeds {max_seeds}: {e}" if max_seeds is not None else f"{exp.path}: {e}") from None


def recorded_rule(exp: Experiment, parents: Sequence[dict[str, str]]) -> tuple[SequentialRule, list[Pair]] | None:
    """The rule and comparisons of the newest parent run that recorded them (the parents' tags,
    newest first), or None when no run of the experiment was adaptive."""
    for tags in parents:
        if RULE_TAG in tags:
            rule = SequentialRule.from_dict(json.loads(tags[RULE_TAG]), f"{exp.name}: the recorded {RULE_TAG}")
            return rule, [(a, b) for a, b in json.loads(tags.get(COMPARISONS_TAG, "[]"))]
    return None


def rule_tags(rule: SequentialRule, comparisons: Sequence[Pair]) -> dict[str, str]:
    return {RULE_TAG: json.dumps(rule.to_dict(), sort_keys=True), COMPARISONS_TAG: json.dumps(list(comparisons))}


def seed_pool(seeds: Sequence[int], rule: SequentialRule) -> list[int]:
    """The seeds a comparison may take, in order: the file's (or --seeds), then the next integers,
    twice max_seeds in all so that diverged seeds can be replaced."""
    pool = sorted(set(seeds))
    nxt = pool[-1] + 1 if pool else 0
    while len(pool) < 2 * rule.max_seeds:
        pool.append(nxt)
        nxt += 1
    return pool


# ----------------------------------------------------------------------------- tracked AP per cell and seed


@dataclass
class Tracked:
    """What the tracking store says of the experiment's cells (AP in points, as the findings use)."""

    finished: dict[str, dict[int, float]] = field(default_factory=dict)  # cell -> {seed: AP}
    attempted: dict[str, set[int]] = field(default_factory=dict)  # cell -> seeds done (finished or diverged)

    def num_attempted(self) -> int:
        return sum(len(seeds) for seeds in self.attempted.values())


def tracked_ap(exp: Experiment, extra: dict[str, Any], runs: pd.DataFrame) -> Tracked:
    """AP by cell and seed of the runs that stand for the cells as declared now (results.select_runs).
    A finished run without a finite AP counts as attempted, like a diverged one."""
    tracked = Tracked()
    chosen = select_runs(exp, extra, runs)
    for _, row in chosen.iterrows():
        if row["outcome"] not in DONE:
            continue
        cell, seed = str(row["cell"]), int(row["seed"])
        tracked.attempted.setdefault(cell, set()).add(seed)
        ap = row.get("AP")
        if row["outcome"] == Outcome.FINISHED and ap is not None and math.isfinite(float(ap)):
            tracked.finished.setdefault(cell, {})[seed] = 100.0 * float(ap)
    return tracked


def judge_all(rule: SequentialRule, comparisons: Sequence[Pair],
              finished: dict[str, dict[int, float]]) -> dict[Pair, Verdict]:
    """Each comparison's verdict, paired by seed (the loop always runs both sides of a seed); as a
    family when the rule says so (ablate.family)."""
    return judge_comparisons(rule, comparisons, finished)


# ----------------------------------------------------------------------------- the loop

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
    outcome; load_runs reads the tracking store (Tracker.load_runs). A round that ends with a
    failed or interrupted run, or that adds no done run, ends the loop: running the command
    again retries it.
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


def select_pairs(todo: dict[str, list[int]]) -> tuple[list[int], Callable[[Any], bool]]:
    """(the seeds to plan, a filter keeping the planned runs of exactly those (cell, seed) pairs)."""
    wanted = {(cell, seed) for cell, seeds in todo.items() for seed in seeds}
    return sorted({seed for _, seed in wanted}), lambda planned: (planned.cell, planned.seed) in wanted


# ----------------------------------------------------------------------------- budgets


def budget_groups(exp: Experiment, extra: dict[str, Any], multiple: float) -> list[tuple[dict[str, Any], list[str]]]:
    """[(overrides, cell names)] at `multiple` times each cell's schedule: cells of one schedule
    share one override set. Multiple 1 overrides nothing, so its runs are the declared cells'."""
    groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for cell in exp.cells():
        cfg = exp.cell_config(cell, extra)
        overrides = {} if multiple == 1 else budget_overrides(multiple, cfg.train.iterations, cfg.train.warmup_iters)
        groups.setdefault(json.dumps(overrides, sort_keys=True), (overrides, []))[1].append(cell.name)
    return list(groups.values())


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


def recorded_budgets(parents: Sequence[dict[str, str]]) -> list[float]:
    """Every multiple any parent run recorded (from the parents' tags), ascending; [] when none."""
    return sorted({float(b) for tags in parents for b in tags.get(BUDGETS_TAG, "").split(",") if b.strip()})


def budget_runs(exp: Experiment, extra: dict[str, Any], runs: pd.DataFrame,
                budgets: Sequence[float]) -> dict[float, pd.DataFrame]:
    """{multiple: the runs that stand for the cells at that budget}; budgets without a run left out."""
    out = {}
    for multiple in budgets:
        parts = [chosen[chosen["cell"].isin(cells)]
                 for overrides, cells in budget_groups(exp, extra, multiple)
                 if not (chosen := select_runs(exp, {**extra, **overrides}, runs)).empty]
        if parts:
            out[multiple] = pd.concat(parts, ignore_index=True)
    return out

# ----------------------------------------------------------------------------- `ablate run` (the edge)
# grid and tracking import MLflow and Optuna: imported here, on use, so that the pure parts above
# stay testable without them.


def run_until_settled(exp: Experiment, seeds: Sequence[int], extra: dict[str, Any], max_seeds: int | None, *,
                      options, jobs: int | None, gpus_per_cell: int, dry_run: bool, console,
                      show_progress: bool, test: str | None = None, family: bool = False) -> Counter:
    """`ablate run NAME --until-settled`: rounds of run_grid, each on the runs the rule asks for."""
    from rich.markup import escape

    from ablate import grid, tracking, workers

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
        tracked = tracked_ap(exp, extra, tracker.load_runs())
        verdicts = judge_all(rule, comparisons, tracked.finished)
        todo = seeds_to_run(rule, comparisons, verdicts, tracked.finished, tracked.attempted,
                            seed_pool(seeds, rule))
        return run_round(todo) if todo else Counter()
    result = settle(exp, extra, rule, comparisons, seed_pool(seeds, rule), run_round, tracker.load_runs, say)
    for (cell, other), verdict in result.verdicts.items():
        say(f"{cell} vs {other}: {verdict.text()}")
    say(f"stopped after {result.rounds} round(s): {result.stopped}; `ablate report {exp.name}` tabulates the verdicts")
    return result.outcomes


def run_budget_grid(exp: Experiment, seeds: Sequence[int], extra: dict[str, Any], budgets: Sequence[float], *,
                    options, jobs: int | None, gpus_per_cell: int, force: bool, dry_run: bool, console,
                    show_progress: bool) -> Counter:
    """`ablate run NAME --budgets 1,2,4`: the grid at each multiple of its schedule."""
    from ablate import grid

    def run_group(overrides: dict[str, Any], cells: list[str], tags: dict[str, str]) -> Counter:
        return grid.run_grid(exp, list(seeds), overrides, options=options, jobs=jobs, gpus_per_cell=gpus_per_cell,
                             force=force, dry_run=dry_run, console=console, show_progress=show_progress,
                             select=lambda planned: planned.cell in cells, parent_tags=tags)

    return run_budgets(exp, extra, budgets, run_group)
