"""A grid's results on its MLflow parent run, so that browsing MLflow is reading the report.

When a grid's queue is done, its parent run gets, per cell, the mean AP over finished seeds (in
percent, like every AP in MLflow), its Student t 95% interval and its finished seeds as metrics
(`AP_mean/<cell>`, `AP_ci95_low/<cell>`, `AP_ci95_high/<cell>`, `n/<cell>`),
the per-cell table as `summary/cells.csv`, and that table as the run's description, which the UI
renders on the run's page. `ablate report` later replaces the description with the report's table
and attaches its files under `report/`. Statistics come from ablate.report.stats, the same as the
report's; this module only arranges them for MLflow (through ablate.tracking).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ablate.report.spec import ReportSpec
from ablate.report.stats import aggregate, ci_bounds, is_missing, mean_std_text, percent
from ablate.report.tables import markdown_table
from ablate.cell_runs import pick_runs
from ablate.runs import runs_frame
from ablate.tracking import PERCENT_DECIMALS, cell_route, report_route

# The table columns of the summary (the paper's Table 1 reports these three).
SUMMARY_METRICS = ("AP", "AP50", "AP75")


def metric_name(cell: str) -> str:
    """A cell's name as MLflow takes it in a metric key: only letters, digits, _ - . : space (and
    / for nesting, kept for ours), so 'scales=3 ratios=[0.5,1,2]' -> 'scales:3 ratios:0.5 1 2'."""
    text = cell.replace("=", ":").replace(",", " ").replace("[", "").replace("]", "")
    return re.sub(r"[^\w.\- :]", "_", text)


def cell_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per cell of `runs` (one row per cell x seed): counts and mean, std, ci95 of each metric."""
    return aggregate(runs, ReportSpec(name="grid", description=""))


def summary_metrics(cells: pd.DataFrame) -> dict[str, float]:
    """The parent run's metrics from a per-cell table (cell_table's, or a report's results; AP as
    fractions): each cell's mean AP, the bounds of its 95% interval and its finished seeds, AP in
    percent like the child runs' in MLflow. A cell with no finished seed has none; one seed has a
    mean and no interval."""
    metrics = {}
    for _, row in cells.iterrows():
        name = metric_name(row["cell"])
        if is_missing(row["AP_mean"]):
            continue
        metrics[f"AP_mean/{name}"] = _percent(row["AP_mean"])
        low, high = ci_bounds(row["AP_mean"], row["AP_ci95"])
        if not is_missing(low):
            metrics[f"AP_ci95_low/{name}"] = _percent(low)
            metrics[f"AP_ci95_high/{name}"] = _percent(high)
        metrics[f"n/{name}"] = float(row["n"])
    return metrics


def _percent(fraction: float) -> float:
    return round(100.0 * float(fraction), PERCENT_DECIMALS)


def summary_markdown(cells: pd.DataFrame) -> str:
    """The per-cell table in Markdown: AP, AP50, AP75 as mean ± std in percent, the AP interval, n."""
    rows = []
    for _, row in cells.iterrows():
        low, high = ci_bounds(row["AP_mean"], row["AP_ci95"])
        ci = "—" if is_missing(low) else f"[{percent(low)}, {percent(high)}]"
        rows.append({"cell": row["cell"], **{m: mean_std_text(row, m) for m in SUMMARY_METRICS},
                     "AP 95% CI": ci, "n": f"{row['n']}/{row['n_runs']}"})
    return markdown_table(pd.DataFrame(rows))


def aligned(table_md: str) -> str:
    """A Markdown table (tables.markdown_table's) as columns of text padded to one width each.

    The UI renders a description's Markdown tables without cell padding ("0.6 ± 0.42.0 ± 1.5",
    seen in MLflow 3.17); in a code block, aligned text reads like the report's table.
    """
    rows = [[cell.replace("\\|", "|") for cell in line.strip()[2:-2].split(" | ")]
            for line in table_md.strip().splitlines()
            if line.startswith("|") and not set(line) <= set("|:- ")]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def cell_links(experiment_id: str, cells: list[str]) -> str:
    """A Markdown line of links to each cell's runs in the Runs table (hash routes of the UI)."""
    return "Runs per cell: " + " · ".join(f"[{cell}]({cell_route(experiment_id, cell)})" for cell in cells)


def grid_note(name: str, cells: pd.DataFrame, experiment_id: str | None = None) -> str:
    """The parent run's description after its grid: what the numbers are, the table, what next."""
    links = f"{cell_links(experiment_id, list(cells['cell']))}\n\n" if experiment_id else ""
    return (f"## {name}: the grid's summary\n\n```\n{aligned(summary_markdown(cells))}\n```\n\n"
            "Mean ± std over finished seeds, in percent; AP 95% CI: Student t interval of the mean; n: finished / "
            "tracked seeds. Each cell's runs are this run's children (or an earlier grid's, when it had finished "
            f"them). {links}`ablate report {name}` puts the full report (report.html: tables, plots, verdicts) "
            "under this run's artifacts.\n")


def report_note(name: str, table_md: str, files: list[Path], experiment_id: str | None = None,
                run_id: str | None = None, cells: list[str] = ()) -> str:
    """The parent run's description once `ablate report` attached its files to run `run_id`: a
    link to the report page, the report's table (table.md: the table, then its caption), the AP
    plot (an image link to the attached file, which the UI renders), each cell's runs, and where
    the rest is."""
    table, _, caption = table_md.strip().partition("\n\n")
    listed = ", ".join(f"`report/{p.name}`" for p in files)
    page = plot = links = ""
    if experiment_id and run_id:
        page = (f"**[Report page]({report_route(experiment_id, run_id)})**: tables, plots, verdicts and the paper's "
                "numbers in one page (`report/report.html`, also in the report folder on disk).\n\n")
        if any(p.name == "ap.png" for p in files):
            plot = f"![AP per cell](get-artifact?path=report/ap.png&run_uuid={run_id})\n\n"
        links = f"{cell_links(experiment_id, list(cells))}\n\n" if len(cells) else ""
    return (f"## {name}: report\n\n{page}```\n{aligned(table)}\n```\n\n{caption.strip()}\n\n{plot}{links}"
            f"Files (artifacts): {listed}.\n")


def write_grid_summary(tracker, parent_id: str, planned: list[tuple[str, int, str]], name: str) -> bool:
    """Put the summary of the planned runs (cell, cell index, config hash) on the grid's parent
    run `parent_id`; False when none of them has a tracked run."""
    runs = pick_runs(planned, runs_frame(tracker.load_runs()))
    if runs.empty:
        return False
    cells = cell_table(runs)
    tracker.log_summary(parent_id, summary_metrics(cells), {"cells.csv": cells.to_csv(index=False)},
                        grid_note(name, cells, tracker.experiment_id))
    return True
