"""Statistics over seeds: per-cell mean, std, Student t interval and outcome counts; the baseline
deltas (paired by seed, else Welch); the "mean ± std" text. Shared by the report and the findings.

Metrics are averaged over *finished* runs only; diverged, failed and pruned runs are counted and
shown, never averaged in. Uncertainty is over seeds: the std (ddof=1) and a Student t 95%
interval, both NaN for a single seed, since one seed says nothing about the spread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ablate.collapse import collapsed_seeds
from ablate.report.spec import METRICS, ReportSpec
from ablate.runs import Outcome

# A cell's runs are counted under their outcome; an outcome that is none of Outcome's (a tag
# written by hand, an older version) is counted as OTHER rather than lost.
OTHER = "other"
# Outcomes a run can end with besides finished, in the order of results.csv's n_* columns.
NOT_FINISHED = (Outcome.DIVERGED, Outcome.FAILED, Outcome.PRUNED, Outcome.INTERRUPTED, OTHER)
MISSING = "—"  # the text of a number that does not exist (no finished seed, one seed's std)


def is_missing(value: Any) -> bool:
    """None or a float NaN (pandas turns a None config value into NaN in float columns)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


# ----------------------------------------------------------------------------- one sample


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


def ci_bounds(mean: float, half: float) -> tuple[float, float]:
    """(low, high) = mean -+ half; both NaN when there is no interval (half NaN: one seed)."""
    if not math.isfinite(half):
        return math.nan, math.nan
    return mean - half, mean + half


def t_interval(values: pd.Series) -> tuple[float, float]:
    """(low, high) of the 95% t interval of the mean, as seaborn's `errorbar` callable.

    seaborn's own ("ci", 95) bootstraps, which over 3 seeds gives a band about as wide as the
    values' range; this keeps the plotted bands equal to the table's ci95. One value: (mean, mean).
    """
    mean, _, half, _ = summarize(values)
    if math.isnan(half):
        return mean, mean
    return mean - half, mean + half


# ----------------------------------------------------------------------------- two samples


@dataclass(frozen=True)
class Welch:
    """Welch's unequal-variance comparison of two means, a - b."""

    difference: float  # mean a - mean b
    half: float  # of the 95% interval of the difference; NaN below two values a side, 0 without spread
    p: float  # two-sided t-test p-value; NaN below two values a side


def welch(a: tuple[float, float, int], b: tuple[float, float, int]) -> Welch:
    """Welch's t comparison from each side's (mean, std with ddof=1, n), in any one unit."""
    (mean_a, std_a, n_a), (mean_b, std_b, n_b) = a, b
    if n_a < 2 or n_b < 2:
        return Welch(mean_a - mean_b, math.nan, math.nan)
    with np.errstate(divide="ignore", invalid="ignore"):  # no spread on either side: t is inf or NaN
        p = float(stats.ttest_ind_from_stats(mean_a, std_a, n_a, mean_b, std_b, n_b, equal_var=False).pvalue)
    var_a, var_b = std_a**2 / n_a, std_b**2 / n_b
    if var_a + var_b == 0:
        return Welch(mean_a - mean_b, 0.0, p)
    df = (var_a + var_b) ** 2 / (var_a**2 / (n_a - 1) + var_b**2 / (n_b - 1))
    return Welch(mean_a - mean_b, float(stats.t.ppf(0.975, df) * math.sqrt(var_a + var_b)), p)


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
    test = welch((m_c, s_c, n_c), (m_b, s_b, n_b))
    return test.difference, test.half, False


# ----------------------------------------------------------------------------- per cell


def _outcome_counts(group: pd.DataFrame) -> dict[str, int]:
    """n (finished runs), n_runs and n_diverged / n_failed / n_pruned / ... of one cell's runs."""
    outcome = group["outcome"].where(group["outcome"].isin((Outcome.FINISHED, *NOT_FINISHED)), OTHER)
    counts = {"n": int((outcome == Outcome.FINISHED).sum()), "n_runs": len(group)}
    for name in NOT_FINISHED:
        counts[f"n_{name}"] = int((outcome == name).sum())
    return counts


def _cell_row(cell: str, index: int, group: pd.DataFrame, spec: ReportSpec) -> dict[str, Any]:
    """One row of `aggregate`: identity, varied keys, counts, statistics, provenance, other config."""
    finished = group[group["outcome"] == Outcome.FINISHED]
    row: dict[str, Any] = {"cell": cell, "cell_index": int(index)}
    row.update({key: group[key].iloc[0] for key in spec.varied})
    row.update(_outcome_counts(group))
    for metric in METRICS:
        values = finished[metric] if metric in finished else pd.Series(dtype=float)
        mean, std, ci95, _ = summarize(values)
        row.update({f"{metric}_mean": mean, f"{metric}_std": std, f"{metric}_ci95": ci95})
    ap = dict(zip(finished["seed"], 100 * finished["AP"].astype(float))) if "AP" in finished else {}  # points
    row["n_collapsed"] = len(collapsed_seeds(ap))  # ablate.collapse.RULE
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
    n_pruned, n_interrupted, n_other, `<metric>_mean/_std/_ci95` for each of METRICS (finished runs
    only; std and ci95 NaN below two values), n_collapsed (finished seeds that collapsed by
    ablate.collapse.RULE), seeds and run_ids of the finished runs, then the
    cells' other config keys.
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
    rows = runs[(runs["cell"] == cell) & (runs["outcome"] == Outcome.FINISHED)]
    if metric not in rows:
        return pd.Series(dtype=float)
    return rows.set_index("seed")[metric].astype(float).dropna()


def baseline_deltas(runs: pd.DataFrame, cells: pd.DataFrame, spec: ReportSpec,
                    metric: str = "AP") -> pd.DataFrame:
    """Per cell (aligned with `cells`): `<metric>_delta`, `<metric>_delta_ci95`, `delta_paired`.

    The difference to the baseline cell in the metric's units (fractions), over finished runs.
    """
    base = _finished_by_seed(runs, baseline_cell(spec, cells), metric)
    rows = [paired_or_welch(_finished_by_seed(runs, cell, metric), base) for cell in cells["cell"]]
    return pd.DataFrame(rows, index=cells.index,
                        columns=[f"{metric}_delta", f"{metric}_delta_ci95", "delta_paired"])


# ----------------------------------------------------------------------------- as text


def percent(value: float, sign: bool = False) -> str:
    """A fraction as percent with one decimal ("32.0", "+1.5" with sign), MISSING for NaN."""
    return MISSING if is_missing(value) else f"{100 * value:{'+' if sign else ''}.1f}"


def mean_std_text(row: pd.Series, metric: str) -> str:
    """"32.0 ± 2.0" in percent from a results row's `<metric>_mean` and `_std`; the mean alone
    when there is no std (one seed); MISSING without a mean."""
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if is_missing(mean):
        return MISSING
    return percent(mean) if is_missing(std) else f"{percent(mean)} ± {percent(std)}"
