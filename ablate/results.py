"""The tracked results of an experiment: which MLflow runs stand for its cells (ablate.report.build
turns them into its report).

A report only reads what tracking stored. For each cell x seed it takes the run whose config hash is
the cell's as the file declares it now (so runs of an edited file or of other --set values never
mix in), preferring the newest finished or diverged one.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

import pandas as pd

from ablate.experiments import Experiment
from ablate.runs import DONE


def select_runs(exp: Experiment, extra: dict[str, Any], runs: pd.DataFrame) -> pd.DataFrame:
    """The rows of `runs` (Tracker.load_runs) that are the experiment's cells, one per cell x seed:
    the runs whose config hash is a planned run's, for every seed that was tracked."""
    if runs.empty:
        return runs
    seeds = sorted(int(s) for s in runs["seed"].unique())
    chosen = []
    for planned in exp.planned_runs(seeds, extra):
        rows = runs[(runs["cell"] == planned.cell) & (runs["config_hash"] == planned.config_hash)]
        if rows.empty:
            continue
        done = rows[rows["outcome"].isin(DONE)]
        pick = (done if not done.empty else rows).sort_values("start_time").iloc[-1]
        chosen.append(pick.to_dict() | {"cell_index": planned.cell_index})
    return pd.DataFrame(chosen)


def reproduce_command(exp: Experiment, extra: dict[str, Any], runs: pd.DataFrame) -> str:
    """The commands that regenerate the runs and this report."""
    seeds = sorted(runs["seed"].unique())
    seed_arg = f" --seeds {len(seeds)}" if seeds != exp.seeds and seeds == list(range(len(seeds))) else ""
    sets = "".join(f" --set {shlex.quote(f'{k}={json.dumps(v)}')}" for k, v in extra.items())
    return f"ablate run {exp.name}{seed_arg}{sets}\nablate report {exp.name}{sets}"
