"""Ablation reports: statistics over seeds, the paper's numbers beside ours, tables and plots.

The input is what the tracking module reads back from MLflow; nothing here talks to MLflow or
imports torch. One module per concept:

    spec.py     ReportSpec: what a report is about (name, varied keys, x, hue, baseline, paper table)
    stats.py    per-cell statistics over seeds (mean, std, Student t CI, counts), baseline deltas
                (paired or Welch), "mean ± std" text; the findings use them too
    paper.py    the paper's Table 1 (ablate/reference/paper_table1.csv) and which row is a cell's
    tables.py   results.csv's tidy table; the displayed table as Markdown and LaTeX
    plots.py    the seaborn plots (AP, loss curves, deltas) and the shared figure style
    write.py    write_report: the report folder, its README and provenance
    build.py    the edge (imported on its own, not here): tracked runs in, Figures 1 and 4 from
                ablate.analysis, write_report out
"""

from ablate.report.paper import paper_rows, paper_table
from ablate.report.plots import plot_ap, plot_deltas, plot_loss_curves
from ablate.report.spec import METRICS, TABLE_METRICS, ReportSpec
from ablate.report.stats import (Welch, aggregate, baseline_cell, baseline_deltas, mean_std_text, paired_or_welch,
                                 summarize, t_halfwidth, t_interval, welch)
from ablate.report.tables import display_table, latex_table, markdown_table, results_table, table_caption
from ablate.report.write import write_report

__all__ = ["METRICS", "TABLE_METRICS", "ReportSpec", "Welch", "aggregate", "baseline_cell", "baseline_deltas",
           "display_table", "latex_table", "markdown_table", "mean_std_text", "paired_or_welch", "paper_rows",
           "paper_table", "plot_ap", "plot_deltas", "plot_loss_curves", "results_table", "summarize",
           "t_halfwidth", "t_interval", "table_caption", "welch", "write_report"]
