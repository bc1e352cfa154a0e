"""The tracked results of an experiment: which MLflow runs stand for its cells, and its report.

A report only reads what tracking stored. For each cell x seed it takes the run whose config hash is
the cell's as the file declares it now (so runs of an edited file or of other --set values never
mix in), preferring the newest finished or diverged one.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pandas as pd

from ablate import tracking
from ablate.config import config_hash
from ablate.errors import AblateError
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


def build_report(exp: Experiment, extra: dict[str, Any], out_dir: Path, command: str | None = None) -> dict[str, Path]:
    """Write reports/NAME from the tracked runs; returns the files written."""
    from ablate.report import ReportSpec, write_report

    tracker = tracking.Tracker(exp.name, tracking.init_store())
    runs = select_runs(exp, extra, tracker.load_runs())
    if runs.empty:
        raise AblateError(f"no tracked run matches the cells of {exp.path}: run `ablate run {exp.name}` first")
    histories = tracker.load_histories(runs["run_id"].tolist())
    spec = ReportSpec(name=exp.name, description=exp.description, varied=exp.varied, x=exp.x, hue=exp.hue,
                      baseline=exp.baseline, paper_table=exp.paper_table,
                      command=command or reproduce_command(exp, extra, runs))
    figures, skipped = loss_cdf_figure(exp, runs, out_dir)
    return write_report(runs, histories, spec, out_dir, figures, skipped)


def loss_cdf_figure(exp: Experiment, runs: pd.DataFrame, out_dir: Path) -> tuple[dict, dict]:
    """Figure 4 when the file asks for it ([loss_cdf]): from the checkpoint of the cell's finished run
    with the lowest seed. Returns ({"loss_cdf": (png, caption)}, {}) or ({}, {"loss_cdf.png": why})."""
    if exp.loss_cdf is None:
        return {}, {}
    from ablate.analysis import write_loss_cdf

    spec = exp.loss_cdf
    finished = runs[(runs["cell"] == spec.cell) & (runs["outcome"] == "finished")]
    if finished.empty:
        return {}, {"loss_cdf.png": f"no finished run of the cell '{spec.cell}'"}
    run = finished.sort_values("seed").iloc[0]
    checkpoint = Path(str(run.get("run_dir") or "")) / "checkpoint.pt"
    if not run.get("run_dir") or not checkpoint.is_file():
        return {}, {"loss_cdf.png": f"the checkpoint of run {run['run_id']} ({checkpoint}) is not on this machine; "
                                    "run folders stay where the run was trained"}
    written = write_loss_cdf(checkpoint, spec.gammas, out_dir,
                             title=f"{exp.name}: {spec.cell}, seed {run['seed']} (run {run['run_id'][:8]})")
    caption = (f"the paper's Figure 4: cumulative normalised focal loss of the {written['positives']:,} positive "
               f"and {written['negatives']:,} (sampled) negative anchors of the {written['images']} val images, "
               f"for gamma {', '.join(f'{g:g}' for g in spec.gammas)}, under the model of "
               f"'{spec.cell}' seed {run['seed']} (run `{run['run_id']}`)")
    return {"loss_cdf": (written["png"], caption)}, {}
