"""The report's tables: results.csv (one tidy row per cell, full precision) and the displayed
table laid out like a sub-table of the paper's Table 1, as Markdown and LaTeX."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ablate.report.paper import as_list, paper_rows, trunk_depth
from ablate.report.spec import TABLE_METRICS, ReportSpec
from ablate.report.stats import (MISSING, NOT_FINISHED, aggregate, baseline_cell, baseline_deltas, ci_bounds,
                                 is_missing, mean_std_text, percent)

# Table headers like the paper's; a key not listed here is shown as itself.
HEADERS = {
    "loss.gamma": "gamma",
    "loss.alpha": "alpha",
    "loss.beta": "beta",
    "loss.cls": "loss",
    "model.prior": "pi",
    "model.num_scales": "#sc",
    "model.aspect_ratios": "#ar",
    "loss.ohem_batch": "batch",
    "loss.ohem_nms": "nms",
    "loss.ohem_fg_fraction": "fg:bg",
    "model.trunk": "depth",
    "data.min_size": "scale",
    "loss.box": "box loss",
    "loss.normalizer": "normalizer",
}
# Loss keys that only mean something for some classification losses: the focal row of Table 1d
# shows no OHEM batch, a CE row no gamma.
LOSS_KEYS_USED_BY = {"loss.gamma": ("focal", "focal_star"), "loss.alpha": ("alpha_ce", "focal"),
                     "loss.beta": ("focal_star",), "loss.ohem_batch": ("ohem",), "loss.ohem_nms": ("ohem",),
                     "loss.ohem_fg_fraction": ("ohem",)}


def results_table(runs: pd.DataFrame, spec: ReportSpec) -> pd.DataFrame:
    """aggregate() with the baseline deltas and the paper's numbers joined in (results.csv)."""
    cells = aggregate(runs, spec)
    extra = [baseline_deltas(runs, cells, spec), paper_rows(spec, cells)]
    # Keep cell identity, varied keys, counts and statistics first; other config keys last.
    first = [c for c in cells.columns if "." not in c or c in spec.varied]
    rest = [c for c in cells.columns if c not in first]
    return pd.concat([cells[first], *extra, cells[rest]], axis=1)


# ----------------------------------------------------------------------------- values as text


def applies(key: str, row: pd.Series) -> bool:
    """Whether config `key` plays a part in the run(s) of `row` (False: shown as a dash)."""
    users = LOSS_KEYS_USED_BY.get(key)
    return users is None or "loss.cls" not in row or row["loss.cls"] in users


def display_value(key: str, value: Any) -> Any:
    """A config value as the paper's tables show it: #ar is a count, depth a number, fg:bg a ratio."""
    if key == "model.aspect_ratios" and not is_missing(value):
        return len(as_list(value))
    if is_missing(value):
        return "none"
    if key == "model.trunk":
        return trunk_depth(value) or value
    if key == "loss.ohem_fg_fraction":
        return f"1:{(1 - value) / value:g}"
    return value


def format_cell(value: Any) -> str:
    """Text of a displayed value: floats without trailing zeros (0.25, 2, 0.999)."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return f"{value:g}"
    return str(value)


def header(key: str) -> str:
    """The paper-style column name of a config key (the key itself when it has none)."""
    return HEADERS.get(key, key)


def cell_status(row: pd.Series) -> str | None:
    """"diverged (k/n)" (or failed / pruned) for a cell without a finished run, else None."""
    if row["n"] > 0:
        return None
    for outcome in NOT_FINISHED:
        if row[f"n_{outcome}"] > 0:
            return f"{outcome} ({row[f'n_{outcome}']}/{row['n_runs']})"
    return "no runs"


def _count(row: pd.Series) -> str:
    """"3" when every run finished, else "2/3 (1 diverged)"."""
    if row["n"] == row["n_runs"]:
        return str(row["n"])
    lost = ", ".join(f"{row[f'n_{o}']} {o}" for o in NOT_FINISHED if row[f"n_{o}"] > 0)
    return f"{row['n']}/{row['n_runs']} ({lost})"


def _ci_text(row: pd.Series) -> str:
    """The AP 95% interval as "[low, high]" in percent, MISSING below two seeds."""
    if is_missing(row["AP_ci95"]):
        return MISSING
    low, high = ci_bounds(row["AP_mean"], row["AP_ci95"])
    return f"[{percent(low)}, {percent(high)}]"


def _delta_text(row: pd.Series, base: str) -> str:
    """ΔAP in AP points, signed; "baseline" on the baseline's own row."""
    if row["cell"] == base:
        return "baseline"
    return percent(row["AP_delta"], sign=True)


# ----------------------------------------------------------------------------- the displayed table


def _table_row(row: pd.Series, spec: ReportSpec, base: str) -> dict[str, str]:
    """One row of the displayed table, all text."""
    out = {header(k): format_cell(display_value(k, row[k])) if applies(k, row) else MISSING for k in spec.varied}
    status = cell_status(row)
    for metric in TABLE_METRICS:
        out[metric] = mean_std_text(row, metric) if status is None else (status if metric == "AP" else MISSING)
    out["n"] = _count(row)
    out["AP 95% CI"] = _ci_text(row)
    out["ΔAP"] = _delta_text(row, base)
    if spec.paper_table is not None:
        for metric in TABLE_METRICS:
            out[f"paper {metric}"] = percent(row[f"paper_{metric}"])
    out["cell"] = row["cell"]
    return out


def display_table(results: pd.DataFrame, spec: ReportSpec) -> pd.DataFrame:
    """The report's table as text, one row per cell in file order (varied keys first)."""
    base = baseline_cell(spec, results)
    return pd.DataFrame([_table_row(row, spec, base) for _, row in results.iterrows()])


def table_caption(spec: ReportSpec, base: str) -> str:
    """The text under the table: what each column means and where the paper's numbers come from."""
    paper = (f" Paper columns: Lin et al. 2017, Table 1({spec.paper_table}), whose setting (COCO, "
             "ResNet-FPN, 90k iterations) may differ from ours." if spec.paper_table else "")
    return ("AP, AP50, AP75: mean ± std over finished seeds, in percent; n: finished seeds. "
            "AP 95% CI: Student t interval of the mean. ΔAP: AP minus the baseline's "
            f"(`{base}`) in AP points.{paper}")


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of string cells (numbers right-aligned)."""
    def cell(text: Any) -> str:
        """A cell's text with pipes escaped, so they do not split the row."""
        return str(text).replace("|", "\\|")

    # Numbers read best right-aligned; the free-text cell name stays left.
    lines = ["| " + " | ".join(cell(c) for c in table.columns) + " |",
             "|" + "|".join(":---" if c == "cell" else "---:" for c in table.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def latex_table(table: pd.DataFrame, caption: str) -> str:
    """LaTeX (booktabs) of the displayed table, special characters escaped."""
    styler = table.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    latex = styler.to_latex(hrules=True, caption=caption.replace("`", ""), position_float="centering")
    # Escaping leaves non-ASCII as is; give pdflatex math for the two symbols the table uses.
    return latex.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("—", "--")
