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

from ablate import tracking
from ablate.config import config_hash
from ablate.experiments import Experiment


def select_runs(exp: Experiment, extra: dict[str, Any], runs: pd.DataFrame) -> pd.DataFrame:
    """The rows of `runs` (Tracker.load_runs) that are the experiment's cells, one per cell x seed."""
    if runs.empty:
        return runs
    chosen = []
    for cell in exp.cells():
        mine = runs[runs["cell"] == cell.name]
        for seed in sorted(mine["seed"].unique()):
            expected = config_hash(exp.cell_config(cell, extra, int(seed)))
            rows = mine[(mine["seed"] == seed) & (mine["config_hash"] == expected)]
            if rows.empty:
                continue
            done = rows[rows["outcome"].isin(tracking.DONE_OUTCOMES)]
            pick = (done if not done.empty else rows).sort_values("start_time").iloc[-1]
            chosen.append(pick.to_dict() | {"cell_index": cell.index})
    return pd.DataFrame(chosen)


def reproduce_command(exp: Experiment, extra: dict[str, Any], runs: pd.DataFrame) -> str:
    """The commands that regenerate the runs and this report."""
    seeds = sorted(runs["seed"].unique())
    seed_arg = f" --seeds {len(seeds)}" if seeds != exp.seeds and seeds == list(range(len(seeds))) else ""
    sets = "".join(f" --set {shlex.quote(f'{k}={json.dumps(v)}')}" for k, v in extra.items())
    return f"ablate run {exp.name}{seed_arg}{sets}\nablate report {exp.name}{sets}"
