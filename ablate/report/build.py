"""The report's edge: an experiment's tracked runs in, reports/NAME out.

It reads the runs that stand for the experiment's cells from tracking (ablate.results picks them),
has ablate.analysis draw the paper's Figure 1 (the loss family) and, when the file's [report]
table asks for it, Figure 4 (loss CDFs from a trained checkpoint), and hands everything to
write_report. The torch-side work is imported only when a report is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ablate import tracking
from ablate.errors import AblateError
from ablate.experiments import Experiment
from ablate.report.spec import ReportSpec
from ablate.report.write import write_report
from ablate.results import reproduce_command, select_runs
from ablate.runs import Outcome

FIGURE1_CAPTION = "the loss family (paper's Figure 1)"


def report_spec(exp: Experiment, command: str = "") -> ReportSpec:
    """What the report of `exp` is about: its cells' varied keys and the file's [report] settings."""
    return ReportSpec(name=exp.name, description=exp.description, varied=exp.varied, x=exp.report.x,
                      hue=exp.report.hue, baseline=exp.baseline, paper_table=exp.report.paper_table,
                      command=command)


def build_report(exp: Experiment, extra: dict[str, Any], out_dir: Path, command: str | None = None) -> dict[str, Path]:
    """Write reports/NAME from the tracked runs; returns the files written."""
    tracker = tracking.Tracker(exp.name, tracking.init_store())
    runs = select_runs(exp, extra, tracker.load_runs())
    if runs.empty:
        raise AblateError(f"no tracked run matches the cells of {exp.path}: run `ablate run {exp.name}` first")
    histories = tracker.load_histories(runs["run_id"].tolist())
    spec = report_spec(exp, command or reproduce_command(exp, extra, runs))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures, skipped = loss_cdf_figure(exp, runs, out_dir)
    written = write_report(runs, histories, spec, out_dir, {**figure1(out_dir), **figures}, skipped)
    return {**written, **adaptive_sections(exp, extra, tracker, runs, spec, out_dir, written["readme"])}


def adaptive_sections(exp: Experiment, extra: dict[str, Any], tracker: tracking.Tracker, runs: pd.DataFrame,
                      spec: ReportSpec, out_dir: Path, readme: Path) -> dict[str, Path]:
    """The adaptive-seeds verdicts and the budget curves, when the experiment's parent runs
    recorded a rule or budgets (`ablate run --until-settled` / `--budgets`), appended to the README."""
    from ablate import adaptive
    from ablate.report.adaptive import write_budgets, write_sequential

    paths, sections = {}, []
    recorded = adaptive.recorded_rule(exp, tracker.parent_tags(adaptive.RULE_TAG))
    if recorded is not None:
        written, text = write_sequential(*recorded, runs, out_dir)
        paths.update(written)
        sections.append(text)
    budgets = adaptive.recorded_budgets(tracker.parent_tags(adaptive.BUDGETS_TAG))
    per_budget = adaptive.budget_runs(exp, extra, tracker.load_runs(), budgets) if budgets else {}
    if per_budget:
        written, text = write_budgets(per_budget, spec, out_dir)
        paths.update(written)
        sections.append(text)
    if sections:
        readme.write_text(readme.read_text() + "\n" + "\n\n".join(sections) + "\n")
    return paths


def figure1(out_dir: Path) -> dict[str, tuple[Path, str]]:
    """The paper's Figure 1 as loss_vs_pt.png in out_dir: {"loss_vs_pt": (png, caption)}."""
    from ablate.analysis import plot_loss_vs_pt

    return {"loss_vs_pt": (plot_loss_vs_pt(out_dir / "loss_vs_pt.png"), FIGURE1_CAPTION)}


def loss_cdf_figure(exp: Experiment, runs: pd.DataFrame, out_dir: Path) -> tuple[dict, dict]:
    """Figure 4 when the file asks for it ([report.loss_cdf]): from the checkpoint of the cell's
    finished run with the lowest seed. Returns ({"loss_cdf": (png, caption)}, {}) or
    ({}, {"loss_cdf.png": why})."""
    spec = exp.report.loss_cdf
    if spec is None:
        return {}, {}
    finished = runs[(runs["cell"] == spec.cell) & (runs["outcome"] == Outcome.FINISHED)]
    if finished.empty:
        return {}, {"loss_cdf.png": f"no finished run of the cell '{spec.cell}'"}
    run = finished.sort_values("seed").iloc[0]
    checkpoint = Path(str(run.get("run_dir") or "")) / "checkpoint.pt"
    if not run.get("run_dir") or not checkpoint.is_file():
        return {}, {"loss_cdf.png": f"the checkpoint of run {run['run_id']} ({checkpoint}) is not on this machine; "
                                    "run folders stay where the run was trained"}
    from ablate.analysis import write_loss_cdf

    written = write_loss_cdf(checkpoint, spec.gammas, out_dir,
                             title=f"{exp.name}: {spec.cell}, seed {run['seed']} (run {run['run_id'][:8]})")
    caption = (f"the paper's Figure 4: cumulative normalised focal loss of the {written['positives']:,} positive "
               f"and {written['negatives']:,} (sampled) negative anchors of the {written['images']} val images, "
               f"for gamma {', '.join(f'{g:g}' for g in spec.gammas)}, under the model of "
               f"'{spec.cell}' seed {run['seed']} (run `{run['run_id']}`)")
    return {"loss_cdf": (written["png"], caption)}, {}
