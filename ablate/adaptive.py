"""What `ablate run` adds by itself is decided here, without running anything: the rule and the
comparisons of the adaptive seeds, the AP they are judged on, and the budget multiples.

`--until-settled` (adaptive seeds): the experiment's comparisons (its `comparisons` pairs, or
every cell against the baseline) are judged by the group-sequential rule of ablate.sequential
after every round of runs; only the cells of a still-open comparison get another seed, until
nothing is open or the rule's max_seeds. The rule is fixed before the first round, from the
file's [sequential] table and --max-seeds, and goes with every round onto the grid's parent run
(tags RULE_TAG, COMPARISONS_TAG), where `ablate report` reads it back.

`--budgets 1,2,4` (budget curves): every cell x seed again at each multiple of its schedule
(ablate.budgets.budget_overrides); multiple 1 is the cell as declared (its existing runs
count). The multiples go onto the parent run (BUDGETS_TAG) for the report to find.

Pure: no store, no worker. The loop that runs the rounds is ablate.rounds; the report reads the
recorded rule and budgets back through this module.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ablate.budgets import budget_overrides, parse_budgets
from ablate.errors import AblateError
from ablate.experiments import Experiment
from ablate.cell_runs import select_runs
from ablate.runs import DONE, Outcome
from ablate.family import judge_comparisons
from ablate.sequential import SequentialRule, Verdict, default_comparisons

TAG = "ablate."  # tracking.TAG (this module does not import MLflow)
RULE_TAG = f"{TAG}sequential_rule"
COMPARISONS_TAG = f"{TAG}comparisons"
BUDGETS_TAG = f"{TAG}budgets"
BUDGET_TAG = f"{TAG}budget"

Pair = tuple[str, str]


@dataclass(frozen=True)
class RunMode:
    """Which runs `ablate run` adds: the grid as declared (`force`: done cells again too), seeds
    until the comparisons settle (`until_settled`, with the rule's `max_seeds`, `test`, `family`),
    or the grid at each multiple of `budgets` ('1,2,4')."""

    force: bool = False
    until_settled: bool = False
    max_seeds: int | None = None
    test: str | None = None
    family: bool = False
    budgets: str | None = None

    def check(self, exp: Experiment) -> Sequence[float] | None:
        """The flags checked together, before any store opens: one AblateError naming the first
        bad one. Returns the budget multiples (None without --budgets)."""
        for given, flag in ((self.max_seeds is not None, "--max-seeds"), (self.test is not None, "--test"),
                            (self.family, "--family")):
            if given and not self.until_settled:
                raise AblateError(f"{flag} goes with --until-settled")
        if self.until_settled and (self.budgets or self.force):
            raise AblateError(f"--until-settled does not combine with {'--budgets' if self.budgets else '--force'}")
        multiples = parse_budgets(self.budgets) if self.budgets is not None else None
        if self.until_settled:
            rule_of(exp, self.max_seeds)  # a bad --max-seeds in one line
        return multiples


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
