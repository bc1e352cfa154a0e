"""The report's sections for adaptive seeds and budget curves (pure: tables in, files out).

Adaptive seeds (`ablate run --until-settled`): one row per comparison with its verdict under the
rule recorded with the runs (settled for / settled against / open at max seeds / open, cannot
settle / open), the question it answers and the error it controls (per comparison or
family-wise), the seeds it was judged on, the difference in AP points raw and median-unbiased,
the statistic and the critical value it had to beat, the collapsed seeds it rests on, and the
seeds it spent beside the seeds a fixed-n design needs for the power the rule has at the adjusted
difference and measured spread; then the same runs under the other tests and error controls
(post hoc). Files: sequential.csv, sequential_readings.csv, sequential.json (the rule and the
comparisons).

Budget curves (`ablate run --budgets`): budgets/xM/results.csv per multiple M (results.csv's
format, so `ablate findings` can judge each budget as it judges the report), budgets/results.csv
(all of them, with a `budget` column), budgets/order_changes.csv and ap_vs_budget.png.

AP: runs and results.csv carry fractions (as tracked); everything this module judges or prints
is in AP points, like ablate.findings.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns

from ablate.budgets import budget_label, order_changes
from ablate.report.plots import new_figure, save_figure, style
from ablate.report.spec import ReportSpec
from ablate.report.stats import t_interval
from ablate.report.tables import markdown_table, results_table
from ablate.runs import Outcome
from ablate.collapse import RULE, collapsed_seeds
from ablate.family import judge_comparisons
from ablate.sequential import SequentialRule, State, Verdict, fixed_seeds_for_power, simulate
from ablate.sequential_estimate import adjusted_difference

SEQUENTIAL_COLUMNS = ["cell", "comparator", "verdict", "n", "difference", "adjusted", "median_difference",
                      "statistic", "critical", "error", "collapsed_cell", "collapsed_comparator", "flags",
                      "seeds_run", "expected_seeds", "fixed_seeds"]
NUM_SIMS = 20_000  # per comparison: the rule's power and expected seeds to ~0.5%, in well under a second
# The readings of the same runs the report sets beside the recorded rule's (post hoc: for comparison only).
READINGS = (("t", "none"), ("t", "holm"), ("signed_rank", "none"), ("signed_rank", "holm"))


# ----------------------------------------------------------------------------- adaptive seeds


def finished_ap(runs: pd.DataFrame) -> dict[str, dict[int, float]]:
    """{cell: {seed: AP in points}} of the finished runs with an AP."""
    out: dict[str, dict[int, float]] = {}
    if runs.empty or "AP" not in runs:
        return out
    for _, row in runs[(runs["outcome"] == Outcome.FINISHED) & runs["AP"].notna()].iterrows():
        out.setdefault(str(row["cell"]), {})[int(row["seed"])] = 100.0 * float(row["AP"])
    return out


def _spread(a: dict[int, float], b: dict[int, float]) -> float:
    """One seed's AP std in either cell: the root of the two cells' mean variance (NaN below 2 seeds)."""
    variances = [np.var(list(v.values()), ddof=1) for v in (a, b) if len(v) >= 2]
    return float(math.sqrt(np.mean(variances))) if len(variances) == 2 else math.nan


def _design(rule: SequentialRule, difference: float, sd: float, seed: int) -> tuple[float, float]:
    """(the rule's expected seeds, the fixed-n seeds of the same power) at `difference` (the
    adjusted one where the verdict has it) and the measured spread, per comparison at the rule's
    alpha; NaN when they say nothing (no difference or no spread measured)."""
    if not (math.isfinite(difference) and difference != 0 and math.isfinite(sd) and sd > 0):
        return math.nan, math.nan
    oc = simulate(rule, difference, sd, NUM_SIMS, np.random.default_rng(seed))
    # A simulated power of 1 (every simulation settled) has no fixed-n equal: a fixed design only
    # approaches it. Cap it at the simulations' resolution.
    power = min(oc.power, 1.0 - 10.0 / NUM_SIMS)
    return oc.expected_seeds, float(fixed_seeds_for_power(power, oc.difference, oc.sd * math.sqrt(2.0), rule.alpha))


def _judged_differences(verdict: Verdict, a: dict[int, float], b: dict[int, float]) -> tuple[list[int], np.ndarray]:
    """(the seeds a paired verdict was judged on, their differences a - b), in seed order."""
    seeds = sorted(set(a) & set(b))[: verdict.n]
    return seeds, np.array([a[s] - b[s] for s in seeds], dtype=float)


def _flags(rule: SequentialRule, verdict: Verdict, collapsed: int) -> str:
    flags = []
    if collapsed and rule.test == "t":
        flags.append(f"mean-based verdict resting on {collapsed} collapsed seed(s)")
    if verdict.state is not State.OPEN and verdict.n < rule.max_seeds:
        flags.append("early stop: the raw difference is biased up (see adjusted)")
    return "; ".join(flags)


def sequential_table(rule: SequentialRule, comparisons: Sequence[tuple[str, str]], runs: pd.DataFrame) -> pd.DataFrame:
    """One row per comparison (SEQUENTIAL_COLUMNS); AP differences in points, cell - comparator."""
    finished = finished_ap(runs)
    attempted = runs.groupby("cell")["seed"].nunique().to_dict() if not runs.empty else {}
    verdicts = judge_comparisons(rule, comparisons, finished)
    rows = []
    for i, (cell, other) in enumerate(comparisons):
        a, b = finished.get(cell, {}), finished.get(other, {})
        verdict = verdicts[(cell, other)]
        seeds, d = _judged_differences(verdict, a, b)
        adjusted = adjusted_difference(rule, verdict, d) if len(d) >= rule.min_seeds else math.nan
        planning = adjusted if math.isfinite(adjusted) else verdict.difference
        expected, fixed = _design(rule, planning, _spread(a, b), seed=i)
        lost = [len(set(collapsed_seeds(side)) & set(seeds)) for side in (a, b)]
        rows.append({"cell": cell, "comparator": other, "verdict": verdict.label, "n": verdict.n,
                     "difference": verdict.difference, "adjusted": adjusted,
                     "median_difference": float(np.median(d)) if len(d) else math.nan,
                     "statistic": verdict.statistic, "critical": verdict.critical, "error": rule.error_text,
                     "collapsed_cell": lost[0], "collapsed_comparator": lost[1],
                     "flags": _flags(rule, verdict, sum(lost)),
                     "seeds_run": max(attempted.get(cell, 0), attempted.get(other, 0)),
                     "expected_seeds": expected, "fixed_seeds": fixed})
    return pd.DataFrame(rows, columns=SEQUENTIAL_COLUMNS)


def readings_table(rule: SequentialRule, comparisons: Sequence[tuple[str, str]], runs: pd.DataFrame) -> pd.DataFrame:
    """The same runs judged by each of READINGS (the recorded rule's other fields kept): one row
    per comparison, one column per reading, the verdict's text."""
    finished = finished_ap(runs)
    out = pd.DataFrame({"cell": [c for c, _ in comparisons], "comparator": [o for _, o in comparisons]})
    for test, family in READINGS:
        other = dataclasses.replace(rule, test=test, family=family)
        verdicts = judge_comparisons(other, comparisons, finished)
        out[reading_name(test, family)] = [verdicts[pair].text() for pair in comparisons]
    return out


def reading_name(test: str, family: str) -> str:
    return f"{test.replace('_', '-')}, {'family-wise (Holm)' if family == 'holm' else 'per comparison'}"


def _number(value: float, fmt: str) -> str:
    return "—" if not math.isfinite(value) else format(value, fmt)


def sequential_markdown(rule: SequentialRule, table: pd.DataFrame, readings: pd.DataFrame | None = None) -> str:
    """The README section: the rule in one paragraph, the verdicts, how to read them, other readings."""
    record = rule.to_dict()
    critical = ", ".join(f"{n}: {c:.2f}" for n, c in record["critical"].items())
    futility = ", ".join(f"{n}: {f:.2f}" for n, f in record["futility"].items() if f is not None) or "none"
    statistic = "paired t" if rule.test == "t" else "exact signed-rank V = W+ - n(n+1)/4"
    shown = pd.DataFrame({
        "cell": table["cell"], "vs": table["comparator"], "verdict": table["verdict"], "seeds": table["n"],
        "AP diff": [_number(d, "+.1f") for d in table["difference"]],
        "adjusted": [_number(d, "+.1f") for d in table["adjusted"]],
        "median diff": [_number(d, "+.1f") for d in table["median_difference"]],
        "statistic": [_number(t, ".2f") for t in table["statistic"]],
        "critical": [_number(c, ".2f") for c in table["critical"]], "error controlled": table["error"],
        "collapsed": [f"{c} / {o}" for c, o in zip(table["collapsed_cell"], table["collapsed_comparator"])],
        "flags": [f or "—" for f in table["flags"]], "seeds run": table["seeds_run"],
        "rule: E[seeds]": [_number(e, ".1f") for e in table["expected_seeds"]],
        "fixed-n, same power": [_number(f, ".0f") for f in table["fixed_seeds"]]})
    family = ("One comparison: its error is the family's." if len(table) == 1 else
              f"The comparisons are read as one family: Holm's step-down over the group-sequential tests holds "
              f"the chance of any wrong verdict among the {len(table)} at {rule.alpha:g}." if rule.family == "holm" else
              f"Each verdict controls its own error only (alpha {rule.alpha:g} per comparison); read as a family of "
              f"{len(table)}, the chance that some verdict is wrong is larger (`ablate report --family` reads "
              "them family-wise).")
    parts = [
        "## Adaptive seeds",
        f"Rule, fixed before the runs and recorded on their parent run (`sequential.json`): {statistic} over common "
        f"seeds, looks at {rule.min_seeds}..{rule.max_seeds} seeds, two-sided alpha {rule.alpha:g} spent "
        f"{rule.spending.replace('_', '-')}-type; a look settles when |statistic| exceeds its critical value "
        f"({critical}). Curtailment {'on' if rule.curtail else 'off'}: a comparison whose |statistic| is at or below "
        f"({futility}) can no longer settle and stops drawing seeds.",
        f"Question each verdict answers: {rule.question}. Error controlled: {rule.error_text}. {family}",
        markdown_table(shown),
        "AP diff: mean of cell - comparator over the seeds of the deciding look, in AP points; adjusted: its "
        "median-unbiased estimate for this design (ablate.sequential_estimate; — where the comparison is still open "
        "before max seeds or was curtailed); median diff: the median per-seed difference. Collapsed: collapsed "
        f"seeds ({RULE}) among the judged seeds, cell / comparator. Seeds run: the seeds the busier of the two cells "
        "ran. E[seeds] and fixed-n: at the adjusted difference (the raw one where there is none) and the measured "
        "seed spread, the seeds per cell this rule spends on average, and those a fixed-n paired t-test at the same "
        "alpha needs for the power the rule has there (— when no difference or spread was measured). "
        "Per-comparison details in [sequential.csv](sequential.csv)."]
    if readings is not None:
        parts += ["Other readings of the same runs (post hoc, for comparison; the verdict above is the recorded "
                  "rule's): the paired t (mean AP) and the signed-rank (a typical seed), per comparison and "
                  "family-wise, all with curtailment. \"open (n seeds)\": the runs stopped (the recorded rule settled) before this "
                  "reading could decide; it would have asked for more seeds.", markdown_table(readings.rename(columns={"comparator": "vs"}))]
    return "\n\n".join(parts)


def write_sequential(rule: SequentialRule, comparisons: Sequence[tuple[str, str]], runs: pd.DataFrame,
                     out_dir: Path) -> tuple[dict[str, Path], str]:
    """sequential.csv, sequential_readings.csv and sequential.json in out_dir; returns ({key: path},
    the README section)."""
    table = sequential_table(rule, comparisons, runs)
    readings = readings_table(rule, comparisons, runs)
    paths = {"sequential": out_dir / "sequential.csv", "sequential_readings": out_dir / "sequential_readings.csv",
             "sequential_rule": out_dir / "sequential.json"}
    table.to_csv(paths["sequential"], index=False)
    readings.to_csv(paths["sequential_readings"], index=False)
    paths["sequential_rule"].write_text(json.dumps({"rule": rule.to_dict(), "comparisons": list(comparisons)},
                                                   indent=1) + "\n")
    return paths, sequential_markdown(rule, table, readings)


# ----------------------------------------------------------------------------- budget curves


def budget_results(per_budget: dict[float, pd.DataFrame], spec: ReportSpec) -> pd.DataFrame:
    """results.csv's table at every budget, stacked, with a `budget` column first."""
    frames = [results_table(runs, spec).assign(budget=multiple) for multiple, runs in sorted(per_budget.items())]
    table = pd.concat(frames, ignore_index=True)
    return table[["budget", *[c for c in table.columns if c != "budget"]]]


def plot_ap_vs_budget(per_budget: dict[float, pd.DataFrame], spec: ReportSpec, path: Path) -> Path:
    """AP (points) against the budget multiple per cell: mean over seeds with its 95% t band."""
    frames = []
    for multiple, runs in per_budget.items():
        finished = runs[(runs["outcome"] == Outcome.FINISHED) & runs["AP"].notna()] if "AP" in runs else runs.iloc[:0]
        frames.append(pd.DataFrame({"budget": multiple, "cell": finished["cell"],
                                    "AP%": 100 * finished["AP"].astype(float) if len(finished) else []}))
    frame = pd.concat(frames, ignore_index=True)
    budgets = sorted(per_budget)
    with style():
        fig, ax = new_figure(6.5, 4.6)
        if not frame.empty:
            sns.lineplot(data=frame, x="budget", y="AP%", hue="cell", errorbar=t_interval, marker="o",
                         markersize=7, ax=ax)
        ax.set_xscale("log", base=2)  # multiples double: equal steps on the axis
        ax.set_xlim(budgets[0] / 1.25, budgets[-1] * 1.25)
        ax.set_xticks(budgets, [budget_label(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("budget (multiple of the schedule)")
        ax.set_ylabel("AP (%)")
        ax.set_title(f"{spec.name}: AP against budget (mean, 95% CI over seeds)")
        return save_figure(fig, path)


def budget_order_changes(table: pd.DataFrame) -> pd.DataFrame:
    """ablate.budgets.order_changes on the stacked table, differences in AP points."""
    points = table.assign(AP_mean=100 * table["AP_mean"], AP_ci95=100 * table["AP_ci95"])
    return order_changes(points)


def budgets_markdown(table: pd.DataFrame, changes: pd.DataFrame) -> str:
    """The README section: AP per cell and budget, and every pair whose order changes."""
    def text(row: pd.Series) -> str:
        mean, half = 100 * float(row["AP_mean"]), 100 * float(row["AP_ci95"])
        if not math.isfinite(mean):
            return f"— (n={int(row['n'])})"
        return f"{mean:.1f}" + (f" ± {half:.1f}" if math.isfinite(half) else "") + f" (n={int(row['n'])})"

    cells = list(dict.fromkeys(table["cell"]))
    shown = pd.DataFrame({"cell": cells})
    for multiple, rows in table.groupby("budget", sort=True):
        by_cell = {row["cell"]: text(row) for _, row in rows.iterrows()}
        shown[budget_label(multiple)] = [by_cell.get(cell, "not run") for cell in cells]
    if changes.empty:
        swaps = "No pair of cells changes order between the budgets measured."
    else:
        lines = [f"- **{r.cell_a}** vs **{r.cell_b}**: {r.difference_from:+.1f} at {budget_label(r.budget_from)}, "
                 f"{r.difference_to:+.1f} at {budget_label(r.budget_to)}"
                 + (" — **flagged: the 95% CIs are disjoint at both budgets**" if r.disjoint
                    else " (the CIs overlap at one budget at least: may be seed noise)")
                 for r in changes.itertuples()]
        swaps = "Pairs whose order changes (AP of the first minus the second, in points):\n\n" + "\n".join(lines)
    return "\n\n".join([
        "## Budget curves",
        "AP (mean ± 95% CI half-width over seeds, in points) of every cell at each multiple of its schedule "
        "(the LR steps scale with it, the warm-up does not); x1 is the cell as declared.",
        markdown_table(shown), "AP against budget:\n\n![ap_vs_budget](ap_vs_budget.png)", swaps,
        "Per budget: [budgets/](budgets/) (`xM/results.csv` in results.csv's format, `results.csv` all of them, "
        "`order_changes.csv`)."])


def write_budgets(per_budget: dict[float, pd.DataFrame], spec: ReportSpec,
                  out_dir: Path) -> tuple[dict[str, Path], str]:
    """The budget files under out_dir (see the module docstring); returns ({key: path}, the README section)."""
    folder = out_dir / "budgets"
    folder.mkdir(parents=True, exist_ok=True)
    table = budget_results(per_budget, spec)
    paths = {}
    for multiple, rows in table.groupby("budget", sort=True):
        sub = folder / budget_label(multiple)
        sub.mkdir(exist_ok=True)
        paths[f"budget_{budget_label(multiple)}"] = sub / "results.csv"
        rows.drop(columns="budget").to_csv(sub / "results.csv", index=False)
    changes = budget_order_changes(table)
    paths.update({"budget_results": folder / "results.csv", "order_changes": folder / "order_changes.csv",
                  "ap_vs_budget": plot_ap_vs_budget(per_budget, spec, out_dir / "ap_vs_budget.png")})
    table.to_csv(paths["budget_results"], index=False)
    changes.to_csv(paths["order_changes"], index=False)
    return paths, budgets_markdown(table, changes)
