"""The report's edge: an experiment's tracked runs in, reports/NAME out.

It reads the runs that stand for the experiment's cells from tracking (ablate.cell_runs picks them,
with the --data / --set values given or, without any, those the runs were made with),
has ablate.analysis draw the paper's Figure 1 (the loss family) and, when the file's [report]
table asks for it, Figure 4 (loss CDFs from a trained checkpoint), and hands everything to
write_report, then has ablate.report.html make report.html (the whole report in one page, with
links to the runs in the MLflow UI). The report's files then go onto the grid's MLflow parent run
(ablate.grid_summary), so that the run page in the MLflow UI shows the report and its artifact viewer
renders report.html; the experiment's description links to that page. The torch-side work is
imported only when a report is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ablate import grid_summary, tracking
from ablate.errors import AblateError
from ablate.experiments import Experiment
from ablate.report.spec import ReportSpec
from ablate.report.write import write_report
from ablate.cell_runs import command_flags, reproduce_command, resolve_overrides, select_runs

if TYPE_CHECKING:
    from ablate.sequential import SequentialRule
from ablate.runs import Outcome, runs_frame

FIGURE1_CAPTION = "the loss family (paper's Figure 1)"


def report_spec(exp: Experiment, command: str = "") -> ReportSpec:
    """What the report of `exp` is about: its cells' varied keys and the file's [report] settings."""
    return ReportSpec(name=exp.name, description=exp.description, varied=exp.varied, x=exp.report.x,
                      hue=exp.report.hue, baseline=exp.baseline, paper_table=exp.report.paper_table,
                      command=command)


def build_report(exp: Experiment, extra: dict[str, Any] | None, out_dir: Path, command: str | None = None,
                 say=None, family: bool = False) -> dict[str, Path]:
    """Write reports/NAME from the tracked runs and attach it to their grid's parent run; returns
    the files written. `extra`: the --data / --set values, None when none were given (then the
    tracked runs' own are used). `say(line)` is told which ones were used and where the report went.
    family: judge the recorded comparisons as one family (Holm) whatever the recorded rule says."""
    tracker = tracking.Tracker(exp.name, tracking.init_store())
    tracked = runs_frame(tracker.load_runs())
    chosen = resolve_overrides(exp, extra, tracked, tracker.override_sets())
    if chosen and not extra and say:
        say(f"the tracked runs were made with{command_flags(chosen)}: reporting those")
    runs = select_runs(exp, chosen, tracked)
    if runs.empty:
        raise AblateError(f"no tracked run matches the cells of {exp.path}: run `ablate run {exp.name}` first")
    histories = tracker.load_histories(runs["run_id"].tolist())
    from ablate import adaptive

    recorded = adaptive.recorded_rule(exp, tracker.parent_tags(adaptive.RULE_TAG))
    if recorded is not None and family:
        import dataclasses

        recorded = (dataclasses.replace(recorded[0], family="holm"), recorded[1])
    budgets = adaptive.recorded_budgets(tracker.parent_tags(adaptive.BUDGETS_TAG))
    max_seeds = recorded[0].max_seeds if recorded else None
    flags = "" if not recorded else ((" --test signed-rank" if recorded[0].test == "signed_rank" else "")
                                     + (" --family" if recorded[0].family == "holm" else ""))
    spec = report_spec(exp, command or reproduce_command(exp, chosen, runs, max_seeds, budgets, flags))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures, skipped = loss_cdf_figure(exp, runs, out_dir)
    written = write_report(runs, histories, spec, out_dir, {**figure1(out_dir), **figures}, skipped)
    written = {**written, **adaptive_sections(exp, chosen, tracker, runs, spec, out_dir, written["readme"],
                                              recorded, budgets)}
    parent = report_parent(tracker, runs)
    written["html"] = write_page(tracker, parent, written, spec, out_dir)
    if parent:
        attach_to_parent(tracker, exp.name, parent, written)
        tracker.describe(exp.description, report_run_id=parent)
        if say:
            say(f"attached to MLflow run {parent} (the grid's parent run; `ablate ui {exp.name}` prints the URL "
                "of its report page)")
    return written


def write_page(tracker: tracking.Tracker, parent: str | None, written: dict[str, Path], spec: ReportSpec,
               out_dir: Path) -> Path:
    """report.html from the finished README, with links to the report page and each cell's runs
    in the MLflow UI (`tracking.ui_base` of the store)."""
    from ablate.report.html import write_html
    from ablate.report.stats import baseline_cell

    results = pd.read_csv(written["results"])
    base = tracking.ui_base(tracker.uri)
    links = [("the Runs table, grouped by cell", tracking.ui_url(base, tracker.experiment_id))]
    if parent:
        links.insert(0, ("this report in MLflow", f"{base}/{tracking.report_route(tracker.experiment_id, parent)}"))
    links += [(f"runs of {cell}", f"{base}/{tracking.cell_route(tracker.experiment_id, cell)}") for cell in results["cell"]]
    return write_html(written["readme"], results, baseline_cell(spec, results), out_dir / "report.html", links, base)


def adaptive_sections(exp: Experiment, overrides: dict[str, Any], tracker: tracking.Tracker, runs: pd.DataFrame,
                      spec: ReportSpec, out_dir: Path, readme: Path,
                      recorded: tuple[SequentialRule, list[tuple[str, str]]] | None,
                      budgets: list[float]) -> dict[str, Path]:
    """The adaptive-seeds verdicts and the budget curves, when the experiment's parent runs
    recorded a rule (`recorded`: adaptive.recorded_rule's) or budgets (`ablate run --until-settled`
    / `--budgets`), appended to the README."""
    from ablate import adaptive
    from ablate.report.adaptive import write_budgets, write_sequential

    paths, sections = {}, []
    if recorded is not None:
        written, text = write_sequential(*recorded, runs, out_dir)
        paths.update(written)
        sections.append(text)
    per_budget = adaptive.budget_runs(exp, overrides, runs_frame(tracker.load_runs()), budgets) if budgets else {}
    if per_budget:
        written, text = write_budgets(per_budget, spec, out_dir)
        paths.update(written)
        sections.append(text)
    if sections:
        readme.write_text(readme.read_text() + "\n" + "\n\n".join(sections) + "\n")
    return paths


def report_parent(tracker: tracking.Tracker, runs: pd.DataFrame) -> str | None:
    """The parent run of the newest of `runs` (the latest grid, whose summary covers the others),
    which the report goes on; None for runs without a parent (or whose parent was deleted)."""
    parents = runs.dropna(subset=["parent_run_id"]) if "parent_run_id" in runs else runs.iloc[0:0]
    if parents.empty:
        return None
    parent_id = str(parents.sort_values("start_time").iloc[-1]["parent_run_id"])
    return parent_id if tracker.is_active(parent_id) else None


def attach_to_parent(tracker: tracking.Tracker, name: str, parent_id: str, written: dict[str, Path]) -> None:
    """Put the report on run `parent_id`: its files under report/ (report.html among them, which
    the artifact viewer renders), its per-cell AP as metrics, its table, AP plot and links as the
    run's description."""
    files = list(written.values())
    tracker.attach_files(parent_id, files, "report")
    results = pd.read_csv(written["results"])
    tracker.log_summary(parent_id, grid_summary.summary_metrics(results), {},
                        grid_summary.report_note(name, written["table"].read_text(), files, tracker.experiment_id,
                                            parent_id, list(results["cell"])))


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
