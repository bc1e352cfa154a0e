"""Ablation reports: statistics over seeds, the paper's numbers beside ours, tables and plots.

The input is what the tracking module reads back from MLflow (this module never talks to MLflow
itself): `runs`, one row per child run (one cell x one seed) with its outcome, flattened config
keys and final metrics as fractions in [0, 1], and `histories`, step metrics in long form
(run_id, key, step, value). `write_report` turns them into one folder: table.md / table.tex laid
out like a sub-table of the paper's Table 1, results.csv and runs.csv (so that every number
traces back to a run_id), the plots, and a README.md that ties them together.

Statistics: metrics are averaged over *finished* runs only; diverged, failed and pruned runs are
counted and shown, never averaged in. Uncertainty is over seeds: the std (ddof=1) and a Student t
95% interval, both NaN for a single seed, since one seed says nothing about the spread.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import stats

from ablate.config import Config, flatten
from ablate.losses import focal

# Metrics summarised per cell (mean, std, ci95); fractions in [0, 1] like the runs' columns.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
# The paper's sub-tables report these three.
TABLE_METRICS = ("AP", "AP50", "AP75")
# Outcomes a run can end with besides "finished" (tracking tags a run whose process vanished
# "interrupted"); anything else is counted as "other" rather than lost.
NOT_FINISHED = ("diverged", "failed", "pruned", "interrupted", "other")
# Our metric name -> the column of paper_table1.csv (the paper writes APS/APM/APL).
PAPER_COLUMNS = {"AP": "AP", "AP50": "AP50", "AP75": "AP75", "APs": "APS", "APm": "APM", "APl": "APL",
                 "time_ms": "time_ms"}
PAPER_TABLES = ("a", "b", "c", "d", "e")
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
FLOAT_TOL = 1e-6
DPI = 120
# Loss curves are drawn from at most this many step bins: the paper's 90k iterations would
# otherwise give a CI computation per logged step and an unreadable, aliased line.
MAX_CURVE_POINTS = 200
FIGURE1_GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
MISSING = "—"


@dataclass
class ReportSpec:
    """What one report is about: the ablation's name, the keys its cells vary and how to plot them."""

    name: str  # ablation name, e.g. "gamma-sweep"
    description: str
    varied: list[str] = field(default_factory=list)  # config keys the cells vary, in the experiment's order
    x: str | None = None  # key on the x axis of the AP plot (default: varied[0] if numeric)
    hue: str | None = None  # key for colour (e.g. "loss.cls")
    baseline: str | None = None  # cell name that deltas are measured against (default: first cell)
    paper_table: str | None = None  # "a".."e" of paper_table1.csv
    command: str = ""  # the command line that reproduces the report


# ----------------------------------------------------------------------------- statistics


def t_halfwidth(std: float, n: int, df: float | None = None, level: float = 0.95) -> float:
    """Half-width of the Student t interval of a mean: t(1 - (1 - level) / 2, df) * std / sqrt(n).

    df defaults to n - 1; NaN when there are fewer than two values (no spread to speak of).
    """
    df = n - 1 if df is None else df
    if n < 2 or not df > 0 or not math.isfinite(std):
        return math.nan
    return float(stats.t.ppf(1 - (1 - level) / 2, df) * std / math.sqrt(n))


def summarize(values: Sequence[float] | pd.Series) -> tuple[float, float, float, int]:
    """(mean, std with ddof=1, 95% t half-width, count) of the non-NaN `values`."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    if n == 1:
        return float(v[0]), math.nan, math.nan, 1
    std = float(v.std(ddof=1))
    return float(v.mean()), std, t_halfwidth(std, n), n


def t_interval(values: pd.Series) -> tuple[float, float]:
    """(low, high) of the 95% t interval of the mean, as seaborn's `errorbar` callable.

    seaborn's own ("ci", 95) bootstraps, which over 3 seeds gives a band about as wide as the
    values' range; this keeps the plotted bands equal to the table's ci95.
    """
    mean, _, half, _ = summarize(values)
    if math.isnan(half):
        return mean, mean
    return mean - half, mean + half


def _outcome_counts(group: pd.DataFrame) -> dict[str, int]:
    """n (finished runs), n_runs and n_diverged / n_failed / n_pruned / ... of one cell's runs."""
    outcome = group["outcome"].where(group["outcome"].isin(("finished", *NOT_FINISHED)), "other")
    counts = {"n": int((outcome == "finished").sum()), "n_runs": len(group)}
    for name in NOT_FINISHED:
        counts[f"n_{name}"] = int((outcome == name).sum())
    return counts


def _cell_row(cell: str, index: int, group: pd.DataFrame, spec: ReportSpec) -> dict[str, Any]:
    """One row of `aggregate`: identity, varied keys, counts, statistics, provenance, other config."""
    finished = group[group["outcome"] == "finished"]
    row: dict[str, Any] = {"cell": cell, "cell_index": int(index)}
    row.update({key: group[key].iloc[0] for key in spec.varied})
    row.update(_outcome_counts(group))
    for metric in METRICS:
        values = finished[metric] if metric in finished else pd.Series(dtype=float)
        mean, std, ci95, _ = summarize(values)
        row.update({f"{metric}_mean": mean, f"{metric}_std": std, f"{metric}_ci95": ci95})
    row["seeds"] = " ".join(str(s) for s in sorted(finished["seed"]))
    row["run_ids"] = " ".join(finished["run_id"])
    # The rest of the config (constant within a cell) lets paper_rows match keys the cells do not vary.
    config_keys = [c for c in group.columns if "." in c and c not in spec.varied]
    row.update({key: group[key].iloc[0] for key in config_keys})
    return row


def _check_runs(runs: pd.DataFrame, spec: ReportSpec) -> None:
    """A ValueError naming what is missing, rather than a KeyError deep inside pandas."""
    if runs.empty:
        raise ValueError(f"report '{spec.name}': no runs to report")
    required = ["run_id", "cell", "cell_index", "seed", "outcome", *spec.varied]
    missing = [c for c in required if c not in runs.columns]
    if missing:
        raise ValueError(f"report '{spec.name}': runs lack the column(s) {', '.join(missing)}")


def aggregate(runs: pd.DataFrame, spec: ReportSpec) -> pd.DataFrame:
    """One row per cell, ordered by cell_index: varied keys, counts and per-metric statistics.

    Columns: cell, cell_index, the varied keys, n (finished seeds), n_runs, n_diverged, n_failed,
    n_pruned, n_interrupted, n_other, `<metric>_mean/_std/_ci95` for each of METRICS (finished runs only; std and ci95
    NaN below two values), seeds and run_ids of the finished runs, then the cells' other config keys.
    """
    _check_runs(runs, spec)
    rows = [_cell_row(cell, index, group, spec)
            for (index, cell), group in runs.groupby(["cell_index", "cell"], sort=True)]
    return pd.DataFrame(rows).reset_index(drop=True)


def baseline_cell(spec: ReportSpec, cells: pd.DataFrame) -> str:
    """The cell deltas are measured against: spec.baseline, else the first cell."""
    if spec.baseline is None:
        return str(cells["cell"].iloc[0])
    if spec.baseline not in set(cells["cell"]):
        raise ValueError(f"report '{spec.name}': baseline '{spec.baseline}' is no cell "
                         f"(cells: {', '.join(cells['cell'])})")
    return spec.baseline


def _finished_by_seed(runs: pd.DataFrame, cell: str, metric: str) -> pd.Series:
    """The finished runs' `metric` of one cell, indexed by seed, NaN dropped."""
    rows = runs[(runs["cell"] == cell) & (runs["outcome"] == "finished")]
    if metric not in rows:
        return pd.Series(dtype=float)
    return rows.set_index("seed")[metric].astype(float).dropna()


def paired_or_welch(cell: pd.Series, base: pd.Series) -> tuple[float, float, bool]:
    """(mean difference, 95% half-width, paired?) of cell - base, two seed-indexed Series.

    Same seeds on both sides: the seeds are paired (same data order and initialisation), so the
    interval is over per-seed differences, which removes the seed-to-seed spread both share.
    Otherwise the difference of means with Welch's interval.
    """
    if len(cell) and cell.index.is_unique and base.index.is_unique and set(cell.index) == set(base.index):
        mean, _, half, _ = summarize(cell - base.reindex(cell.index))
        return mean, half, True
    m_c, s_c, _, n_c = summarize(cell)
    m_b, s_b, _, n_b = summarize(base)
    if n_c < 2 or n_b < 2:
        return m_c - m_b, math.nan, False
    var_c, var_b = s_c**2 / n_c, s_b**2 / n_b
    if var_c + var_b == 0:
        return m_c - m_b, 0.0, False
    df = (var_c + var_b) ** 2 / (var_c**2 / (n_c - 1) + var_b**2 / (n_b - 1))
    half = float(stats.t.ppf(0.975, df) * math.sqrt(var_c + var_b))
    return m_c - m_b, half, False


def baseline_deltas(runs: pd.DataFrame, cells: pd.DataFrame, spec: ReportSpec,
                    metric: str = "AP") -> pd.DataFrame:
    """Per cell (aligned with `cells`): `<metric>_delta`, `<metric>_delta_ci95`, `delta_paired`.

    The difference to the baseline cell in the metric's units (fractions), over finished runs.
    """
    base = _finished_by_seed(runs, baseline_cell(spec, cells), metric)
    rows = [paired_or_welch(_finished_by_seed(runs, cell, metric), base) for cell in cells["cell"]]
    return pd.DataFrame(rows, index=cells.index,
                        columns=[f"{metric}_delta", f"{metric}_delta_ci95", "delta_paired"])


# ----------------------------------------------------------------------------- the paper's Table 1


@functools.cache
def _paper_csv() -> pd.DataFrame:
    """The whole of paper_table1.csv, read once from the installed package."""
    with importlib.resources.files("ablate.reference").joinpath("paper_table1.csv").open() as f:
        return pd.read_csv(f, comment="#", dtype={"table": str, "method": str})


def paper_table(table: str) -> pd.DataFrame:
    """Rows of sub-table `table` ("a".."e") of the paper's Table 1, as in the CSV (AP in percent)."""
    if table not in PAPER_TABLES:
        raise ValueError(f"unknown paper table '{table}' (known: {', '.join(PAPER_TABLES)})")
    frame = _paper_csv()
    return frame[frame["table"] == table].reset_index(drop=True)


def _is_missing(value: Any) -> bool:
    """None or a float NaN (pandas turns a None config value into NaN in float columns)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _close(value: Any, target: float) -> bool:
    """value == target within FLOAT_TOL; False for None or a non-number."""
    try:
        return math.isclose(float(value), target, rel_tol=0.0, abs_tol=FLOAT_TOL)
    except (TypeError, ValueError):
        return False


def _as_list(value: Any) -> list:
    """A list value that may have come back from tracking as its JSON text."""
    if isinstance(value, str):
        value = json.loads(value)
    return list(value)


def trunk_depth(trunk: Any) -> int | None:
    """50 for "resnet50", 101 for "resnet101"; None for a trunk without a ResNet depth ("tiny")."""
    if isinstance(trunk, str) and trunk.startswith("resnet") and trunk[6:].isdigit():
        return int(trunk[6:])
    return None


# Each of these maps a cell (a getter of config keys) to the columns that pick its row of one
# sub-table, or to None when the cell has no counterpart there.
Getter = Callable[[str], Any]


def _keys_a(get: Getter) -> dict[str, Any] | None:
    """Table 1(a): alpha of alpha-balanced CE."""
    cls = get("loss.cls")
    # Focal loss with gamma 0 is alpha-CE (ablate.losses.focal), so it finds the same row.
    if cls == "alpha_ce" or (cls == "focal" and _close(get("loss.gamma"), 0.0)):
        return {"method": "alpha_ce", "alpha": get("loss.alpha")}
    return None


def _keys_b(get: Getter) -> dict[str, Any] | None:
    """Table 1(b): gamma and alpha of focal loss."""
    if get("loss.cls") != "focal":
        return None
    return {"method": "focal", "gamma": get("loss.gamma"), "alpha": get("loss.alpha")}


def _keys_c(get: Getter) -> dict[str, Any] | None:
    """Table 1(c): anchor scales and the number of aspect ratios."""
    return {"num_scales": get("model.num_scales"), "num_ratios": len(_as_list(get("model.aspect_ratios")))}


def _keys_d(get: Getter) -> dict[str, Any] | None:
    """Table 1(d): OHEM (batch, NMS, the 1:3 ratio) against FL."""
    cls = get("loss.cls")
    if cls == "focal":  # the table's single FL row has no OHEM settings
        return {"method": "focal"}
    if cls != "ohem":
        return None
    fraction = get("loss.ohem_fg_fraction")
    if _is_missing(fraction):
        method = "ohem"
    elif _close(fraction, 0.25):
        method = "ohem_1to3"
    else:
        return None  # a forced ratio other than the paper's 1:3
    return {"method": method, "ohem_batch": get("loss.ohem_batch"), "ohem_nms": get("loss.ohem_nms")}


def _keys_e(get: Getter) -> dict[str, Any] | None:
    """Table 1(e): ResNet depth and image scale."""
    depth = trunk_depth(get("model.trunk"))
    return None if depth is None else {"depth": depth, "scale": get("data.min_size")}


PAPER_KEYS: dict[str, Callable[[Getter], dict[str, Any] | None]] = {
    "a": _keys_a, "b": _keys_b, "c": _keys_c, "d": _keys_d, "e": _keys_e}


def _matching_row(table: pd.DataFrame, wanted: dict[str, Any]) -> pd.Series | None:
    """The first row of `table` whose columns equal `wanted` (numbers within FLOAT_TOL)."""
    mask = pd.Series(True, index=table.index)
    for column, value in wanted.items():
        if _is_missing(value):
            return None
        if isinstance(value, str):
            mask &= table[column] == value
        else:
            mask &= np.isclose(table[column].astype(float), float(value), rtol=0.0, atol=FLOAT_TOL)
    hits = table[mask]
    return None if hits.empty else hits.iloc[0]


def _getter(cell: pd.Series, defaults: dict[str, Any]) -> Getter:
    """Looks a key up in the cell, falling back to the config default when the column is absent."""
    return lambda key: cell[key] if key in cell.index else defaults.get(key)


def paper_rows(spec: ReportSpec, cells: pd.DataFrame) -> pd.DataFrame:
    """The paper's numbers for each cell (aligned with `cells`), NaN where no row matches.

    Columns `paper_<metric>` for AP, AP50, AP75, APs, APm, APl as fractions (the CSV's percent
    / 100, the same unit as our columns) and `paper_time_ms`. All NaN without spec.paper_table.
    """
    columns = [f"paper_{m}" for m in PAPER_COLUMNS]
    out = pd.DataFrame(np.nan, index=cells.index, columns=columns)
    if spec.paper_table is None:
        return out
    table, keys = paper_table(spec.paper_table), PAPER_KEYS[spec.paper_table]
    defaults = flatten(Config())
    for index, cell in cells.iterrows():
        wanted = keys(_getter(cell, defaults))
        row = None if wanted is None else _matching_row(table, wanted)
        if row is None:
            continue
        for ours, theirs in PAPER_COLUMNS.items():
            scale = 1.0 if ours == "time_ms" else 0.01
            out.loc[index, f"paper_{ours}"] = float(row[theirs]) * scale
    return out


def results_table(runs: pd.DataFrame, spec: ReportSpec) -> pd.DataFrame:
    """aggregate() with the baseline deltas and the paper's numbers joined in (results.csv)."""
    cells = aggregate(runs, spec)
    extra = [baseline_deltas(runs, cells, spec), paper_rows(spec, cells)]
    # Keep cell identity, varied keys, counts and statistics first; other config keys last.
    first = [c for c in cells.columns if "." not in c or c in spec.varied]
    rest = [c for c in cells.columns if c not in first]
    return pd.concat([cells[first], *extra, cells[rest]], axis=1)


# ----------------------------------------------------------------------------- tables


# Loss keys that only mean something for some classification losses: the focal row of Table 1d
# shows no OHEM batch, a CE row no gamma.
LOSS_KEYS_USED_BY = {"loss.gamma": ("focal", "focal_star"), "loss.alpha": ("alpha_ce", "focal"),
                     "loss.beta": ("focal_star",), "loss.ohem_batch": ("ohem",), "loss.ohem_nms": ("ohem",),
                     "loss.ohem_fg_fraction": ("ohem",)}


def applies(key: str, row: pd.Series) -> bool:
    """Whether config `key` plays a part in the run(s) of `row` (False: shown as a dash)."""
    users = LOSS_KEYS_USED_BY.get(key)
    return users is None or "loss.cls" not in row or row["loss.cls"] in users


def display_value(key: str, value: Any) -> Any:
    """A config value as the paper's tables show it: #ar is a count, depth a number, fg:bg a ratio."""
    if key == "model.aspect_ratios" and not _is_missing(value):
        return len(_as_list(value))
    if _is_missing(value):
        return "none"
    if key == "model.trunk":
        return trunk_depth(value) or value
    if key == "loss.ohem_fg_fraction":
        return f"1:{(1 - value) / value:g}"
    return value


def format_value(value: Any) -> str:
    """Text of a displayed value: floats without trailing zeros (0.25, 2, 0.999)."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return f"{value:g}"
    return str(value)


def header(key: str) -> str:
    """The paper-style column name of a config key (the key itself when it has none)."""
    return HEADERS.get(key, key)


def _percent(value: float, sign: bool = False) -> str:
    """A fraction as percent with one decimal ("32.0", "+1.5" with sign), MISSING for NaN."""
    return MISSING if _is_missing(value) else f"{100 * value:{'+' if sign else ''}.1f}"


def mean_std_text(row: pd.Series, metric: str) -> str:
    """"32.0 ± 2.0" in percent; the mean alone when there is no std (one seed)."""
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if _is_missing(mean):
        return MISSING
    return _percent(mean) if _is_missing(std) else f"{_percent(mean)} ± {_percent(std)}"


def _status(row: pd.Series) -> str | None:
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
    mean, half = row["AP_mean"], row["AP_ci95"]
    if _is_missing(half):
        return MISSING
    return f"[{_percent(mean - half)}, {_percent(mean + half)}]"


def _delta_text(row: pd.Series, base: str) -> str:
    """ΔAP in AP points, signed; "baseline" on the baseline's own row."""
    if row["cell"] == base:
        return "baseline"
    return _percent(row["AP_delta"], sign=True)


def _table_row(row: pd.Series, spec: ReportSpec, base: str) -> dict[str, str]:
    """One row of the displayed table, all text."""
    out = {header(k): format_value(display_value(k, row[k])) if applies(k, row) else MISSING for k in spec.varied}
    status = _status(row)
    for metric in TABLE_METRICS:
        out[metric] = mean_std_text(row, metric) if status is None else (status if metric == "AP" else MISSING)
    out["n"] = _count(row)
    out["AP 95% CI"] = _ci_text(row)
    out["ΔAP"] = _delta_text(row, base)
    if spec.paper_table is not None:
        for metric in TABLE_METRICS:
            out[f"paper {metric}"] = _percent(row[f"paper_{metric}"])
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


# ----------------------------------------------------------------------------- plots


def _style():
    """The seaborn look for every figure, as a context (no global rcParams change)."""
    return sns.axes_style("whitegrid")


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, Any]:
    """A Figure not registered with pyplot: rendered by Agg on save, never displayed, nothing to close."""
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols)


def _save(fig: Figure, path: Path) -> Path:
    """Render `fig` to a PNG at DPI."""
    fig.savefig(path, dpi=DPI)
    return path


def _x_key(spec: ReportSpec, cells: pd.DataFrame) -> str | None:
    """spec.x, else varied[0] when its displayed values are numbers, else None (cell names)."""
    if spec.x is not None:
        return spec.x
    if spec.varied and _numeric([display_value(spec.varied[0], v) for v in cells[spec.varied[0]]]):
        return spec.varied[0]
    return None


def _numeric(values: Sequence[Any]) -> bool:
    """Whether every value is a number (bools excluded) and so can sit on a continuous axis."""
    return all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
               for v in values)


def _label_of(cell: pd.Series, keys: Sequence[str]) -> str:
    """"gamma=2, alpha=0.25": a cell's values of `keys` with their table headers."""
    return ", ".join(f"{header(k)}={format_value(display_value(k, cell[k]))}" for k in keys)


def _hue_labels(spec: ReportSpec, cells: pd.DataFrame, x_key: str | None) -> tuple[list | None, str | None]:
    """Per-cell hue labels and the legend title, or (None, None) for a single colour.

    Without spec.hue, cells that share an x value would be averaged into one point; the other
    varied keys then become the hue so that each cell keeps its own line.
    """
    if spec.hue is not None:
        return [format_value(display_value(spec.hue, v)) for v in cells[spec.hue]], header(spec.hue)
    if x_key is None:
        return None, None
    x_values = [display_value(x_key, v) for v in cells[x_key]]
    others = [k for k in spec.varied if k != x_key]
    if len(set(map(str, x_values))) == len(x_values) or not others:
        return None, None
    return [_label_of(c, others) for _, c in cells.iterrows()], ", ".join(header(k) for k in others)


def _plot_frame(runs: pd.DataFrame, cells: pd.DataFrame, spec: ReportSpec) -> tuple[pd.DataFrame, dict]:
    """Finished per-run rows with `_x`, `_hue`, `AP%` columns, and the plot's layout facts."""
    x_key = _x_key(spec, cells)
    if x_key is None:
        x_values = list(cells["cell"])
    else:
        x_values = [display_value(x_key, v) for v in cells[x_key]]
    numeric = x_key is not None and _numeric(x_values)
    if not numeric:
        x_values = [format_value(v) for v in x_values]
    hues, hue_title = _hue_labels(spec, cells, x_key)
    by_cell = {"_x": dict(zip(cells["cell"], x_values))}
    if hues is not None:
        by_cell["_hue"] = dict(zip(cells["cell"], hues))
    has_ap = runs["AP"].notna() if "AP" in runs else pd.Series(False, index=runs.index)
    finished = runs[(runs["outcome"] == "finished") & has_ap].copy()
    for column, mapping in by_cell.items():
        finished[column] = finished["cell"].map(mapping)
    finished["AP%"] = 100 * finished["AP"].astype(float) if "AP" in finished else []
    layout = {"x_key": x_key, "numeric": numeric, "x": x_values, "hue": hues, "hue_title": hue_title}
    return finished, layout


def _x_label(x_key: str | None) -> str:
    """The x axis title: header and key ("gamma (loss.gamma)"), or "cell"."""
    return "cell" if x_key is None else f"{header(x_key)} ({x_key})" if header(x_key) != x_key else x_key


def _draw_ours(ax: Any, frame: pd.DataFrame, layout: dict, order: list, label: str) -> None:
    """Our AP per run, mean with the 95% t band (numeric x) or error bars (categorical x)."""
    hue = "_hue" if layout["hue"] is not None else None
    hue_order = list(dict.fromkeys(layout["hue"])) if hue else None
    # With a hue the legend lists its levels; seaborn refuses a label on top of them.
    kwargs = {} if hue else {"label": label}
    if layout["numeric"]:
        sns.lineplot(data=frame, x="_x", y="AP%", hue=hue, hue_order=hue_order, errorbar=t_interval,
                     marker="o", markersize=7, ax=ax, **kwargs)
    else:
        sns.pointplot(data=frame, x="_x", y="AP%", hue=hue, hue_order=hue_order, order=order,
                      errorbar=t_interval, capsize=0.15, linestyle="none", marker="o", err_kws={"linewidth": 1.5},
                      dodge=0.3 if hue else False, ax=ax, **kwargs)


def _x_position(layout: dict, order: list, i: int) -> float:
    """Where cell `i` sits on the x axis: its value, or its category's index."""
    return float(layout["x"][i]) if layout["numeric"] else float(order.index(layout["x"][i]))


def _draw_paper(ax: Any, cells: pd.DataFrame, layout: dict, order: list, table: str) -> Line2D | None:
    """The paper's AP as open diamonds (dashed between them on a numeric x); the legend handle."""
    groups = layout["hue"] or [None] * len(cells)  # one dashed line per hue level
    points = [(_x_position(layout, order, i), 100 * ap, groups[i])
              for i, ap in enumerate(cells["paper_AP"]) if not _is_missing(ap)]
    if not points:
        return None
    style = dict(color="0.25", marker="D", markerfacecolor="none", markersize=8)
    linestyle = "--" if layout["numeric"] else "none"
    for group in dict.fromkeys(p[2] for p in points):
        xs, ys = zip(*sorted((x, y) for x, y, g in points if g == group))
        ax.plot(xs, ys, linestyle=linestyle, **style)
    return Line2D([], [], linestyle=linestyle, label=f"paper, Table 1({table})", **style)


def _mark_unfinished(ax: Any, cells: pd.DataFrame, layout: dict, order: list) -> None:
    """Write "diverged (k/n)" at the x of each cell that has no finished run to plot."""
    for i, (_, row) in enumerate(cells.iterrows()):
        status = _status(row)
        if status is not None:
            if layout["hue"] is not None:  # several cells may share this x
                status = f"{layout['hue'][i]}: {status}"
            ax.annotate(status, xy=(_x_position(layout, order, i), 0.03), xycoords=ax.get_xaxis_transform(),
                        ha="center", va="bottom", rotation=90, color="tab:red", fontsize=9)


def _fit_x(ax: Any, layout: dict, order: list) -> None:
    """Show every cell's x, also those without a point (diverged cells), with a tick each."""
    if layout["numeric"]:
        lo, hi = min(layout["x"]), max(layout["x"])
        pad = 0.05 * (hi - lo) if hi > lo else 0.5
        ax.set_xlim(lo - pad, hi + pad)
        ticks = sorted(set(layout["x"]))
        # Label only ticks at least ~4% of the axis apart (gamma's 0, 0.1, 0.2 would overprint).
        labels, last = [], None
        for t in ticks:
            show = last is None or (t - last) >= 0.04 * (hi - lo if hi > lo else 1)
            labels.append(f"{t:g}" if show else "")
            last = t if show else last
        ax.set_xticks(ticks, labels)
    else:
        crowded = len(order) > 3  # long cell names would overlap: slant them
        ax.set_xticks(range(len(order)), order, rotation=25 if crowded else 0, ha="right" if crowded else "center")
        ax.set_xlim(-0.5, len(order) - 0.5)


def plot_ap(runs: pd.DataFrame, cells: pd.DataFrame, spec: ReportSpec, path: Path) -> Path:
    """AP (percent) against spec.x over seeds, with the paper's AP as a dashed reference."""
    frame, layout = _plot_frame(runs, cells, spec)
    order = list(dict.fromkeys(layout["x"])) if not layout["numeric"] else []
    several = bool((cells["n"] >= 2).any())
    with _style():
        fig, ax = _new_figure(max(6.5, 0.9 * len(order) + 3), 4.6)
        if not frame.empty:
            _draw_ours(ax, frame, layout, order, "ours: mean, 95% CI over seeds" if several else "ours")
        paper = _draw_paper(ax, cells, layout, order, spec.paper_table) if spec.paper_table else None
        _fit_x(ax, layout, order)
        _mark_unfinished(ax, cells, layout, order)
        ax.set_xlabel(_x_label(layout["x_key"]))
        ax.set_ylabel("AP (%)")
        detail = "mean, 95% CI" if several else "one seed: no interval"
        ax.set_title(f"{spec.name}: AP over seeds ({detail})")
        _finish_legend(ax, [paper] if paper else [], layout["hue_title"])
        return _save(fig, path)


def _finish_legend(ax: Any, extra: list, title: str | None) -> None:
    """One legend: seaborn's entries (hue levels or "ours") plus `extra` handles."""
    legend = ax.get_legend()
    handles = list(legend.legend_handles) if legend else []
    labels = [t.get_text() for t in legend.texts] if legend else []
    handles += extra
    labels += [h.get_label() for h in extra]
    if handles:
        ax.legend(handles, labels, title=title, fontsize="small", title_fontsize="small")


def _curve_keys(histories: pd.DataFrame) -> list[str]:
    """The panels of loss_curves.png: loss_cls and loss_box_reg, else the total loss."""
    present = set(histories["key"]) if "key" in histories else set()
    keys = [k for k in ("loss_cls", "loss_box_reg") if k in present]
    return keys or (["loss"] if "loss" in present else [])


def _binned_curves(histories: pd.DataFrame, runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Finite step metrics of `keys` joined to their run's cell and outcome, averaged per run in step bins."""
    frame = histories[histories["key"].isin(keys)].merge(runs[["run_id", "cell", "outcome"]], on="run_id")
    frame = frame[np.isfinite(frame["value"].astype(float))]
    if frame.empty:
        return frame
    if frame["step"].nunique() > MAX_CURVE_POINTS:
        first, last = frame["step"].min(), frame["step"].max()
        width = math.ceil((last - first + 1) / MAX_CURVE_POINTS)
        frame = frame.assign(step=first + (frame["step"] - first) // width * width)
    return frame.groupby(["run_id", "cell", "outcome", "key", "step"], as_index=False)["value"].mean()


def curves_unavailable(histories: pd.DataFrame | None, runs: pd.DataFrame) -> str | None:
    """Why loss_curves.png cannot be drawn, or None when it can."""
    if histories is None or histories.empty:
        return "no step metrics were tracked (histories is empty)"
    keys = _curve_keys(histories)
    if not keys:
        return "the histories hold none of loss_cls, loss_box_reg, loss"
    if _binned_curves(histories, runs, keys).empty:
        return "no finite loss values belong to the reported runs"
    return None


def _curve_panel(ax: Any, panel: pd.DataFrame, palette: dict[str, Any], log: bool) -> None:
    """One loss: finished runs as the mean over seeds with a 95% t band, the others as thin dashed lines.

    A diverged run's blow-up would swamp the mean of its cell, so it is drawn on its own.
    """
    finished = panel[panel["outcome"] == "finished"]
    others = panel[panel["outcome"] != "finished"]
    if not finished.empty:
        sns.lineplot(data=finished, x="step", y="value", hue="cell", palette=palette,
                     hue_order=[c for c in palette if c in set(finished["cell"])],
                     errorbar=t_interval, ax=ax, legend=False)
    if not others.empty:
        sns.lineplot(data=others, x="step", y="value", hue="cell", palette=palette, units="run_id",
                     estimator=None, linestyle="--", linewidth=1, ax=ax, legend=False)
    # After drawing, so that the mean and band are over the values, not over their logarithms.
    if log:
        ax.set_yscale("log")


def _curve_legend(fig: Figure, palette: dict[str, Any], cells: pd.DataFrame, any_unfinished: bool) -> None:
    """One legend for both panels, below them, so that it never hides a curve."""
    labels = {row["cell"]: row["cell"] + (f" ({row['n_diverged']}/{row['n_runs']} diverged)"
                                          if row["n_diverged"] else "") for _, row in cells.iterrows()}
    handles = [Line2D([], [], color=color, linewidth=2, label=labels[cell]) for cell, color in palette.items()]
    if any_unfinished:
        handles.append(Line2D([], [], color="0.3", linestyle="--", linewidth=1, label="a run that did not finish"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), fontsize="small",
               title="cell (mean and 95% CI over finished seeds)", title_fontsize="small")


def plot_loss_curves(histories: pd.DataFrame, runs: pd.DataFrame, cells: pd.DataFrame, path: Path) -> Path:
    """Training losses against iteration, one colour per cell; log y for loss_cls.

    Diverged runs are drawn too (dashed, one line each): their blow-up is what the curve is for.
    """
    keys = _curve_keys(histories)
    frame = _binned_curves(histories, runs, keys)
    present = set(frame["cell"])
    shown = [c for c in cells["cell"] if c in present]
    palette = dict(zip(shown, sns.color_palette(n_colors=len(shown))))
    with _style():
        fig, axes = _new_figure(5.5 * len(keys) + 1, 4.4, ncols=len(keys))
        axes = np.atleast_1d(axes)
        for ax, key in zip(axes, keys):
            log = key in ("loss_cls", "loss")
            panel = frame[(frame["key"] == key) & ((frame["value"] > 0) | (not log))]
            _curve_panel(ax, panel, palette, log)
            ax.set_xlabel("iteration")
            ax.set_ylabel(key + (" (log scale)" if log else ""))
            ax.set_title(key)
        _curve_legend(fig, palette, cells, (frame["outcome"] != "finished").any())
        return _save(fig, path)


def figure1_curves(p_t: np.ndarray, gammas: Sequence[float] = FIGURE1_GAMMAS) -> dict[float, np.ndarray]:
    """FL(p_t) for each gamma (alpha=None, gamma 0 is CE), via ablate.losses.focal on the logit of p_t."""
    p = torch.as_tensor(p_t, dtype=torch.float64)
    logits = torch.log(p) - torch.log1p(-p)
    targets = torch.ones_like(p)
    return {g: focal(logits, targets, gamma=g, alpha=None).numpy() for g in gammas}


def plot_loss_vs_pt(path: Path) -> Path:
    """The paper's Figure 1: loss against the probability of the ground-truth class."""
    p_t = np.linspace(1e-3, 1 - 1e-6, 600)
    with _style():
        fig, ax = _new_figure(6.5, 4.6)
        ax.axvspan(0.6, 1.0, color="0.9", zorder=0)
        ax.text(0.8, 2.6, "well-classified\nexamples", ha="center", va="center", fontsize=10)
        palette = sns.color_palette("tab10", len(FIGURE1_GAMMAS))
        for color, (gamma, loss) in zip(palette, figure1_curves(p_t).items()):
            label = "γ = 0 (CE)" if gamma == 0 else f"γ = {gamma:g}"
            ax.plot(p_t, loss, color=color, linewidth=2, label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 5)
        ax.set_xlabel("probability of ground truth class")
        ax.set_ylabel("loss")
        ax.set_title(r"$\mathrm{CE}(p_t) = -\log(p_t)$,  $\mathrm{FL}(p_t) = -(1-p_t)^\gamma \log(p_t)$")
        ax.legend(loc="upper right")
        return _save(fig, path)


def plot_deltas(results: pd.DataFrame, spec: ReportSpec, path: Path) -> Path:
    """AP - baseline AP per cell (AP points) with 95% intervals (paired by seed where possible)."""
    base = baseline_cell(spec, results)
    names = list(results["cell"])
    delta = 100 * results["AP_delta"].astype(float)
    half = 100 * results["AP_delta_ci95"].astype(float)
    colors = ["0.6" if c == base else sns.color_palette()[0] for c in names]
    with _style():
        fig, ax = _new_figure(max(6.0, 0.9 * len(names) + 2.5), 4.6)
        ax.bar(range(len(names)), delta.fillna(0.0), color=colors)
        ax.errorbar(range(len(names)), delta, yerr=half, fmt="none", ecolor="black", capsize=5)
        ax.axhline(0.0, color="black", linewidth=0.8)
        for i, (_, row) in enumerate(results.iterrows()):
            text = "baseline" if row["cell"] == base else _status(row)
            if text or _is_missing(row["AP_delta"]):
                ax.annotate(text or "no AP", xy=(i, 0.03), xycoords=ax.get_xaxis_transform(),
                            ha="center", va="bottom", rotation=90, fontsize=9,
                            color="0.3" if row["cell"] == base else "tab:red")
        ax.set_xticks(range(len(names)), names, rotation=25 if len(names) > 3 else 0,
                      ha="right" if len(names) > 3 else "center")
        ax.set_ylabel("ΔAP (AP points)")
        ax.set_title(f"{spec.name}: AP − AP of {base} (95% CI; paired by seed where seeds match)",
                     fontsize=10)
        return _save(fig, path)


# ----------------------------------------------------------------------------- files


def _ordered_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """runs.csv: identity and outcome columns first, then metrics and config, in cell/seed order."""
    first = [c for c in ("cell_index", "cell", "seed", "run_id", "run_name", "outcome", "config_hash")
             if c in runs]
    return runs[first + [c for c in runs.columns if c not in first]].sort_values(["cell_index", "seed"])


def _provenance(results: pd.DataFrame, runs: pd.DataFrame) -> str:
    """README lines: outcome counts, and per cell which run_ids its numbers come from."""
    # Finished, diverged and failed are always stated (a reader looks for them); rarer outcomes when present.
    total = ", ".join(f"{int(results[f'n_{o}'].sum())} {o}" for o in ("diverged", "failed"))
    total += "".join(f", {int(results[f'n_{o}'].sum())} {o}" for o in NOT_FINISHED[2:] if results[f"n_{o}"].sum())
    lines = [f"{len(runs)} runs: {int(results['n'].sum())} finished, {total}. Metrics average the finished runs only; "
             "[runs.csv](runs.csv) has every run (run_id, outcome, config, metrics) and "
             "[results.csv](results.csv) the aggregated table at full precision.", ""]
    for _, row in results.iterrows():
        cell_runs = runs[runs["cell"] == row["cell"]]
        others = cell_runs[cell_runs["outcome"] != "finished"]
        note = "; ".join(f"{outcome}: " + ", ".join(f"`{i}`" for i in group["run_id"])
                         for outcome, group in others.groupby("outcome", sort=False))
        ids = ", ".join(f"`{i}`" for i in row["run_ids"].split()) or "none finished"
        lines.append(f"- **{row['cell']}**: {ids}" + (f"; {note}" if note else ""))
    return "\n".join(lines)


def _readme(spec: ReportSpec, table_md: str, plots: dict[str, Path], skipped: dict[str, str],
            provenance: str, captions: dict[str, str]) -> str:
    """README.md: title, description, command, table, plots (or why one is missing), provenance."""
    command = spec.command or "(no command recorded)"
    captions = {"ap": "AP against the varied key, over seeds", "deltas": "AP difference to the baseline",
                "loss_curves": "training losses", "loss_vs_pt": "the loss family (paper's Figure 1)", **captions}
    images = [f"{captions.get(k, k)[0].upper()}{captions.get(k, k)[1:]}:\n\n![{k}]({p.name})" for k, p in plots.items()]
    images += [f"`{name}` was not written: {why}." for name, why in skipped.items()]
    parts = [f"# {spec.name}", spec.description, "## Reproduce", f"```bash\n{command}\n```",
             "## Results", table_md.strip(), "## Plots", "\n\n".join(images), "## Provenance", provenance]
    return "\n\n".join(p for p in parts if p) + "\n"


def write_report(runs: pd.DataFrame, histories: pd.DataFrame, spec: ReportSpec, out_dir: Path,
                 figures: dict[str, tuple[Path, str]] | None = None,
                 skipped_figures: dict[str, str] | None = None) -> dict[str, Path]:
    """Write the report folder (created if needed); returns {"table": path, ...} of the files written.

    Keys: table (table.md), table_tex, results, runs, ap, loss_curves (only when there are loss
    histories), loss_vs_pt, deltas, readme, plus the keys of `figures`: plots the caller already
    wrote into out_dir ({key: (path, caption)}, e.g. Figure 4); `skipped_figures` ({file: why})
    says in the README why one of them is missing.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = results_table(runs, spec)
    table = display_table(results, spec)
    caption = table_caption(spec, baseline_cell(spec, results))
    table_md = markdown_table(table) + "\n\n" + caption + "\n"
    paths = {"table": out_dir / "table.md", "table_tex": out_dir / "table.tex",
             "results": out_dir / "results.csv", "runs": out_dir / "runs.csv"}
    paths["table"].write_text(table_md)
    paths["table_tex"].write_text(latex_table(table, caption))
    results.to_csv(paths["results"], index=False)
    _ordered_runs(runs).to_csv(paths["runs"], index=False)

    plots = {"ap": plot_ap(runs, results, spec, out_dir / "ap.png"),
             "deltas": plot_deltas(results, spec, out_dir / "deltas.png")}
    skipped = {}
    why = curves_unavailable(histories, runs)
    if why is None:
        plots["loss_curves"] = plot_loss_curves(histories, runs, results, out_dir / "loss_curves.png")
    else:
        skipped["loss_curves.png"] = why
    plots["loss_vs_pt"] = plot_loss_vs_pt(out_dir / "loss_vs_pt.png")
    plots.update({key: path for key, (path, _) in (figures or {}).items()})
    skipped.update(skipped_figures or {})
    paths.update(plots)
    paths["readme"] = out_dir / "README.md"
    captions = {key: caption for key, (_, caption) in (figures or {}).items()}
    paths["readme"].write_text(_readme(spec, table_md, plots, skipped, _provenance(results, runs), captions))
    return paths
