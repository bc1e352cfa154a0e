"""The tracked results of an experiment: which MLflow runs stand for its cells (ablate.report.build
turns them into its report).

A report only reads what tracking stored. For each cell x seed it takes the run whose config hash is
the cell's as the file declares it now (so runs of an edited file or of other --set values never
mix in), preferring the newest finished or diverged one.

Which --data / --set values: the ones given, else those the tracked runs were made with (every
run remembers its overrides), so that `ablate report NAME` finds the runs of
`ablate run NAME --data coco:PATH`; where the runs were made with several sets, the user picks one.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from typing import Any

import pandas as pd

from ablate.budgets import budgets_text
from ablate.errors import AblateError
from ablate.data.source import DataSource
from ablate.experiments import Experiment
from ablate.runs import DONE


def select_runs(exp: Experiment, extra: dict[str, Any], runs: pd.DataFrame) -> pd.DataFrame:
    """The rows of `runs` (Tracker.load_runs) that are the experiment's cells, one per cell x seed:
    the runs whose config hash is a planned run's, for every seed that was tracked."""
    if runs.empty:
        return runs
    seeds = sorted(int(s) for s in runs["seed"].unique())
    return pick_runs([(p.cell, p.cell_index, p.config_hash) for p in exp.planned_runs(seeds, extra)], runs)


def pick_runs(planned: list[tuple[str, int, str]], runs: pd.DataFrame) -> pd.DataFrame:
    """For each planned (cell, cell index, config hash), the newest done run of `runs` with that
    hash, else its newest run of any outcome; none when it has no run."""
    chosen = []
    for cell, cell_index, config_hash in planned:
        rows = runs[(runs["cell"] == cell) & (runs["config_hash"] == config_hash)] if not runs.empty else runs
        if rows.empty:
            continue
        done = rows[rows["outcome"].isin(DONE)]
        pick = (done if not done.empty else rows).sort_values("start_time").iloc[-1]
        chosen.append(pick.to_dict() | {"cell_index": cell_index})
    return pd.DataFrame(chosen)


def resolve_overrides(exp: Experiment, given: dict[str, Any] | None, runs: pd.DataFrame,
                      tracked: list[dict[str, Any]], command: str = "report") -> dict[str, Any]:
    """The overrides to report (or show) `exp` with: `given` (the command's --data / --set) when
    there are some, else the one set of `tracked` (Tracker.override_sets) whose runs are cells of
    the file as it is now, else none at all. Several such sets and none given is an AblateError
    that lists the exact command for each; so are given ones that match no run while others do."""
    found = [o for o in tracked if not select_runs(exp, o, runs).empty]
    if given or not found:
        if given and found and select_runs(exp, given, runs).empty:
            raise AblateError(f"no tracked run of {exp.name} was made with{command_flags(given)}; "
                              f"tracked: {choices(exp, found, command)}")
        return given or {}
    if {} in found:  # the file as it is: what the plain command always meant
        return {}
    if len(found) == 1:
        return found[0]
    raise AblateError(f"the runs of {exp.name} were made with {len(found)} sets of overrides; "
                      f"name one: {choices(exp, found, command)}")


def choices(exp: Experiment, sets: list[dict[str, Any]], command: str) -> str:
    """The exact command for each set of overrides, as one line."""
    return "; ".join(f"`ablate {command} {exp.name}{command_flags(o)}`" for o in sets)


def command_flags(overrides: dict[str, Any]) -> str:
    """' --data coco:/x --set train.iterations=50': the flags that give `overrides` back
    (options.overrides_from's inverse), leading space included; '' for none."""
    rest = dict(overrides)
    flags = []
    data = DataSource.from_overrides(rest)
    if data is not None:  # only when --data gives back exactly these keys; else they stay --set pairs
        flags.append(f"--data {shlex.quote(str(data))}")
        for key in data.overrides():
            rest.pop(key)
    flags += [f"--set {shlex.quote(f'{key}={set_text(value)}')}" for key, value in sorted(rest.items())]
    return "".join(f" {flag}" for flag in flags)


def set_text(value: Any) -> str:
    """A value as --set reads it back (config.parse_set): JSON, but a string that would read as
    something else (a number, true, none) stays JSON-quoted, and other strings bare."""
    if not isinstance(value, str):
        return json.dumps(value)
    try:
        json.loads(value)
    except json.JSONDecodeError:
        return json.dumps(value) if value.lower() in ("none", "null") else value
    return json.dumps(value)


def reproduce_command(exp: Experiment, extra: dict[str, Any], runs: pd.DataFrame, max_seeds: int | None = None,
                      budgets: Sequence[float] = (), rule_flags: str = "") -> str:
    """The commands that regenerate the runs and this report. max_seeds: the runs were added by
    `--until-settled` up to that many seeds (the rule, not a seed count, decides how many ran);
    rule_flags: that rule's other flags (" --test signed-rank --family"); budgets: the multiples
    `--budgets` recorded."""
    seeds = sorted(runs["seed"].unique())
    seed_arg = f" --seeds {len(seeds)}" if seeds != exp.seeds and seeds == list(range(len(seeds))) else ""
    if max_seeds is not None:
        seed_arg = f" --until-settled --max-seeds {max_seeds}{rule_flags}"
    budget_arg = f" --budgets {budgets_text(budgets)}" if budgets else ""
    sets = command_flags(extra)
    return f"ablate run {exp.name}{seed_arg}{budget_arg}{sets}\nablate report {exp.name}{sets}"
